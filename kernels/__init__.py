"""NSA kernels: one folder per branch, each with a pure-PyTorch reference (naive.py)."""
