"""Issue 13, session 47: the indexer loss's kernels (kernels/block_selection/indexer_triton.py) on the GPU
for the first time, cheaply: the loss alone, forward+backward, through the kernels and through PyTorch on
the proof's shapes (16 x 2K, 8 x 8K, 1 x 32K laid end to end, one document a sequence; bf16 q and keys,
4 indexer heads of a 16-head group, every 128th row), medians of 5 after one untimed, and the two
versions' KL and recall counts side by side. Run after the kernel tests:
    PYTHONPATH=$PWD python3 benchmarks/gpu_checks/indexer_kernels_quick.py
"""
import statistics
import time

import torch

from kernels.block_selection.indexer import indexer_init, indexer_loss_terms

torch.manual_seed(0)
for batch, seq in [(16, 2048), (8, 8192), (1, 32768)]:
    q = torch.randn(1, batch * seq, 16, 64, device="cuda", dtype=torch.bfloat16)
    keys = torch.randn(1, batch * seq, 1, 64, device="cuda", dtype=torch.bfloat16)
    cu = torch.arange(0, batch * seq + 1, seq, device="cuda", dtype=torch.int32)
    line = []
    for impl in ("triton", "reference"):
        weight = indexer_init(4, 16, 64).cuda().requires_grad_()

        def step():
            terms = indexer_loss_terms(q, weight, keys, selection_block=64, num_selected=16, cu_seqlens=cu,
                                       row_stride=128, impl=impl)
            (terms.kl / terms.rows).backward()
            return terms

        terms = step()
        torch.cuda.synchronize()
        times = []
        for _ in range(5):
            start = time.perf_counter()
            step()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        line.append(f"{impl} {statistics.median(times) * 1e3:7.2f} ms (kl {terms.kl.item():.5f}, rows "
                    f"{terms.rows.item():.0f}, overlap {terms.overlap.item():.0f}/{terms.choices.item():.0f})")
    print(f"{batch:>2} x {seq:>5}: " + "  ".join(line), flush=True)
