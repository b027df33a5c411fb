from kernels.window_attention.naive import window_attention_ref

__all__ = ["window_attention_ref"]
