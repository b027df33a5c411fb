from kernels.gate_combine.naive import gated_sum_ref

__all__ = ["gated_sum_ref"]
