from kernels.gate_combine.naive import gate_branch_ref, sum_branches_ref

__all__ = ["gate_branch_ref", "sum_branches_ref"]
