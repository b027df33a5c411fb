from kernels.block_selection.naive import overlap_weights, select_blocks_ref

__all__ = ["overlap_weights", "select_blocks_ref"]
