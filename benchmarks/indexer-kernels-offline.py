"""The indexer loss's kernels (kernels/block_selection/indexer_triton.py) compiled for an H100/H200
(sm_90a) on a machine without a GPU: do they compile at the proof's shapes, and what shared memory,
registers and spills they take. The interpreter accepts tile shapes a GPU rejects, so this is the check
before their first GPU run (session 47; run with TRITON_INTERPRET unset):

    python benchmarks/indexer-kernels-offline.py [tf32|ieee]

In session 47: tf32 (the kernels' setting) spills nothing (registers a thread: 66
target forward, 78 prediction forward, 127 prediction backward); ieee spills 5.7 KB in the prediction's
forward and 13.9 KB in its backward.

The proof's layer: l' = 64, head dim 64, one KV head; the target's queries are the model's 16 heads in
bf16, the prediction's the indexer's 4 in fp32 (its forward and its backward).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from offline_compile import resources  # noqa: E402

from kernels.block_selection.indexer_triton import BLOCK_M, FLOOR, _block_lse_bwd, _block_lse_fwd  # noqa: E402

PRECISION = sys.argv[1] if len(sys.argv) > 1 else "tf32"  # the fp32 dots' (bf16 ones ignore it); or ieee
CASES = [("target forward, 16 bf16 heads", _block_lse_fwd, "*bf16", 16),
         ("prediction forward, 4 fp32 heads", _block_lse_fwd, "*fp32", 4),
         ("prediction backward, 4 fp32 heads", _block_lse_bwd, "*fp32", 4)]

for name, kernel, q_type, heads in CASES:
    pointers = {"q": q_type, "k": "*bf16", "seen": "*i64", "lse": "*fp32"}
    if kernel is _block_lse_bwd:
        pointers.update(dlse="*fp32", dq=q_type)
    constexprs = {"HQ": heads, "HK": 1, "GQ": heads, "D": 64, "L": 64, "BLOCK_M": BLOCK_M, "BLOCK_L": 64,
                  "BLOCK_D": 64, "PRECISION": PRECISION}
    if kernel is _block_lse_fwd:
        constexprs["FLOOR"] = FLOOR
    signature = {**pointers, "scale": "fp32", "R": "i32", "NB": "i32", "S": "i32",
                 **{key: "constexpr" for key in constexprs}}
    shared, registers, spills = resources(kernel, signature, constexprs, warps=4, stages=2)
    print(f"{name:<36} shared {shared:>6} B  registers {registers:>3}  spilled {spills} B", flush=True)
