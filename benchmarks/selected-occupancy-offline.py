"""Issue 11: what the selected-attention forward and dQ kernels use per program on an H100/H200 (sm_90a),
compiled offline on a CPU machine (no GPU needed): shared memory, registers and spills by ptxas, and how
many programs fit on a multiprocessor by each, for launch configs and key parts (BLOCK_K: the keys of a
64-token selection block taken per loop step). Shapes: G = 16, head dims 128, bf16 (the paper config).

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
from kernels.selected_attention.triton import _selected_bwd_dq, _selected_fwd  # noqa: E402

PTXAS = Path(triton.__file__).parent / "backends/nvidia/bin/ptxas"
SHARED_PER_SM = 228 * 1024  # bytes of shared memory a multiprocessor gives its programs (H100/H200)
REGISTERS_PER_SM = 65536
CONSTS = dict(G=16, SEL=64, DK=128, DV=128, BLOCK_G=16, BLOCK_S=64, BLOCK_DK=128, BLOCK_DV=128, BLOCK_N=16,
              PRECISION="tf32")


def signature(dq: bool) -> dict:
    pointers = ["q", "k", "v", "do", "lse", "delta", "block_idx", "doc_start", "dq"] if dq else \
        ["q", "k", "v", "block_idx", "doc_start", "o", "lse"]
    types = {"lse": "*fp32", "delta": "*fp32", "block_idx": "*i32", "doc_start": "*i32"}
    sig = {name: types.get(name, "*bf16") for name in pointers}
    sig.update({name: "i32" for name in ("T", "TK", "HQ", "HK", "NSEL", "q_start")})
    sig.update({name: "fp32" for name in (["scale_log2", "scale"] if dq else ["scale_log2"])})
    sig.update({name: "constexpr" for name in [*CONSTS, "BLOCK_K"]})
    return sig


def resources(dq: bool, block_k: int, warps: int, stages: int) -> tuple[int, int, int]:
    """(shared bytes, registers a thread, spilled bytes) of one compile."""
    sig = signature(dq)
    aligned = {(i,): [["tt.divisibility", 16]] for i, t in enumerate(sig.values()) if t.startswith("*")}
    source = ASTSource(_selected_bwd_dq if dq else _selected_fwd, sig, constexprs={**CONSTS, "BLOCK_K": block_k},
                       attrs=aligned)
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": warps, "num_stages": stages})
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "kernel.ptx")
        Path(ptx).write_text(kernel.asm["ptx"])
        log = subprocess.run([PTXAS, "-arch=sm_90a", "-v", ptx, "-o", os.devnull], capture_output=True,
                             text=True, check=True).stderr
    spills = re.search(r"(\d+) bytes spill stores", log)
    return kernel.metadata.shared, int(re.search(r"Used (\d+) registers", log).group(1)), int(spills.group(1))


def main():
    print("kernel  warps stages BLOCK_K  shared KB  registers  spills  programs/SM by shared, by registers")
    for dq in (False, True):
        for warps, stages in ((2, 2), (2, 3), (4, 2), (4, 3)):
            for block_k in (64, 32, 16):
                shared, regs, spills = resources(dq, block_k, warps, stages)
                print(f"{'dq' if dq else 'fwd':6} {warps:6} {stages:6} {block_k:7} {shared / 1024:10.1f} {regs:10} "
                      f"{spills:7}  {SHARED_PER_SM // max(shared, 1):4} {REGISTERS_PER_SM // (regs * 32 * warps):4}",
                      flush=True)


if __name__ == "__main__":
    main()
