"""Issue 11: the sm_90a SASS of selected attention's dK/dV kernel one token a step with the keys as the dots' M, at
its GPU default launch for groups of 16 (4 warps, 3 stages; bf16), compiled offline on a CPU machine, the kernel's
name left out, one instruction a line. Written for this repository's kernels or, with --kernels-root, another
commit's (at 2929fbc the kernel was _selected_bwd_dkv_by_token), so that two builds can be compared line by line:

    git archive 2929fbc kernels | tar -x -C /tmp/k2929
    env -u TRITON_INTERPRET python benchmarks/selected-dkv-sass.py --kernels-root /tmp/k2929 --out /tmp/old.sass
    env -u TRITON_INTERPRET python benchmarks/selected-dkv-sass.py --out /tmp/new.sass
    diff /tmp/old.sass /tmp/new.sass && echo same

(about 20 s a head dim.) At c9a97eb both head dims (--head-dim 128, 64) gave 2929fbc's SASS
(benchmarks/gpu_checks/dkv_keys_m/sass-compare-c9a97eb.txt).
"""

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from offline_compile import POINTERS, compile_sm90, sass, use_kernels_root  # noqa: E402

SASS_INSTRUCTION = re.compile(r"\s+/\*[0-9a-f]{4,}\*/\s+(.*?);")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kernels-root", help="a directory holding another commit's kernels/ (git archive)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--out", required=True, help="file for the SASS listing")
    args = p.parse_args()
    use_kernels_root(p, args.kernels_root, "kernels/selected_attention/triton.py", "2929fbc")
    import kernels.selected_attention.triton as selected

    d = args.head_dim
    constants = dict(G=16, DK=d, DV=d, BLOCK_S=64, BLOCK_DK=d, BLOCK_DV=d, PRECISION="tf32")
    if hasattr(selected, "_selected_bwd_dkv_keys_m"):
        kernel = selected._selected_bwd_dkv_keys_m
        constants.update(GROUP_P=16, BLOCK_N=16)
    else:
        kernel = selected._selected_bwd_dkv_by_token
        constants.update(BLOCK_G=16)
    signature = {name: "constexpr" if name in constants else POINTERS.get(name, "*bf16") for name in kernel.arg_names}
    signature.update({name: "*i32" for name in ("entries", "block_start", "block_end")})
    signature.update({name: "*i64" for name in ("seg_block", "seg_lo", "seg_hi")})
    signature.update(part_k="*fp32", part_v="*fp32", scale_log2="fp32", scale="fp32")
    signature.update({name: "i32" for name in ("T", "TK", "HQ", "HK", "KB", "q_start")})
    ptx = compile_sm90(kernel, signature, constants, 4, 3)[3]
    lines = [found.group(1).replace(kernel.__name__, "KERNEL") for found in map(SASS_INSTRUCTION.match,
                                                                                sass(ptx).splitlines()) if found]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"{kernel.__name__}, D = {d}: {len(lines)} SASS instructions -> {args.out}")


if __name__ == "__main__":
    main()
