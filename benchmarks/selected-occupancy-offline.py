"""Issue 11: what the selected-attention forward and dQ kernels use per program on an H100/H200 (sm_90a),
compiled offline on a CPU machine (no GPU needed): shared memory, registers and spills by ptxas, and how
many programs fit on a multiprocessor by each, for launch configs and key parts (BLOCK_K: the keys of a
64-token selection block taken per loop step). Shapes: head dims 128, bf16; G = 16 (the paper config),
then G = 4 with a program a token (rows padded to 16) against tiles of 4 tokens (TOKENS = 4, 16 rows),
and the forward with SLOT_LSE (each slot's log-sum-exp, for the selection alignment loss).

    env -u TRITON_INTERPRET python benchmarks/selected-occupancy-offline.py

(about 2 minutes on two CPU cores). A kernel that fits few programs per multiprocessor, waiting on its
K/V loads, is latency-bound; whether fitting more makes it faster is for the GPU sweep
(benchmarks/kernels-exp-sweep.py) to say.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernels.selected_attention.triton import (  # noqa: E402
    _selected_bwd_dq, _selected_bwd_dq_tokens, _selected_fwd, _selected_fwd_tokens,
)
from offline_compile import programs_per_sm, resources  # noqa: E402

SIZES = dict(DK=128, DV=128, BLOCK_S=64, BLOCK_DK=128, BLOCK_DV=128, BLOCK_N=16, PRECISION="tf32")


def kernel_and_constants(dq: bool, group: int, tokens: int, slot_lse: bool = False) -> tuple:
    if tokens == 1:
        constants = dict(SIZES, G=group, SEL=64, BLOCK_G=max(16, group), ROWS=False, KEYS_M=False)
        forward = dict(constants, SLOT_LSE=slot_lse)
        return (_selected_bwd_dq, constants) if dq else (_selected_fwd, forward)
    return (_selected_bwd_dq_tokens if dq else _selected_fwd_tokens), dict(SIZES, G=group, TT=tokens, HEADS=group)


def signature(dq: bool, tokens: int, constants: dict) -> dict:
    layout = ["block_idx", "doc_start"] if tokens == 1 else ["block_idx", "block_base", "block_start", "block_end"]
    outputs = ["o", "lse", "slot_lse", "rows"] if tokens == 1 else ["o", "lse"]
    dq_outputs = ["dq", "rows"] if tokens == 1 else ["dq"]
    pointers = ["q", "k", "v", "do", "lse", "delta", *layout, *dq_outputs] if dq else ["q", "k", "v", *layout, *outputs]
    types = {"lse": "*fp32", "delta": "*fp32", "slot_lse": "*fp32", "rows": "*i32", **{name: "*i32" for name in layout}}
    sig = {name: types.get(name, "*bf16") for name in pointers}
    sig.update({name: "i32" for name in ("T", "TK", "HQ", "HK", "NSEL", "q_start")})
    sig.update({name: "fp32" for name in (["scale_log2", "scale"] if dq else ["scale_log2"])})
    sig.update({name: "constexpr" for name in [*constants, "BLOCK_K"]})
    return sig


def kernel_resources(dq: bool, block_k: int, warps: int, stages: int, group: int = 16, tokens: int = 1,
                     slot_lse: bool = False) -> tuple[int, int, int]:
    """(shared bytes, registers a thread, spilled bytes) of one compile."""
    kernel, constants = kernel_and_constants(dq, group, tokens, slot_lse)
    return resources(kernel, signature(dq, tokens, constants), {**constants, "BLOCK_K": block_k}, warps, stages)


def row(dq: bool, group: int, tokens: int, warps: int, stages: int, block_k: int, slot_lse: bool = False) -> str:
    shared, regs, spills = kernel_resources(dq, block_k, warps, stages, group, tokens, slot_lse)
    by_shared, by_registers = programs_per_sm(shared, regs, warps)
    name = "dq" if dq else "fwd+sl" if slot_lse else "fwd"
    return (f"{name:6} {group:2} {tokens:6} {warps:6} {stages:6} {block_k:7} {shared / 1024:10.1f} "
            f"{regs:10} {spills:7}  {by_shared:4} {by_registers:4}")


def main():
    print("kernel  G tokens  warps stages BLOCK_K  shared KB  registers  spills  programs/SM by shared, by registers")
    for dq in (False, True):
        for warps, stages in ((2, 2), (2, 3), (4, 2), (4, 3)):
            for block_k in (64, 32, 16):
                print(row(dq, 16, 1, warps, stages, block_k), flush=True)
    for dq in (False, True):
        for tokens in (1, 4):
            for block_k in (64, 16):
                print(row(dq, 4, tokens, 2, 2, block_k), flush=True)
    # the forward writing each slot's log-sum-exp (the selection alignment loss's target), as used
    for block_k in (64, 32):
        print(row(False, 16, 1, 2, 2, block_k, slot_lse=True), flush=True)


if __name__ == "__main__":
    main()
