"""Issue 11: the kernels that can copy their tiles through TMA descriptors, compiled offline for an H100/H200
(sm_90a) on a machine without a GPU, pointer loads against TMA: that the GPU compiler takes the TMA
path (ptxas builds it, and its PTX holds the bulk tensor copies), and the registers, shared memory and
spills of each (G = 16, bf16, head dims 128 and 64). Not a timing (benchmarks/gpu_checks/tma_check.sh):

    env -u TRITON_INTERPRET python benchmarks/tma-offline.py

(about 20 s on two CPU cores.) With --hashes it prints, per pointer-path launch, a hash of its PTX
without debug lines instead; --kernels-root takes the kernels from another checkout (one from before
the TMA path, whose kernels have no TMA argument, included), so that two commits' pointer paths can be
compared: the TMA path's commits left them unchanged.
"""

import argparse
import hashlib
import re
import sys
from pathlib import Path

ARGS = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ARGS.add_argument("--hashes", action="store_true", help="PTX hashes of the pointer-path launches only")
ARGS.add_argument("--kernels-root", default=str(Path(__file__).resolve().parents[1]),
                  help="import `kernels` from this checkout")
ARGS = ARGS.parse_args()
sys.path.insert(0, ARGS.kernels_root)
sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernels.range_attention as ra  # noqa: E402
import kernels.selected_attention.triton as selected  # noqa: E402
from offline_compile import compile_sm90, programs_per_sm, signature_by_names  # noqa: E402

def cases(head_dim: int):
    """(name, kernel, constants, warps, stages): the launches in use (range: the autotuner's configs at head
    dims <= 128; selected: 2 warps, 2 stages, whole 64-key blocks), each without and with TMA."""
    dims = dict(DK=head_dim, DV=head_dim, BLOCK_DK=head_dim, BLOCK_DV=head_dim, PRECISION="tf32")
    for name in ("fwd", "dq", "dkv", "onepass"):
        for config in ra._CONFIGS[name][0]:
            for tma in (False, True):
                constants = dict(G=16, **dims, **config.kwargs, TMA=tma)
                # the kernels' constexpr arguments with defaults, at them (left out, they would compile as
                # int32 arguments)
                constants.update({"fwd": dict(LSE_ONLY=False), "dkv": dict(ALIGNED_ROWS=False)}.get(name, {}))
                tiles = f"{config.kwargs['BLOCK_M']}x{config.kwargs['BLOCK_N']}"
                yield f"range {name} {tiles}", ra._KERNELS[name], constants, config.num_warps, config.num_stages
    for name, kernel in (("fwd", selected._selected_fwd), ("dq", selected._selected_bwd_dq)):
        for tma in (False, True):
            constants = dict(G=16, SEL=64, BLOCK_G=16, BLOCK_S=64, BLOCK_N=16, BLOCK_K=64, TMA=tma, ROWS=False,
                             KEYS_M=False, **dims)
            if name == "fwd":
                constants["SLOT_LSE"] = False
            yield f"selected {name}", kernel, constants, 2, 2


def ptx_hash(ptx: str) -> str:
    """A hash of the PTX's code: without the debug sections, line markers, labels' names and comments."""
    code = ptx.split(".section\t.debug")[0]
    lines = [re.sub(r"//.*", "", line).rstrip() for line in code.splitlines()]
    kept = [line for line in lines if line.strip() and not line.strip().startswith((".loc", ".file", "$L__"))]
    return hashlib.sha1("\n".join(kept).encode()).hexdigest()[:12]


def hashes() -> None:
    print(f"kernels from {Path(ra.__file__).resolve().parents[1]}")
    for head_dim in (128, 64):
        for name, kernel, constants, warps, stages in cases(head_dim):
            if constants["TMA"]:
                continue
            for flag in ("TMA", "ROWS", "KEYS_M"):  # a checkout from before the TMA path, row lists or KEYS_M
                if flag in constants and flag not in kernel.arg_names:
                    del constants[flag]
            ptx = compile_sm90(kernel, signature_by_names(kernel, constants), constants, warps, stages)[3]
            print(f"{head_dim:>4} {name:<22} w{warps} s{stages} {ptx_hash(ptx)}")


def main():
    if ARGS.hashes:
        hashes()
        return
    print(f"{'D':>4} {'kernel':<22} {'TMA':>5} {'warps':>5} {'stages':>6} {'shared KB':>9} {'registers':>9} "
          f"{'spilled B':>9} {'bulk copies':>11}  programs a multiprocessor by shared / by registers")
    for head_dim in (128, 64):
        for name, kernel, constants, warps, stages in cases(head_dim):
            shared, regs, spills, ptx = compile_sm90(kernel, signature_by_names(kernel, constants), constants, warps, stages)
            copies = ptx.count("cp.async.bulk.tensor")
            by_shared, by_registers = programs_per_sm(shared, regs, warps)
            print(f"{head_dim:>4} {name:<22} {str(constants['TMA']):>5} {warps:>5} {stages:>6} {shared / 1024:>9.1f} "
                  f"{regs:>9} {spills:>9} {copies:>11}  {by_shared} / {by_registers}")


if __name__ == "__main__":
    main()
