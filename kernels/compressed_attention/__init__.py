from kernels.compressed_attention.naive import compressed_attention_ref

__all__ = ["compressed_attention_ref"]
