"""Issue 11: registers, shared memory and spills of selected attention's dK/dV kernel (_selected_bwd_dkv)
on an H100/H200 (sm_90a), compiled offline on a CPU machine (no GPU needed), for row tiles (BLOCK_M),
warps and stages at head dims 128 and 64 (G = 16, bf16), and of the kernel with the keys as the dots' M
(_selected_bwd_dkv_keys_m, BLOCK_M "N16" .. "N64": BLOCK_N rows, 1 to 4 tokens, a step; at N = 16 and D = 128
226 registers and no spill at 4 warps, at D = 64 114, four programs a multiprocessor). Candidates for the GPU sweep (benchmarks/kernels-exp-sweep.py,
"dkv"), not a timing:

    env -u TRITON_INTERPRET python benchmarks/selected-dkv-offline.py

(about 15 s on two CPU cores.)
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernels.selected_attention.triton import _selected_bwd_dkv, _selected_bwd_dkv_keys_m  # noqa: E402
from offline_compile import programs_per_sm, resources  # noqa: E402

# (BLOCK_M, warps, stages); the first is the launch in use (kernels/selected_attention/triton.py); BLOCK_M
# "N<rows>": LAUNCH["dkv"] KEYS_M with BLOCK_N = rows, the keys as the dots' M
LAUNCHES = [(64, 4, 2), (32, 4, 2), (16, 4, 2), (64, 8, 2), (32, 8, 2), (64, 4, 1), (32, 4, 1), (128, 8, 2),
            ("N16", 4, 2), ("N16", 4, 3), ("N16", 8, 2), ("N32", 4, 2), ("N32", 4, 3), ("N64", 4, 2), ("N64", 8, 2)]


def signature(constants: dict) -> dict:
    sig = {name: "*bf16" for name in ("q", "k", "v", "do")}
    sig.update(lse="*fp32", delta="*fp32", entries="*i32", seg_block="*i64", seg_lo="*i64", seg_hi="*i64",
               block_start="*i32", block_end="*i32", part_k="*fp32", part_v="*fp32")
    sig.update({name: "i32" for name in ("T", "TK", "HQ", "HK", "KB", "q_start")})
    sig.update(scale_log2="fp32", scale="fp32")
    sig.update({name: "constexpr" for name in constants})
    return sig


def main():
    print(f"{'D':>4} {'BLOCK_M':>7} {'warps':>5} {'stages':>6} {'shared KB':>9} {'registers':>9} {'spilled B':>9}  "
          "programs a multiprocessor by shared / by registers")
    for head_dim in (128, 64):
        for block_m, warps, stages in LAUNCHES:
            constants = dict(G=16, DK=head_dim, DV=head_dim, BLOCK_S=64, BLOCK_DK=head_dim, BLOCK_DV=head_dim,
                             PRECISION="tf32")
            if isinstance(block_m, str):
                kernel, tile = _selected_bwd_dkv_keys_m, dict(GROUP_P=16, BLOCK_N=int(block_m[1:]))
            else:
                kernel, tile = _selected_bwd_dkv, dict(BLOCK_M=block_m)
            constants.update(tile)
            shared, regs, spills = resources(kernel, signature(constants), constants, warps, stages)
            by_shared, by_registers = programs_per_sm(shared, regs, warps)
            print(f"{head_dim:>4} {block_m:>7} {warps:>5} {stages:>6} {shared / 1024:>9.1f} {regs:>9} {spills:>9}  "
                  f"{by_shared} / {by_registers}")


if __name__ == "__main__":
    main()
