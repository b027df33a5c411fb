from kernels.selected_attention.naive import selected_attention_ref

__all__ = ["selected_attention_ref"]
