"""Issue 11: what the selected-attention forward and dQ kernels use per program on an H100/H200 (sm_90a),
compiled offline on a CPU machine (no GPU needed): shared memory, registers and spills by ptxas, and how
many programs fit on a multiprocessor by each, for launch configs and key parts (BLOCK_K: the keys of a
64-token selection block taken per loop step). Shapes: head dims 128, bf16; G = 16 (the paper config),
then G = 4 with a program a token (rows padded to 16) against tiles of 4 tokens (TOKENS = 4, 16 rows).

    env -u TRITON_INTERPRET python benchmarks/selected-occupancy-offline.py

(about 2 minutes on two CPU cores). A kernel that fits few programs per multiprocessor, waiting on its
K/V loads, is latency-bound; whether fitting more makes it faster is for the GPU sweep
(benchmarks/kernels-exp-sweep.py) to say.
"""

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernels.selected_attention.triton import (  # noqa: E402
    _selected_bwd_dq, _selected_bwd_dq_tokens, _selected_fwd, _selected_fwd_tokens,
)

PTXAS = Path(triton.__file__).parent / "backends/nvidia/bin/ptxas"
SHARED_PER_SM = 228 * 1024  # bytes of shared memory a multiprocessor gives its programs (H100/H200)
REGISTERS_PER_SM = 65536
SIZES = dict(DK=128, DV=128, BLOCK_S=64, BLOCK_DK=128, BLOCK_DV=128, BLOCK_N=16, PRECISION="tf32")


def kernel_and_constants(dq: bool, group: int, tokens: int) -> tuple:
    if tokens == 1:
        return (_selected_bwd_dq if dq else _selected_fwd), dict(SIZES, G=group, SEL=64, BLOCK_G=max(16, group))
    return (_selected_bwd_dq_tokens if dq else _selected_fwd_tokens), dict(SIZES, G=group, TT=tokens, HEADS=group)


def signature(dq: bool, tokens: int, constants: dict) -> dict:
    layout = ["block_idx", "doc_start"] if tokens == 1 else ["block_idx", "block_base", "block_start", "block_end"]
    pointers = ["q", "k", "v", "do", "lse", "delta", *layout, "dq"] if dq else ["q", "k", "v", *layout, "o", "lse"]
    types = {"lse": "*fp32", "delta": "*fp32", **{name: "*i32" for name in layout}}
    sig = {name: types.get(name, "*bf16") for name in pointers}
    sig.update({name: "i32" for name in ("T", "TK", "HQ", "HK", "NSEL", "q_start")})
    sig.update({name: "fp32" for name in (["scale_log2", "scale"] if dq else ["scale_log2"])})
    sig.update({name: "constexpr" for name in [*constants, "BLOCK_K"]})
    return sig


def resources(dq: bool, block_k: int, warps: int, stages: int, group: int = 16,
              tokens: int = 1) -> tuple[int, int, int]:
    """(shared bytes, registers a thread, spilled bytes) of one compile."""
    kernel, constants = kernel_and_constants(dq, group, tokens)
    sig = signature(dq, tokens, constants)
    aligned = {(i,): [["tt.divisibility", 16]] for i, t in enumerate(sig.values()) if t.startswith("*")}
    source = ASTSource(kernel, sig, constexprs={**constants, "BLOCK_K": block_k}, attrs=aligned)
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": warps, "num_stages": stages})
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "kernel.ptx")
        Path(ptx).write_text(kernel.asm["ptx"])
        log = subprocess.run([PTXAS, "-arch=sm_90a", "-v", ptx, "-o", os.devnull], capture_output=True,
                             text=True, check=True).stderr
    spills = re.search(r"(\d+) bytes spill stores", log)
    return kernel.metadata.shared, int(re.search(r"Used (\d+) registers", log).group(1)), int(spills.group(1))


def row(dq: bool, group: int, tokens: int, warps: int, stages: int, block_k: int) -> str:
    shared, regs, spills = resources(dq, block_k, warps, stages, group, tokens)
    return (f"{'dq' if dq else 'fwd':6} {group:2} {tokens:6} {warps:6} {stages:6} {block_k:7} {shared / 1024:10.1f} "
            f"{regs:10} {spills:7}  {SHARED_PER_SM // max(shared, 1):4} {REGISTERS_PER_SM // (regs * 32 * warps):4}")


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


if __name__ == "__main__":
    main()
