"""Compiles a Triton kernel for an H100/H200 (sm_90a) on a machine without a GPU and reads what ptxas
reports: shared memory, registers a thread and spilled bytes. Shared by the offline occupancy scripts
beside it (run them with TRITON_INTERPRET unset)."""

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

PTXAS = Path(triton.__file__).parent / "backends/nvidia/bin/ptxas"
SHARED_PER_SM = 228 * 1024  # bytes of shared memory a multiprocessor gives its programs (H100/H200)
REGISTERS_PER_SM = 65536


def use_kernels_root(parser: argparse.ArgumentParser, kernels_root: str | None, needed: str, example: str) -> None:
    """Puts the `kernels` package to compile first on sys.path, before the script imports it: this repository's,
    or with --kernels-root DIR another checkout's (`git archive <commit> kernels` unpacked in DIR), which must
    hold `needed` (a path under DIR, e.g. "kernels/range_attention.py"); example: a commit for the message."""
    if kernels_root and not (Path(kernels_root) / needed).exists():
        parser.error(f"--kernels-root {kernels_root}: no {needed} there; unpack a checkout's kernels into it "
                     f"first, e.g. `git archive {example} kernels | tar -x -C DIR`")
    sys.path.insert(0, kernels_root or str(Path(__file__).resolve().parents[1]))


# Kernel arguments by name, for signature_by_names: the int32 / fp32 tensors and the fp32 scales
POINTERS = {"lse": "*fp32", "delta": "*fp32", "lo": "*i32", "hi": "*i32", "qlo": "*i32", "qhi": "*i32",
            "block_idx": "*i32", "doc_start": "*i32", "rows": "*i32", "slot_lse": "*fp32", "dk_out": "*fp32", "dv_out": "*fp32",
            "dq_acc": "*fp32", "dk_acc": "*fp32", "dv_acc": "*fp32"}
FLOATS = ("scale_log2", "scale")


def signature_by_names(kernel, constants: dict) -> dict:
    """Each argument's type in the kernel's order: bf16 tensors, the int32 / fp32 tensors named in
    POINTERS, fp32 scales, int32 sizes, and the constants."""
    sig = {}
    for name in kernel.arg_names:
        if name in constants:
            sig[name] = "constexpr"
        elif name in POINTERS:
            sig[name] = POINTERS[name]
        elif name in FLOATS:
            sig[name] = "fp32"
        elif name in ("q", "k", "v", "o", "do", "dq"):
            sig[name] = "*bf16"
        else:
            sig[name] = "i32"
    return sig


def resources(kernel, signature: dict, constexprs: dict, warps: int, stages: int) -> tuple[int, int, int]:
    """(shared bytes, registers a thread, spilled bytes) of one sm_90a compile (compile_sm90)."""
    return compile_sm90(kernel, signature, constexprs, warps, stages)[:3]


def compile_sm90(kernel, signature: dict, constexprs: dict, warps: int, stages: int) -> tuple[int, int, int, str]:
    """(shared bytes, registers a thread, spilled bytes, PTX) of one sm_90a compile. signature: each argument's
    type ("*bf16", "i32", "fp32", "constexpr", ...), in the kernel's order; pointers are taken as 16-byte
    aligned, as PyTorch allocates them."""
    aligned = {(i,): [["tt.divisibility", 16]] for i, t in enumerate(signature.values()) if t.startswith("*")}
    source = ASTSource(kernel, signature, constexprs=constexprs, attrs=aligned)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": warps, "num_stages": stages})
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "kernel.ptx")
        Path(ptx).write_text(compiled.asm["ptx"])
        log = subprocess.run([PTXAS, "-arch=sm_90a", "-v", ptx, "-o", os.devnull], capture_output=True,
                             text=True, check=True).stderr
    spills = re.search(r"(\d+) bytes spill stores", log)
    registers = int(re.search(r"Used (\d+) registers", log).group(1))
    return compiled.metadata.shared, registers, int(spills.group(1)), compiled.asm["ptx"]


SASS_LINE = re.compile(r"\s+/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)(.*)")
LABEL = re.compile(r"\.(L_x_\d+):")


def sass(ptx: str) -> str:
    """The SASS listing of a compile_sm90 PTX (ptxas to a cubin, nvdisasm)."""
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "kernel.ptx").write_text(ptx)
        subprocess.run([PTXAS, "-arch=sm_90a", f"{tmp}/kernel.ptx", "-o", f"{tmp}/kernel.cubin"], check=True)
        return subprocess.run([PTXAS.parent / "nvdisasm", "-c", f"{tmp}/kernel.cubin"], capture_output=True,
                              text=True, check=True).stdout


def _counted(opcodes) -> dict[str, int]:
    counts = {"total": 0}
    for opcode in opcodes:
        counts["total"] += 1
        counts[opcode] = counts.get(opcode, 0) + 1
    return counts


def sass_counts(ptx: str) -> dict[str, int]:
    """SASS instructions of a compile_sm90 PTX, counted by opcode (predicates and modifiers dropped: "FFMA",
    "HGMMA", ...), with "total". Static counts: a loop's body counts once."""
    return _counted(found.group(1) for found in map(SASS_LINE.match, sass(ptx).splitlines()) if found)


def loop_counts(ptx: str) -> list[dict[str, int]]:
    """sass_counts of each loop body, in the order of the code: the instructions from a branch's target to the
    branch, for every branch back to an earlier label (a loop nested in another counts in both)."""
    opcodes, rests, labels = [], [], {}
    for line in sass(ptx).splitlines():
        label = LABEL.match(line.strip())
        if label:
            labels[label.group(1)] = len(opcodes)
        elif found := SASS_LINE.match(line):
            opcodes.append(found.group(1))
            rests.append(found.group(2))
    loops = []
    for end, (opcode, rest) in enumerate(zip(opcodes, rests)):
        target = re.search(r"L_x_\d+", rest) if opcode == "BRA" else None
        start = labels.get(target.group(0)) if target else None
        if start is not None and start <= end:
            loops.append(_counted(opcodes[start:end + 1]))
    return loops


def programs_per_sm(shared: int, registers: int, warps: int) -> tuple[int, int]:
    """How many programs fit on a multiprocessor by shared memory and by registers."""
    return SHARED_PER_SM // max(shared, 1), REGISTERS_PER_SM // (registers * 32 * warps)
