from kernels.gate_combine.naive import combine_branches_ref

__all__ = ["combine_branches_ref"]
