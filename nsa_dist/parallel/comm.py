"""Autograd-aware communication for sequence-sharded NSA, with byte accounting.

- `exchange_halo`: each chunk receives the tail of the chunk before it by point-to-point; the backward
  sends the halo's gradient back to its owner.
- `ZigzagGather`: all-gathers a zigzag-sharded tensor into global sequence order; the backward
  reduce-scatters the gradient (every rank used the whole gathered tensor) back to the owners, in fp32.
  It starts when constructed and is finished later (`finish`), so the gather overlaps compute.
- `DeferredReduceScatter`: gathers whose backward reduce-scatter runs in the background, waited for only
  when autograd reaches the gathered tensor's producer, so it overlaps the backward of later work.
Every wait on communication is timed into CommStats: what the overlap leaves exposed.
"""

import time
import weakref
from collections import defaultdict
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from nsa_dist.parallel.layout import ZigzagLayout

# torch 2.13 renames the *_into_tensor / *_tensor collectives; 2.11 (the GPU image) has only the old names.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclass
class CommStats:
    """Bytes this rank sent and received, per collective. Ring all-gather / reduce-scatter move
    (P-1)/P of the full tensor through every rank, which is what is recorded for them."""

    sent: dict = field(default_factory=lambda: defaultdict(int))
    received: dict = field(default_factory=lambda: defaultdict(int))
    # bytes a transfer of only what was used would have moved (e.g. the selected remote blocks)
    needed: dict = field(default_factory=lambda: defaultdict(int))
    # seconds spent waiting on each collective (CPU); CUDA waits are (name, start, end) events read later
    exposed: dict = field(default_factory=lambda: defaultdict(float))
    exposed_events: list = field(default_factory=list)

    def add(self, name: str, sent: int, received: int) -> None:
        self.sent[name] += sent
        self.received[name] += received

    @contextmanager
    def waiting(self, name: str, device: torch.device):
        """Times the wait inside the block: the communication that overlap did not hide. On CUDA a wait
        makes the compute stream wait for the communication stream, so the stall is the time between
        events recorded on the compute stream before and after it; on CPU it is the wall time."""
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.exposed_events.append((name, start, end))
        else:
            began = time.perf_counter()
            yield
            self.exposed[name] += time.perf_counter() - began

    def exposed_seconds(self) -> dict:
        """Seconds of exposed communication per collective (synchronizes CUDA to read its events)."""
        if self.exposed_events:
            torch.cuda.synchronize()
            for name, start, end in self.exposed_events:
                self.exposed[name] += start.elapsed_time(end) / 1e3
            self.exposed_events.clear()
        return dict(self.exposed)

    def total(self) -> dict:
        return {"sent": sum(self.sent.values()), "received": sum(self.received.values())}

    def as_metrics(self, prefix: str = "comm") -> dict:
        metrics = {f"{prefix}/{name}/sent_bytes": v for name, v in self.sent.items()}
        metrics |= {f"{prefix}/{name}/received_bytes": v for name, v in self.received.items()}
        metrics |= {f"{prefix}/{name}/needed_bytes": v for name, v in self.needed.items()}
        metrics |= {f"{prefix}/{name}/exposed_s": v for name, v in self.exposed_seconds().items()}
        return metrics


# process group -> (size, this process's rank in it); weak, so that a destroyed group is not kept alive
_SIZE_RANK: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def group_size_rank(group) -> tuple[int, int]:
    """(size, this process's rank) of `group`; (1, 0) for None or without torch.distributed. Kept per group
    (a group's size and ranks never change): every NSA layer asks, and at the proof's 2K stage NSA's step
    waits on its host (cProfile put torch.distributed's lookups at about 0.3 ms a call)."""
    if group is None:
        return 1, 0
    known = _SIZE_RANK.get(group)
    if known is not None:
        return known
    if not dist.is_initialized():
        return 1, 0
    _SIZE_RANK[group] = known = (dist.get_world_size(group), dist.get_rank(group))
    return known


def _nbytes(x: torch.Tensor) -> int:
    return x.numel() * x.element_size()


# ------------------------------------------------------------------------------------ left halo


def _swap_with_neighbours(to_next, to_prev, layout: ZigzagLayout, group, stats, name):
    """Rank r sends `to_next` to r+1 and `to_prev` to r-1 (where those ranks exist), and receives the
    matching tensors, all of to_next's shape: returns (from r-1 or None on rank 0, from r+1 or None on the
    last rank). The halo goes forward with (first tail, second tail); its gradient comes back with
    (second halo's grad, first halo's grad)."""
    p, r = layout.cp_size, layout.cp_rank
    from_prev = torch.empty_like(to_next) if r > 0 else None
    from_next = torch.empty_like(to_next) if r < p - 1 else None
    ops = []
    if r < p - 1:
        ops.append(dist.P2POp(dist.isend, to_next.contiguous(), dist.get_global_rank(group, r + 1), group))
        ops.append(dist.P2POp(dist.irecv, from_next, dist.get_global_rank(group, r + 1), group))
    if r > 0:
        ops.append(dist.P2POp(dist.isend, to_prev.contiguous(), dist.get_global_rank(group, r - 1), group))
        ops.append(dist.P2POp(dist.irecv, from_prev, dist.get_global_rank(group, r - 1), group))
    if ops:
        works = dist.batch_isend_irecv(ops)
        with stats.waiting(name, to_next.device) if stats is not None else nullcontext():
            for work in works:
                work.wait()
    if stats is not None:
        moved = ((r > 0) + (r < p - 1)) * _nbytes(to_next)
        stats.add(name, moved, moved)
    return from_prev, from_next


class _HaloExchange(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, halo, layout, group, stats):
        # x: [B, 2C, ...] local shard. Returns the halos of the first and second local chunk,
        # [B, h1, ...] and [B, halo, ...] (h1 = 0 on rank 0, whose first chunk starts the sequence).
        ctx.halo, ctx.layout, ctx.group, ctx.stats = halo, layout, group, stats
        c = layout.chunk_len
        first_tail, second_tail = x[:, c - halo : c], x[:, 2 * c - halo :]
        if layout.cp_size == 1:
            return x[:, :0].clone(), first_tail.clone()
        # rank r's first chunk follows rank r-1's first chunk; its second chunk follows rank r+1's second
        from_prev, from_next = _swap_with_neighbours(first_tail, second_tail, layout, group, stats, "halo")
        first_halo = from_prev if from_prev is not None else x[:, :0].clone()
        # the last rank's second chunk follows its own first chunk
        second_halo = from_next if from_next is not None else first_tail.clone()
        return first_halo, second_halo

    @staticmethod
    def backward(ctx, grad_first, grad_second):
        layout, halo, c = ctx.layout, ctx.halo, ctx.layout.chunk_len
        grad = grad_second.new_zeros(grad_second.shape[0], 2 * c, *grad_second.shape[2:])
        last = layout.cp_rank == layout.cp_size - 1
        if last:  # its second halo was its own first tail
            grad[:, c - halo : c] += grad_second
        if layout.cp_size == 1:
            return grad, None, None, None, None
        # each halo's gradient goes back to the rank it came from (rank 0 has no first halo to return)
        to_prev = grad_first if layout.cp_rank > 0 else grad_second
        second_tail_grad, first_tail_grad = _swap_with_neighbours(
            grad_second, to_prev, layout, ctx.group, ctx.stats, "halo_grad")
        if first_tail_grad is not None:
            grad[:, c - halo : c] += first_tail_grad
        if second_tail_grad is not None:
            grad[:, 2 * c - halo :] += second_tail_grad
        return grad, None, None, None, None


def exchange_halo(x: torch.Tensor, halo: int, layout: ZigzagLayout, group, stats: CommStats | None = None):
    """x: [B, 2C, ...] local zigzag shard -> (halo of the first chunk, halo of the second chunk).

    The first is [B, 0, ...] on rank 0 (its first chunk starts the sequence), else [B, halo, ...]."""
    return _HaloExchange.apply(x, halo, layout, group, stats)


# ----------------------------------------------------------------------------- zigzag all-gather


def _to_global_order(gathered: torch.Tensor, cp_size: int) -> torch.Tensor:
    """[P * B, 2C, ...] rank-major (rank r: chunks r, 2P-1-r) -> [B, 2PC, ...] in sequence order."""
    per_rank = gathered.chunk(cp_size, dim=0)
    halves = [x.chunk(2, dim=1) for x in per_rank]
    return torch.cat([h[0] for h in halves] + [h[1] for h in reversed(halves)], dim=1)


def _to_rank_order(full: torch.Tensor, cp_size: int) -> torch.Tensor:
    """Inverse of _to_global_order: [B, 2PC, ...] -> [P * B, 2C, ...]."""
    chunks = full.chunk(2 * cp_size, dim=1)
    return torch.cat([torch.cat([chunks[r], chunks[2 * cp_size - 1 - r]], dim=1) for r in range(cp_size)], dim=0)


class _ZigzagGathered(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gathered, token, group, cp_size, stats, name, deferred):
        ctx.group, ctx.cp_size, ctx.stats, ctx.name, ctx.deferred = group, cp_size, stats, name, deferred
        return _to_global_order(gathered, cp_size)

    @staticmethod
    def backward(ctx, grad_full):
        # every rank's partial gradient is summed in fp32, as one rank's kernels sum it, then rounded once
        wide = torch.promote_types(grad_full.dtype, torch.float32)
        ranked = _to_rank_order(grad_full.to(wide), ctx.cp_size).contiguous()
        grad = ranked.new_empty(ranked.shape[0] // ctx.cp_size, *ranked.shape[1:])
        if ctx.stats is not None:
            moved = (ctx.cp_size - 1) * _nbytes(grad)
            ctx.stats.add(f"{ctx.name}_grad", moved, moved)
        if ctx.deferred is not None:  # started here, waited for by the DeferredReduceScatter's source
            holder, index = ctx.deferred
            if ctx.cp_size > 1:
                work = _reduce_scatter(grad, ranked, group=ctx.group, async_op=True)
            else:  # one rank owns the whole gradient
                work, grad = None, ranked
            holder.pending.append((index, work, grad, ranked))
            return None, None, grad.new_zeros(()), None, None, None, None, None
        with ctx.stats.waiting(f"{ctx.name}_grad", grad.device) if ctx.stats is not None else nullcontext():
            _reduce_scatter(grad, ranked, group=ctx.group)  # blocking in backward: all of it is exposed
        return grad.to(grad_full.dtype), None, None, None, None, None, None, None


class ZigzagGather:
    """All-gather of a zigzag shard [B, 2C, ...] into the global sequence [B, 2PC, ...], started now and
    finished by `finish()`; the backward reduce-scatters the gradient to the owners (in the background
    when made by DeferredReduceScatter.gather)."""

    def __init__(self, x: torch.Tensor, group, stats: CommStats | None = None, name: str = "gather",
                 deferred: tuple["DeferredReduceScatter", tuple] | None = None):
        self.x, self.group, self.stats, self.name, self.deferred = x, group, stats, name, deferred
        self.cp_size, _ = group_size_rank(group)
        local = x.detach().contiguous()
        self.buffer = local.new_empty(self.cp_size * local.shape[0], *local.shape[1:])
        self.work = _all_gather(self.buffer, local, group=group, async_op=True) if self.cp_size > 1 else None
        if self.work is None:
            self.buffer.copy_(local)
        if stats is not None and self.cp_size > 1:
            moved = (self.cp_size - 1) * _nbytes(local)
            stats.add(name, moved, moved)

    def finish(self) -> torch.Tensor:
        if self.work is not None:
            with self.stats.waiting(self.name, self.buffer.device) if self.stats is not None else nullcontext():
                self.work.wait()
            self.work = None  # gloo's work holds the buffers; let it go now, not at interpreter exit
        token = self.deferred[0].token if self.deferred is not None else None
        return _ZigzagGathered.apply(self.x, self.buffer, token, self.group, self.cp_size, self.stats, self.name,
                                     self.deferred)


class _DeferredSource(torch.autograd.Function):
    """x unchanged, and a scalar token that every deferred gather of x takes as an input: autograd runs
    this node's backward only after all of those gathers' backwards, which started the reduce-scatters."""

    @staticmethod
    def forward(ctx, x, holder):
        ctx.holder, ctx.shape, ctx.dtype, ctx.device = holder, x.shape, x.dtype, x.device
        ctx.set_materialize_grads(False)
        return x.view_as(x), x.new_zeros(())

    @staticmethod
    def backward(ctx, grad_x, grad_token):
        holder = ctx.holder
        wide = torch.promote_types(ctx.dtype, torch.float32)
        grad = torch.zeros(ctx.shape, dtype=wide, device=ctx.device) if grad_x is None else grad_x.to(wide)
        stats = holder.stats
        for index, work, part, _ in holder.pending:
            if work is not None:
                with stats.waiting(f"{holder.name}_grad", part.device) if stats is not None else nullcontext():
                    work.wait()
            grad[index] += part
        holder.pending.clear()  # the reduce-scatters' buffers with them
        return grad.to(ctx.dtype), None


class DeferredReduceScatter:
    """Zigzag gathers of (slices of) x whose backward reduce-scatters run in the background.

    Gathers made by `gather` start their gradient's reduce-scatter and return at once; the gradient of x
    is assembled, after waiting for them, by the autograd node that made `source`. That node was created
    before the work that follows the gathers, and autograd runs later-created nodes first, so the
    backward of that later work (for NSA: the compressed branch, the halos) runs while the reduce-scatters
    are in flight. The exposed remainder is timed as `<name>_grad`."""

    def __init__(self, x: torch.Tensor, group, stats: CommStats | None = None, name: str = "gather"):
        self.group, self.stats, self.name = group, stats, name
        self.pending: list = []  # (index into x, async work or None, fp32 gradient part, its input)
        self.source, self.token = _DeferredSource.apply(x, self)

    def gather(self, index: tuple) -> ZigzagGather:
        """Starts the all-gather of source[index] (see ZigzagGather)."""
        return ZigzagGather(self.source[index], self.group, self.stats, self.name, deferred=(self, index))


def gather_zigzag(x: torch.Tensor, group, stats: CommStats | None = None, name: str = "gather") -> torch.Tensor:
    """Blocking form of ZigzagGather."""
    return ZigzagGather(x, group, stats, name).finish()
