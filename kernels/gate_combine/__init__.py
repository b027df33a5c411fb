from kernels.gate_combine.naive import gate_branch_ref, gated_sum_ref

__all__ = ["gate_branch_ref", "gated_sum_ref"]
