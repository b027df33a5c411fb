"""Issue 11: top-n's kernel (kernels/block_selection/triton.py, _topn_kernel) compiled offline for an H100/H200
(sm_90a) on a machine without a GPU, at the paper config as tools/bench_kernels.py launches it (G = 16,
D = 128, l = 32, d = 16, l' = 64, n = 16, 64 query tokens a program, 3 stages, 2 key splits; the "max" score
without splits), with the scores spread by runs (SPREAD_RUNS, the default where l' / d is a power of two) and
by the [ST R, ST] product: the shared memory, registers a thread, bytes spilled and SASS instructions
(static counts: a loop's body once; FFMA, the float multiply-adds, carry the product's 512 a thread and step).
Not a timing (benchmarks/gpu_checks/topn_spread_ab.sh times the kernel against the one before):

    env -u TRITON_INTERPRET python benchmarks/topn-offline.py

(about a minute on two CPU cores.) --kernels-root DIR compiles another checkout's kernel (`git archive <commit>
kernels`, unpacked in DIR); one from before SPREAD_RUNS (b3148a9 and earlier) has the product only.
"""

import argparse
from pathlib import Path

from offline_compile import compile_sm90, sass_counts, use_kernels_root

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--kernels-root", help="import `kernels` from this directory instead of the repository")
ARGS = parser.parse_args()
use_kernels_root(parser, ARGS.kernels_root, "kernels/block_selection", "b3148a9")
import kernels.block_selection.triton as selection  # noqa: E402

TYPES = {"q": "*bf16", "k_cmp": "*bf16", "lse": "*fp32", "tiles": "*i64", "out": "*i32", "part": "*i64",
         "scale_log2": "fp32"}


def main():
    kernel = selection._topn_kernel
    spreads = (True, False) if "SPREAD_RUNS" in kernel.arg_names else (False,)
    print(f"kernels from {Path(selection.__file__).parents[1]}")
    print(f"{'score':>5} {'spread':>7} {'warps':>5} {'shared KB':>9} {'registers':>9} {'spilled B':>9} "
          f"{'SASS':>5} {'FFMA':>5} {'MUFU':>5}")
    for score in ("sum", "max"):
        for runs in spreads:
            for warps in (4, 8):
                constants = dict(G=16, L=32, STRIDE=16, SEL=64, DK=128, BLOCK_DK=128, BLOCK_T=selection.BLOCK_T,
                                 BLOCK_C=64, ST=16, PRECISION="tf32", MAX_SCORE=score == "max", BLOCK_G=16,
                                 SPLITS=1 if score == "max" else 2, CARRY_C=16, SORTED_MERGE=True)
                if "SPREAD_RUNS" in kernel.arg_names:
                    constants["SPREAD_RUNS"] = runs
                signature = {name: "constexpr" if name in constants else TYPES.get(name, "i32")
                             for name in kernel.arg_names}
                shared, regs, spills, ptx = compile_sm90(kernel, signature, constants, warps, 3)
                sass = sass_counts(ptx)
                print(f"{score:>5} {'runs' if runs else 'product':>7} {warps:>5} {shared / 1024:>9.1f} {regs:>9} "
                      f"{spills:>9} {sass['total']:>5} {sass.get('FFMA', 0):>5} {sass.get('MUFU', 0):>5}", flush=True)


if __name__ == "__main__":
    main()
