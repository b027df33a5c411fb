"""Issue 13: the exact score's top-n kernels (kernels/block_selection/triton.py) compiled offline for an H100/H200
(sm_90a) on a machine without a GPU, at the proof model's shapes (G = 16, D = 64, l' = 64, n = 16, 4 tokens of
16 heads a program, 4 warps, 2 stages): registers a thread, bytes spilled, and each loop body's SASS
instructions with its MUFU (exp2, log2) and FSEL (selects, the causal mask's) counts, in the order of the code.
For _topn_exact_one_pass_kernel: the unmasked blocks' step, the masked blocks' step, the merge loop and its
parts; for _topn_exact_kernel (the two-pass way's second pass): its block step inside its merge loop. Not a
timing (benchmarks/gpu_checks/exact_one_pass.sh times the ways against each other):

    env -u TRITON_INTERPRET python benchmarks/exact-offline.py

(about a minute on two CPU cores.) --kernels-root DIR compiles another checkout's kernels (`git archive <commit>
kernels`, unpacked in DIR; bb12bd1 and later have the one-pass kernel).
"""

import argparse

from offline_compile import compile_sm90, loop_counts, use_kernels_root

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--kernels-root", help="import `kernels` from this directory instead of the repository")
ARGS = parser.parse_args()
use_kernels_root(parser, ARGS.kernels_root, "kernels/block_selection", "bb12bd1")
import kernels.block_selection.triton as selection  # noqa: E402

TYPES = {"q": "*bf16", "k": "*bf16", "lse": "*fp32", "tiles": "*i64", "out": "*i32", "block_lse": "*fp32",
         "scale_log2": "fp32"}
CONSTANTS = dict(G=16, SEL=64, DK=64, BLOCK_DK=64, BLOCK_T=4, BLOCK_G=16, ST=16, PRECISION="tf32", SORTED_MERGE=True)


def main():
    for name in ("_topn_exact_kernel", "_topn_exact_one_pass_kernel"):
        kernel = getattr(selection, name, None)
        if kernel is None:
            print(f"{name}: not in these kernels")
            continue
        signature = {arg: "constexpr" if arg in CONSTANTS else TYPES.get(arg, "i32") for arg in kernel.arg_names}
        _, registers, spilled, ptx = compile_sm90(kernel, signature, CONSTANTS, 4, 2)
        loops = ", ".join(f"{loop['total']} ({loop.get('MUFU', 0)} MUFU, {loop.get('FSEL', 0)} FSEL)"
                          for loop in loop_counts(ptx) if loop["total"] > 1)
        print(f"{name}: {registers} registers, {spilled} B spilled; loop bodies: {loops}", flush=True)


if __name__ == "__main__":
    main()
