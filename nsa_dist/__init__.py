"""nsa-dist: distributed long-context training with Native Sparse Attention."""
