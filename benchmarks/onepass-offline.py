"""Issue 11: the range attention's one-pass backward (kernels/range_attention.py, _range_attn_bwd_onepass)
compiled offline for an H100/H200 (sm_90a) on a machine without a GPU, at the autotuner's pick for the compressed
branch at D = 128 (64 rows x 128 keys, 8 warps, 3 stages; G = 16, bf16): shared memory, registers a thread,
bytes spilled, SASS instructions in all, and those of the unmasked step (the body of the kernel's second row
loop, the first over unmasked row tiles, which nearly every row tile takes), by opcode. One line per way the
kernel can take its rows (pointer loads; dQ by TMA bulk reductions, DQ_TMA; and lse / delta by TMA copies,
STATS_TMA), as far as the kernels compiled have them. Not a timing (benchmarks/gpu_checks/layer_ab.sh times a
kernel against the one before):

    env -u TRITON_INTERPRET python benchmarks/onepass-offline.py

(about half a minute a line on two CPU cores.) --split compiles the split backward's dK/dV kernel
(_range_attn_bwd_dkv, rows aligned as the window branch runs it) instead. --kernels-root DIR compiles another
checkout's kernel (`git archive <commit> kernels`, unpacked in DIR): before 93a6b62 the unmasked step also turned
lse to base 2 and scaled dS and dQ itself.
"""

import argparse
from pathlib import Path

from offline_compile import compile_sm90, loop_counts, sass_counts, signature_by_names, use_kernels_root

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--kernels-root", help="import `kernels` from this directory instead of the repository")
parser.add_argument("--split", action="store_true", help="the split backward's dK/dV kernel instead of the one pass")
ARGS = parser.parse_args()
use_kernels_root(parser, ARGS.kernels_root, "kernels/range_attention.py", "a4df9dc")
import kernels.range_attention as ra  # noqa: E402

SHOWN = ("HGMMA", "MUFU", "FFMA", "FMUL", "FSEL", "LDGSTS", "IMAD", "IADD3", "UIADD3", "ISETP")
WAYS = {"pointers": {}, "dq-reduce": {"DQ_TMA": True}, "dq-reduce+stats": {"DQ_TMA": True, "STATS_TMA": True}}
SPLIT_WAYS = {"pointers": {}, "stats": {"STATS_TMA": True}}


def main():
    kernel = ra._range_attn_bwd_dkv if ARGS.split else ra._range_attn_bwd_onepass
    ways = SPLIT_WAYS if ARGS.split else WAYS
    print(f"kernels from {Path(ra.__file__).parents[1]}; unmasked step: SASS of the second row loop's body")
    print(f"{'way':>16} {'shared KB':>9} {'registers':>9} {'spilled B':>9} {'SASS':>5} {'step':>5} "
          + " ".join(f"{name:>6}" for name in SHOWN))
    for way, flags in ways.items():
        if any(flag not in kernel.arg_names for flag in flags):
            continue  # an older kernel without this way
        constants = dict(G=16, DK=128, DV=128, BLOCK_DK=128, BLOCK_DV=128, BLOCK_M=64, BLOCK_N=128,
                         PRECISION="tf32", TMA=False)
        constants.update({flag: False for flag in ("DQ_TMA", "STATS_TMA") if flag in kernel.arg_names}, **flags)
        if ARGS.split:
            constants["ALIGNED_ROWS"] = True
        signature = {name: "i32" if name in ("T_BUCKET", "TK_BUCKET") else kind
                     for name, kind in signature_by_names(kernel, constants).items()}
        shared, registers, spilled, ptx = compile_sm90(kernel, signature, constants, 8, 3)
        step = loop_counts(ptx)[1]  # the first loop takes the masked row tiles before the unmasked ones
        print(f"{way:>16} {shared / 1024:>9.1f} {registers:>9} {spilled:>9} {sass_counts(ptx)['total']:>5} "
              f"{step['total']:>5} " + " ".join(f"{step.get(name, 0):>6}" for name in SHOWN), flush=True)


if __name__ == "__main__":
    main()
