"""native_sparse_attention(impl="triton") against impl="reference": output, selections, gradients."""

from functools import partial

import pytest
import torch

from kernels.compression.naive import mean_compress
from kernels.nsa import branch_ops, native_sparse_attention
from triton_cases import DEVICE, INTERPRETER_WARNINGS, assert_close, assert_lse_close, randn, require_backend

pytestmark = INTERPRETER_WARNINGS

T = 131


# "short documents": none longer than n * l' = 64 tokens, so top-n must pick every block
DOCUMENTS = {"one-sequence": None, "packed": [0, 50, 51, T], "short documents": [0, 50, 51, 115, T]}


@pytest.mark.parametrize("packed, score",
                         [(name, "sum") for name in DOCUMENTS] + [("packed", "exact"), ("packed", "bound")])
def test_triton_matches_reference(packed, score):
    """With score "exact" or "bound" top-n reads the selection branch's raw keys (the second K/V pair)."""
    require_backend()
    torch.manual_seed(0)
    group, kv_heads, dk, dv = 2, 1, 32, 16
    bounds = DOCUMENTS[packed]
    cu_seqlens = torch.tensor(bounds, dtype=torch.int32, device=DEVICE) if bounds else None
    q = randn(1, T, group * kv_heads, dk)
    kv = [(randn(1, T, kv_heads, dk), randn(1, T, kv_heads, dv)) for _ in range(3)]
    gates = torch.rand(1, T, group * kv_heads, 3, device=DEVICE).requires_grad_()
    leaves = [q, *kv[0], *kv[1], *kv[2], gates]
    phi = partial(mean_compress, block_size=16, stride=8)
    sizes = dict(block_size=16, stride=8, selection_block=16, num_selected=4, window=24)
    upstream = randn(1, T, group * kv_heads, dv, grad=False)
    results = {}
    for impl in ("triton", "reference"):
        out = native_sparse_attention(q, *kv, gates, phi, phi, **sizes, impl=impl, cu_seqlens=cu_seqlens,
                                      selection_score=score)
        grads = torch.autograd.grad((out.output * upstream).sum(), leaves)
        results[impl] = (out, grads)
    (out, grads), (ref, ref_grads) = results["triton"], results["reference"]
    assert torch.equal(out.block_idx, ref.block_idx)
    assert_close("output", out.output, ref.output, torch.float32)
    for name in ("lse_cmp", "lse_slc", "lse_win"):
        assert_lse_close(name, getattr(out, name), getattr(ref, name), torch.float32)
    for i, (g, g_ref) in enumerate(zip(grads, ref_grads)):
        assert_close(f"grad of leaf {i}", g, g_ref, torch.float32)


def test_unknown_impl_is_a_clear_error():
    with pytest.raises(ValueError, match="impl='cuda'"):
        branch_ops("cuda")


@pytest.mark.parametrize("kv_pairs", ["separate", "shared"])
def test_packed_documents_read_nothing_back_from_the_device(monkeypatch, kv_pairs):
    """With document boundaries known on the host (remember_bounds, as the data loader does), the Triton
    path builds its layouts without reading any tensor back (a read waits for the GPU, which in every
    layer would stop the host from queueing work ahead of it); a second call, as the next layer makes,
    reuses the layouts and gives the same result. Shared K/V adds the rows the window answers for the
    selected branch (window_covered_rows)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from kernels.common import device_tensor, remember_bounds

    require_backend()
    torch.manual_seed(0)
    bounds = [0, 50, 51, T]
    cu_seqlens = device_tensor(bounds, torch.int32, DEVICE)
    remember_bounds(cu_seqlens, bounds)
    q = randn(1, T, 2, 32)
    kv = [(randn(1, T, 1, 32), randn(1, T, 1, 16)) for _ in range(3)]
    if kv_pairs == "shared":
        kv = [kv[0]] * 3
    gates = torch.rand(1, T, 2, 3, device=DEVICE)
    phi = partial(mean_compress, block_size=16, stride=8)
    sizes = dict(block_size=16, stride=8, selection_block=16, num_selected=4, window=24)
    reads = []
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: reads.append("tolist") or tolist(self))

    class ScalarReads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                reads.append(str(func))
            return func(*args, **(kwargs or {}))

    outputs = []
    for _ in range(2):
        with ScalarReads():
            out = native_sparse_attention(q, *kv, gates, phi, phi, **sizes, impl="triton", cu_seqlens=cu_seqlens)
            out.output.sum().backward()
        outputs.append(out.output.detach())
    assert reads == []
    assert torch.equal(outputs[0], outputs[1])



@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_zero_length_documents_change_nothing(impl):
    """Repeated boundaries (empty documents inside and after the last, as a packer that pads cu_seqlens to a
    fixed count for a CUDA graph would write them) give the output and gradients of the unpadded bounds."""
    require_backend()
    from kernels.common import device_tensor, remember_bounds

    torch.manual_seed(0)
    q = randn(1, T, 2, 32)
    kv = [(randn(1, T, 1, 32), randn(1, T, 1, 16)) for _ in range(3)]
    gates = torch.rand(1, T, 2, 3, device=DEVICE).requires_grad_()
    leaves = [q, *kv[0], *kv[1], *kv[2], gates]
    phi = partial(mean_compress, block_size=16, stride=8)
    sizes = dict(block_size=16, stride=8, selection_block=16, num_selected=4, window=24)
    upstream = randn(1, T, 2, 16, grad=False)
    results = []
    for bounds in ([0, 50, 51, 115, T], [0, 50, 50, 51, 115, T, T, T]):
        cu_seqlens = device_tensor(bounds, torch.int32, DEVICE)
        remember_bounds(cu_seqlens, bounds)
        out = native_sparse_attention(q, *kv, gates, phi, phi, **sizes, impl=impl, cu_seqlens=cu_seqlens,
                                      selection_score="exact")
        results.append((out, torch.autograd.grad((out.output * upstream).sum(), leaves)))
    (plain, plain_grads), (padded, padded_grads) = results
    assert torch.equal(padded.block_idx, plain.block_idx)
    assert_close("output", padded.output, plain.output, torch.float32)
    for i, (g, g_plain) in enumerate(zip(padded_grads, plain_grads)):
        assert_close(f"grad of leaf {i}", g, g_plain, torch.float32)

def test_strided_q_and_gates_are_made_dense_once():
    """In training q and the gates are slices of the fused projection's output (q's channels, the gate
    channels beside them), so neither is dense. Four branch calls read q and the kernels' wrappers need
    dense inputs: compose_nsa lays q and the gates out once, and no branch copies them again (a copy of q
    is a whole [T, HQ, Dk] tensor, three more of them each layer before this)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    require_backend()
    torch.manual_seed(0)
    projected = randn(1, T, 2, 32 + 3, grad=False)  # [B, T, HQ, Dk + 3 gate logits], as the projection gives
    q, gate_logits = projected.split([32, 3], dim=-1)
    gates = torch.sigmoid(gate_logits)
    assert not q.is_contiguous() and not gates[..., 0].is_contiguous()
    kv = (randn(1, T, 1, 32, grad=False), randn(1, T, 1, 16, grad=False))
    phi = partial(mean_compress, block_size=16, stride=8)
    sizes = dict(block_size=16, stride=8, selection_block=16, num_selected=4, window=24)
    copies = []

    class Copies(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket is torch.ops.aten.clone:
                copies.append(tuple(args[0].shape))
            return func(*args, **(kwargs or {}))

    with Copies():
        out = native_sparse_attention(q, kv, kv, kv, gates, phi, phi, **sizes, impl="triton")
    assert sorted(copies) == [(1, T, 2, 32), (3, 1, T, 2)], copies  # q once, the gates once (branch-major)
    ref = native_sparse_attention(q, kv, kv, kv, gates, phi, phi, **sizes, impl="reference")
    assert_close("output", out.output, ref.output, torch.float32)


def test_the_backward_makes_one_branch_output_gradient_at_a_time(monkeypatch):
    """compose_nsa gives each Triton branch its gate, and the branch's backward makes its output gradient
    (g * dO, a [T, HQ, Dv] tensor, in the delta pass: kernels.range_attention.attention_delta) and consumes
    it, so no two exist at once. The test records when each delta pass with a gate runs and when each
    branch's backward has finished (its q's gradient made)."""
    import kernels.nsa as nsa
    import kernels.range_attention as range_attention
    import kernels.selected_attention.triton as selected_triton

    require_backend()
    events = []

    class Mark(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, label):
            ctx.label = label
            return x.view_as(x)

        @staticmethod
        def backward(ctx, grad):
            events.append(ctx.label)
            return grad, None

    def marked(name, branch):
        def run(q, k, v, *args, **kwargs):
            return branch(Mark.apply(q, f"{name} backward done"), k, v, *args, **kwargs)
        return run

    def delta(o, do, dlse, gate=None, original=range_attention.attention_delta):
        if gate is not None:
            events.append("output gradient made")
        return original(o, do, dlse, gate)

    monkeypatch.setattr(range_attention, "attention_delta", delta)
    monkeypatch.setattr(selected_triton, "attention_delta", delta)
    ops = branch_ops("triton")
    ops = ops._replace(compressed=marked("cmp", ops.compressed), selected=marked("slc", ops.selected),
                       window=marked("win", ops.window))
    monkeypatch.setattr(nsa, "branch_ops", lambda impl: ops)
    torch.manual_seed(0)
    q = randn(1, T, 2, 32)
    kv = [(randn(1, T, 1, 32), randn(1, T, 1, 16)) for _ in range(3)]
    gates = torch.rand(1, T, 2, 3, device=DEVICE).requires_grad_()
    phi = partial(mean_compress, block_size=16, stride=8)
    out = native_sparse_attention(q, *kv, gates, phi, phi, block_size=16, stride=8, selection_block=16,
                                  num_selected=4, window=24, impl="triton")
    out.output.sum().backward()
    assert events == [what for name in ("slc", "win", "cmp")
                      for what in ("output gradient made", f"{name} backward done")]


LIMITS = {"limit-w": (24, 4), "limit-n*l'": (40, 2)}  # (w, n) with l' = 16: min(w, n * l') = 24, 32
# every case on the reference; the (interpreted) kernels on a few, each limit and layout once
SHARED_KV_CASES = ([("reference", packed, limit) for packed in ("one-sequence", "packed") for limit in LIMITS]
                   + [("triton", "one-sequence", "limit-w"), ("triton", "packed", "limit-n*l'"),
                      ("triton-by-blocks", "packed", "limit-w")])


@pytest.mark.parametrize("impl, packed, limit", SHARED_KV_CASES, ids=["-".join(case) for case in SHARED_KV_CASES])
def test_shared_kv_rows_near_a_document_start_take_the_window_output(monkeypatch, impl, packed, limit):
    """With one K/V pair for the selected and window branches, a row less than min(w, n * l') tokens into its
    document attends the same keys in both (top-n takes every block it can see; the window reaches back to the
    document's start), so compose_nsa hands the selected kernels no picks for it and the window's output
    stands in. Against the reference computing every row (the window's pair passed as views: other tensors,
    so the branches do not count as sharing): the same output, lse and gradients; and the selected branch
    gets -1 on exactly those rows and top-n's picks on the others. "triton-by-blocks": selected attention's
    forward and dQ by key blocks (their merges store rows without a pick too)."""
    import kernels.nsa as nsa

    require_backend()
    window, num_selected = LIMITS[limit]
    if impl == "triton-by-blocks":
        import kernels.selected_attention.triton as selected

        for kernel in ("fwd", "dq"):
            monkeypatch.setitem(selected.LAUNCH, kernel, {"BY_BLOCKS": True, "CHUNK": 50})
        impl = "triton"
    torch.manual_seed(0)
    bounds = DOCUMENTS[packed] or [0, T]
    cu_seqlens = torch.tensor(bounds, dtype=torch.int32, device=DEVICE) if DOCUMENTS[packed] else None
    q = randn(1, T, 4, 32)
    kv = (randn(1, T, 2, 32), randn(1, T, 2, 16))
    gates = torch.rand(1, T, 4, 3, device=DEVICE).requires_grad_()
    leaves = [q, *kv, gates]
    phi = partial(mean_compress, block_size=16, stride=8)
    sizes = dict(block_size=16, stride=8, selection_block=16, num_selected=num_selected, window=window)
    upstream = randn(1, T, 4, 16, grad=False)
    handed = []
    ops = branch_ops(impl)

    def selected(q, k, v, picks, *args, **kwargs):
        handed.append(picks)
        return ops.selected(q, k, v, picks, *args, **kwargs)

    monkeypatch.setattr(nsa, "branch_ops", lambda _: ops._replace(selected=selected))
    got = native_sparse_attention(q, kv, kv, kv, gates, phi, phi, **sizes, impl=impl, cu_seqlens=cu_seqlens)
    got_grads = torch.autograd.grad((got.output * upstream).sum(), leaves)
    monkeypatch.setattr(nsa, "branch_ops", branch_ops)
    views = tuple(x.view_as(x) for x in kv)
    want = native_sparse_attention(q, kv, kv, views, gates, phi, phi, **sizes, impl="reference",
                                   cu_seqlens=cu_seqlens)
    want_grads = torch.autograd.grad((want.output * upstream).sum(), leaves)

    limit = min(window, num_selected * 16)
    covered = torch.zeros(T, dtype=torch.bool)
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        covered[lo : min(hi, lo + limit)] = True
    assert 0 < int(covered.sum()) < T
    [picks] = handed
    assert (picks[:, covered] == -1).all()
    assert torch.equal(picks[:, ~covered], want.block_idx[:, ~covered])
    assert torch.equal(got.block_idx, want.block_idx)
    assert_close("output", got.output, want.output, torch.float32)
    for name in ("lse_cmp", "lse_slc", "lse_win"):
        assert_lse_close(name, getattr(got, name), getattr(want, name), torch.float32)
    for name, g, g_want in zip(("q", "k", "v", "gates"), got_grads, want_grads):
        assert_close(f"grad of {name}", g, g_want, torch.float32)


@pytest.mark.parametrize("bounds", [None, [0, 5, 30, 35, 160], [0, 5, 40, 41, 100, 160]],
                         ids=["one-sequence", "one-document-across", "documents-starting-within"])
def test_window_covered_rows_are_the_rows_near_their_document_start(bounds):
    """window_covered_rows against a per-row count, and window_uncovered_rows (the selected kernels' row
    lists) as its complement, for query spans laid out as context parallelism lays out a rank's two zigzag
    chunks (rows 0-39 at positions 40-79, rows 40-79 at 80-119); None exactly where
    no row of the spans is covered (the host knows it from the bounds, without a device read)."""
    from kernels.common import remember_bounds
    from kernels.nsa import QuerySpan, window_covered_rows, window_uncovered_rows

    cu_seqlens = None
    if bounds is not None:
        cu_seqlens = torch.tensor(bounds, dtype=torch.int32)
        remember_bounds(cu_seqlens, bounds)
    starts = bounds[:-1] if bounds else [0]
    spans = [QuerySpan(0, 40, 40, None, None, 0), QuerySpan(40, 80, 40, None, None, 0)]
    positions = list(range(40, 120))
    outcomes = set()
    for limit in (1, 5, 12, 30, 40, 41, 60, 200):
        first = [max(s for s in starts if s <= p) for p in positions]
        want = torch.tensor([p - f < limit for p, f in zip(positions, first)])
        got = window_covered_rows(spans, limit, cu_seqlens, torch.device("cpu"))
        # the selected kernels' row lists: each span's other rows, counted from its first
        lists = [window_uncovered_rows(s, limit, cu_seqlens, torch.device("cpu")) for s in spans]
        assert all(rows.dtype == torch.int32 for rows in lists)
        assert torch.equal(torch.cat([rows + s.offset for rows, s in zip(lists, spans)]),
                           torch.nonzero(~want).flatten().to(torch.int32)), limit
        if want.any():
            assert torch.equal(got, want), (limit, got, want)
            outcomes.add("all" if want.all() else "some")
        else:
            assert got is None, limit
            outcomes.add("none")
    assert outcomes == ({"some", "all"} if bounds and 40 in bounds else {"none", "some", "all"})
