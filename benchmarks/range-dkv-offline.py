"""Issue 11: the range attention's dK/dV kernel (kernels/range_attention.py, _range_attn_bwd_dkv) compiled
offline for an H100/H200 (sm_90a) on a machine without a GPU, at the candidate tiles and a few more, rows in
order and aligned (ALIGNED_ROWS): the shared memory, registers a thread and bytes spilled that ptxas reports
(G = 16, D = 128, bf16). Not a timing (benchmarks/kernels-exp-aligned-rows.py --dkv-configs times them):

    env -u TRITON_INTERPRET python benchmarks/range-dkv-offline.py

(about a minute on two CPU cores.)
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernels.range_attention as ra  # noqa: E402
from offline_compile import compile_sm90, programs_per_sm, signature_by_names  # noqa: E402

# (BLOCK_M rows, BLOCK_N keys, warps, stages): the autotuner's candidates at D <= 128 (range_attention._CONFIGS),
# then the larger-head-dim ones and two more
TILES = [(64, 128, 8, 3), (64, 64, 4, 2), (64, 64, 8, 2), (64, 32, 8, 2), (32, 64, 8, 2),
         (64, 64, 8, 3), (64, 32, 4, 2), (32, 64, 4, 2), (128, 64, 8, 2)]


def main():
    dims = dict(DK=128, DV=128, BLOCK_DK=128, BLOCK_DV=128, PRECISION="tf32")
    kernel = ra._range_attn_bwd_dkv
    print(f"{'rows':>4} {'keys':>4} {'warps':>5} {'stages':>6} {'aligned':>7} {'shared KB':>9} {'registers':>9} "
          f"{'spilled B':>9}  programs a multiprocessor by shared / by registers")
    for block_m, block_n, warps, stages in TILES:
        for aligned in (False, True):
            constants = dict(G=16, **dims, BLOCK_M=block_m, BLOCK_N=block_n, TMA=False, ALIGNED_ROWS=aligned)
            shared, regs, spills, _ = compile_sm90(kernel, signature_by_names(kernel, constants), constants, warps,
                                                   stages)
            by_shared, by_registers = programs_per_sm(shared, regs, warps)
            print(f"{block_m:>4} {block_n:>4} {warps:>5} {stages:>6} {str(aligned):>7} {shared / 1024:>9.1f} "
                  f"{regs:>9} {spills:>9}  {by_shared} / {by_registers}", flush=True)


if __name__ == "__main__":
    main()
