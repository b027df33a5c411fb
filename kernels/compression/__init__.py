from kernels.compression.naive import mean_compress, mlp_compress, num_compressed_blocks

__all__ = ["mean_compress", "mlp_compress", "num_compressed_blocks"]
