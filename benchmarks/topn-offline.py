"""Issue 11: what the top-n kernel uses per program on an H100/H200 (sm_90a), compiled offline on a CPU
machine (no GPU needed): shared memory, registers and spills by ptxas, and how many programs fit on a
multiprocessor by each, at the tiles, warps and stages benchmarks/kernels-exp-sweep.py times. Shapes: the
paper's (G = 16, head dim 128, l = 32, d = 16, l' = 64, n = 16), bf16, the sum score and the max. (Until
session 29 it also compiled a second, group-rows kernel; the GPU sweep timed it at 0.42-0.68x and it was
removed.)

    env -u TRITON_INTERPRET python benchmarks/topn-offline.py

(under a minute on two CPU cores). Whether a config that spills or fits few programs is slower is for
the GPU sweep to say.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernels.block_selection.triton import _topn_kernel  # noqa: E402
from offline_compile import programs_per_sm, resources  # noqa: E402

PAPER = dict(G=16, L=32, STRIDE=16, SEL=64, DK=128, BLOCK_DK=128, BLOCK_C=64, ST=16, PRECISION="tf32")


def signature(constants: dict) -> dict:
    sig = {"q": "*bf16", "k_cmp": "*bf16", "lse": "*fp32", "tiles": "*i64", "out": "*i32"}
    sig.update({name: "i32" for name in ("T", "NC", "HQ", "HK", "NSEL", "q_start")})
    sig["scale_log2"] = "fp32"
    sig.update({name: "constexpr" for name in constants})
    return sig


def row(block_t: int, warps: int, stages: int, max_score: bool) -> str:
    constants = dict(PAPER, BLOCK_T=block_t, MAX_SCORE=max_score, BLOCK_G=16)
    # the kernel's argument order: PAPER's sizes, then BLOCK_T, the score and the group to a power of two
    order = ["G", "L", "STRIDE", "SEL", "DK", "BLOCK_DK", "BLOCK_T", "BLOCK_C", "ST", "PRECISION", "MAX_SCORE",
             "BLOCK_G"]
    constants = {name: constants[name] for name in order}
    shared, regs, spills = resources(_topn_kernel, signature(constants), constants, warps, stages)
    by_shared, by_registers = programs_per_sm(shared, regs, warps)
    return (f"{'max' if max_score else 'sum':5} {block_t:7} {warps:6} {stages:6} {shared / 1024:10.1f} "
            f"{regs:10} {spills:7}  {by_shared:4} {by_registers:4}")


def main():
    print("score BLOCK_T  warps stages  shared KB  registers  spills  programs/SM by shared, by registers")
    for max_score in (False, True):  # the default as used (64 tokens, 4 warps, 3 stages) first
        for block_t, warps, stages in ((64, 4, 3), (64, 8, 3), (64, 4, 2), (128, 4, 3), (128, 8, 3)):
            print(row(block_t, warps, stages, max_score), flush=True)


if __name__ == "__main__":
    main()
