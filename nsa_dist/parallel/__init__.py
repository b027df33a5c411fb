"""Context parallelism for NSA: zigzag sequence shards, halos, gathered compressed tokens."""

from nsa_dist.parallel.accounting import nsa_cp_bytes, ring_attention_bytes
from nsa_dist.parallel.comm import CommStats
from nsa_dist.parallel.dense_cp import dense_context_parallel
from nsa_dist.parallel.layout import (LayoutError, ZigzagLayout, merge_zigzag, split_zigzag, validate_layout,
                                      zigzag_positions)
from nsa_dist.parallel.nsa_cp import nsa_context_parallel

__all__ = ["CommStats", "LayoutError", "ZigzagLayout", "dense_context_parallel", "merge_zigzag",
           "nsa_context_parallel", "nsa_cp_bytes", "ring_attention_bytes", "split_zigzag", "validate_layout",
           "zigzag_positions"]
