"""How many PyTorch operators and Triton launches one training step dispatches, NSA (the Triton kernels,
interpreted on CPU) against dense: a proxy, on the dev machine, for the host's share of a short step on a GPU,
where each operator costs a few microseconds of Python and dispatch and each launch some tens.

    python benchmarks/host-ops-count.py nsa 2      # attention, layers; about 12 minutes on 2 cores
    python benchmarks/host-ops-count.py dense 2    # seconds
    python benchmarks/host-ops-count.py nsa 2 frames  # and each operator charged to the innermost frame
                                                      # of this repository's code (file:function) that ran it

The proof model's NSA settings (l=16 d=8 l'=64 n=16 w=64, shared K/V, phi mean, compressed keys RoPE'd at
their blocks) at a small width (hidden 64, 4 query heads, 1 KV head, head dim 16), one 1K sequence of
256-token passkey samples attended alone, fp32, recompute off; step 2 is counted (the first may compile or
autotune). Counting pauses inside Triton kernels, whose interpreter dispatches operators of its own. The
run ends in a failed checkpoint save (the counting mode is still active then); step 2 is counted before.
Measured in benchmarks/kernels-notes.md, Session 18.
"""
import collections
import os
import socket
import sys
import tempfile
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # before any kernel is defined
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from torch.utils._python_dispatch import TorchDispatchMode
import triton.runtime.interpreter as interp
from nsa_dist.config import load_config
from nsa_dist.trainer import TrainingHooks, train

STATE = {"on": False, "paused": 0}
OPS = collections.Counter(); LAUNCHES = collections.Counter(); FRAMES = collections.Counter()
ROOT = str(Path(__file__).resolve().parents[1]) + os.sep
BY_FRAME = sys.argv[3:] == ["frames"]
if BY_FRAME:
    sys.argv = sys.argv[:3]


def innermost_frame() -> str:
    """file:function of the innermost frame of this repository's code (not this script, not the CPU redirect of
    nsa_dist/megatron_cpu.py, which sees every operator), or "(outside ...)": Megatron, torch, autograd."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if name.startswith(ROOT) and not name.startswith((ROOT + "benchmarks/", ROOT + ".venv/", ROOT + "nsa_dist/megatron_cpu.py")):
            return f"{name[len(ROOT):]}:{frame.f_code.co_name}"
        frame = frame.f_back
    return "(outside: autograd engine, optimizer, torch)"

class Count(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if STATE["on"] and not STATE["paused"]:
            OPS[str(func.overloadpacket.__name__)] += 1
            if BY_FRAME:
                FRAMES[innermost_frame()] += 1
        return func(*args, **(kwargs or {}))

original = interp.InterpretedFunction.run
def run(self, *args, grid, warmup, **kwargs):
    if STATE["on"] and not warmup:
        LAUNCHES[self.fn.__name__] += 1
    STATE["paused"] += 1
    try:
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)
    finally:
        STATE["paused"] -= 1
interp.InterpretedFunction.run = run

class Window(TrainingHooks):
    def __init__(self): self.n = 0
    def step(self, log):
        self.n += 1
        STATE["on"] = self.n == 1  # count step 2 only

with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
arguments = sys.argv[1:] + ["2"] * (len(sys.argv) == 2)
if len(arguments) != 2 or arguments[0] not in ("nsa", "dense") or not arguments[1].isdigit() or arguments[1] == "0":
    sys.exit(f"usage: python benchmarks/host-ops-count.py nsa|dense [layers]; got {' '.join(sys.argv[1:]) or 'nothing'}: "
             "give the attention, nsa or dense, and optionally a positive number of layers (default 2)")
attention, layers = arguments[0], int(arguments[1])
config = load_config(None, [
    f"model.num_layers={layers}", "model.hidden_size=64", "model.ffn_hidden_size=128", "model.num_query_heads=4",
    "model.num_kv_heads=1", "model.head_dim_k=16", "model.head_dim_v=16", "model.vocab_size=256",
    f"model.attention={attention}", "nsa.compress_block=16", "nsa.stride=8", "nsa.selection_block=64",
    "nsa.num_selected=16", "nsa.window=64", "nsa.kv=shared", "nsa.phi=mean", "nsa.compression_rope=blocks",
    "nsa.impl=triton", "training.device=cpu", "training.dtype=fp32", "training.recompute=false",
    "tracking.enabled=false", "data.source=synthetic", "data.documents=mask", "training.warmup_steps=1",
    "stages=[{name: s, seq_len: 1024, steps: 3, global_batch_size: 1, micro_batch_size: 1, "
    "mix: {source: 0.125, passkey: 0.875, task_min_length: 256, task_max_length: 256}}]",
    f"run.dir={tempfile.mkdtemp()}",
])
try:
    with Count():
        train(config, [Window()])
except Exception as error:  # the final checkpoint fails under the dispatch mode; step 2 is counted by then
    print("after counting:", type(error).__name__)
print(f"{attention}, {layers} layers: {sum(OPS.values())} aten ops, {sum(LAUNCHES.values())} Triton launches in one step")
print("  top ops:", OPS.most_common(25))
print("  launches:", dict(LAUNCHES))
if BY_FRAME:
    print("  by frame:")
    for frame, count in FRAMES.most_common(40):
        print(f"    {count:6d}  {frame}")
