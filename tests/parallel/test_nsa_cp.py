"""Sequence-sharded NSA equals single-rank NSA: outputs and every input and parameter gradient."""

import functools
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist

from dist_harness import run_distributed
from kernels.compression import mean_compress, mlp_compress
from kernels.nsa import native_sparse_attention
from nsa_dist.parallel import (CommStats, LayoutError, ZigzagLayout, dense_context_parallel, nsa_context_parallel,
                               nsa_cp_bytes, split_zigzag)
from nsa_dist.parallel.comm import DeferredReduceScatter
from nsa_dist.parallel.layout import merge_zigzag, validate_layout
from nsa_dist.parallel.nsa_cp import document_compression


@dataclass(frozen=True)
class Case:
    seq_len: int
    num_q_heads: int
    num_kv_heads: int
    block_size: int
    stride: int
    selection_block: int
    num_selected: int
    window: int
    kv: str  # separate | shared
    phi: str  # mlp | mean
    dk: int = 16
    dv: int = 8
    batch: int = 1
    seed: int = 0
    documents: tuple[int, ...] = ()  # cu_seqlens of packed documents (batch 1); empty: one sequence
    selection_score: str = "sum"  # how top-n combines a group's heads (nsa.selection_score)

    def cu_seqlens(self) -> torch.Tensor | None:
        return torch.tensor(self.documents, dtype=torch.int32) if self.documents else None


def make_inputs(case: Case):
    """Full-sequence leaf tensors and phi parameters, identical in every process (same seed)."""
    g = torch.Generator().manual_seed(case.seed)
    b, t, hq, hk = case.batch, case.seq_len, case.num_q_heads, case.num_kv_heads

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).float().requires_grad_()

    leaves = {"q": randn(b, t, hq, case.dk), "gates": torch.rand(b, t, hq, 3, generator=g).requires_grad_()}
    for branch in ("cmp", "slc", "win") if case.kv == "separate" else ("shared",):
        leaves[f"k_{branch}"], leaves[f"v_{branch}"] = randn(b, t, hk, case.dk), randn(b, t, hk, case.dv)
    params = {}
    if case.phi == "mlp":
        for name, dim in (("k", case.dk), ("v", case.dv)):
            params[f"{name}_pos"] = randn(case.block_size, dim) * 0.1
            params[f"{name}_w1"] = randn(dim, case.block_size * dim) * (case.block_size * dim) ** -0.5
            params[f"{name}_b1"] = randn(dim) * 0.1
            params[f"{name}_w2"] = randn(dim, dim) * dim**-0.5
            params[f"{name}_b2"] = randn(dim) * 0.1
        params = {k: v.detach().requires_grad_() for k, v in params.items()}
    upstream = torch.randn(b, t, hq, case.dv, generator=g)
    return leaves, params, upstream


def phis(case: Case, params: dict):
    if case.phi == "mean":
        f = functools.partial(mean_compress, block_size=case.block_size, stride=case.stride)
        return f, f
    return tuple(
        functools.partial(mlp_compress, block_size=case.block_size, stride=case.stride, pos_emb=params[f"{n}_pos"],
                          w1=params[f"{n}_w1"], b1=params[f"{n}_b1"], w2=params[f"{n}_w2"], b2=params[f"{n}_b2"])
        for n in ("k", "v")
    )


def branch_kv(case: Case, t: dict):
    if case.kv == "shared":
        pair = (t["k_shared"], t["v_shared"])
        return pair, pair, pair
    return tuple((t[f"k_{b}"], t[f"v_{b}"]) for b in ("cmp", "slc", "win"))


def sizes(case: Case) -> dict:
    return dict(block_size=case.block_size, stride=case.stride, selection_block=case.selection_block,
                num_selected=case.num_selected, window=case.window, selection_score=case.selection_score)


def owner_rank(block: torch.Tensor, case: Case, cp_size: int) -> torch.Tensor:
    chunk = block * case.selection_block // (case.seq_len // (2 * cp_size))
    return torch.where(chunk < cp_size, chunk, 2 * cp_size - 1 - chunk)


def assert_rms_close(got: torch.Tensor, want: torch.Tensor, rel: float, what: str, atol: float = 1e-5) -> None:
    """RMS-relative error: sums over many terms (parameter gradients) reorder between layouts, so single
    elements may differ more than the tensor as a whole. `atol` (per element, RMS) covers gradients
    that are zero up to cancellation, such as phi's output bias: softmax ignores a shift shared by all
    compressed keys."""
    diff, ref = (got - want).double().norm(), want.double().norm()
    assert diff <= rel * ref + atol * want.numel() ** 0.5, f"{what}: RMS-relative error {diff / ref:.2e} > {rel:.0e}"


def check_case(rank: int, world: int, case: Case, kv_heads_per_gather: int, impl: str = "reference",
               gather_group=None, selection_loss: int = 1) -> int:
    """Compares this rank's CP result to the single-rank one; returns how many selected blocks it
    took from other ranks. gather_group: the selection gather's own group (a twin of the CP group).
    selection_loss 0: without the alignment loss's terms, so that with shared K/V the rows near a document's
    start take the window's output for the selected branch's (kernels.nsa.window_covered_rows)."""
    leaves, params, upstream = make_inputs(case)
    compress_k, compress_v = phis(case, params)
    full = native_sparse_attention(leaves["q"], *branch_kv(case, leaves), leaves["gates"], compress_k, compress_v,
                                   **sizes(case), cu_seqlens=case.cu_seqlens(), selection_loss=selection_loss)
    ref_grads = torch.autograd.grad(full.output, list(leaves.values()) + list(params.values()), upstream)

    local = {k: split_zigzag(v.detach(), rank, world).requires_grad_() for k, v in leaves.items()}
    local_params = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    compress_k, compress_v = phis(case, local_params)
    stats = CommStats()
    group = dist.group.WORLD
    result = nsa_context_parallel(local["q"], *branch_kv(case, local), local["gates"], compress_k, compress_v,
                                  group=group, kv_heads_per_gather=kv_heads_per_gather, stats=stats, impl=impl,
                                  gather_group=gather_group, **sizes(case), cu_seqlens=case.cu_seqlens(),
                                  selection_loss=selection_loss)
    grads = torch.autograd.grad(result.output, list(local.values()) + list(local_params.values()),
                                split_zigzag(upstream, rank, world))

    rel = 1e-5 if impl == "reference" else 2e-5  # the kernels sum in another order than the reference
    tol = dict(rtol=rel, atol=rel)
    torch.testing.assert_close(result.output, split_zigzag(full.output.detach(), rank, world), **tol)
    assert torch.equal(result.block_idx, split_zigzag(full.block_idx, rank, world)), "selections differ"
    for lse_name in ("lse_cmp", "lse_slc", "lse_win"):
        torch.testing.assert_close(getattr(result, lse_name), split_zigzag(getattr(full, lse_name), rank, world))
    if selection_loss:
        # the selection alignment loss's terms (nsa.selection_loss) over the ranks' rows add up to one rank's
        terms = torch.stack([t.detach().double() for t in result.selection_terms])
        dist.all_reduce(terms)
        want_terms = torch.stack([t.detach().double() for t in full.selection_terms])
        # rows with free picks to align: every case but n = 3 (block 0 and the two local blocks fill the picks)
        assert (want_terms[1] > 0) == (case.num_selected > 3)
        torch.testing.assert_close(terms, want_terms, rtol=1e-5, atol=1e-7)
    names = list(leaves) + list(params)
    for name, got, want in zip(names, grads, ref_grads):
        if name in params:
            dist.all_reduce(got)  # a parameter's gradient is the sum of every rank's contribution
        else:
            want = split_zigzag(want, rank, world)
        assert_rms_close(got, want, rel, f"grad of {name}")
    rows = None
    if case.documents:
        layout = ZigzagLayout(case.seq_len, world, rank)
        halo = max(case.window - 1, case.block_size - 1)
        rows = document_compression(case.cu_seqlens(), layout, halo, case.block_size, case.stride, "cpu").rows
    expected = nsa_cp_bytes(seq_len=case.seq_len, cp_size=world, cp_rank=rank, batch=case.batch,
                            num_kv_heads=case.num_kv_heads, dk=case.dk, dv=case.dv, block_size=case.block_size,
                            stride=case.stride, window=case.window, kv=case.kv, element_size=4, document_rows=rows)
    assert dict(stats.sent) == expected and dict(stats.received) == expected, (dict(stats.sent), expected)
    if case.documents:  # selected block ids count from each document's start: no remote-block accounting
        return 0
    assert 0 < stats.needed["selection_kv"] <= expected["selection_kv"]
    exposed = stats.exposed_seconds()
    assert set(exposed) == set(expected), exposed  # every collective's wait is timed
    assert all(0 <= seconds < 60 for seconds in exposed.values()), exposed
    assert "comm/selection_kv/exposed_s" in stats.as_metrics()
    if gather_group is not None:
        # the selection gradient's reduce-scatter starts after the selected branch's backward and is waited
        # for only after the compressed branch's backward, whose own reduce-scatter comes first
        waits = list(exposed)
        assert waits.index("selection_kv_grad") > waits.index("compressed_kv_grad"), waits
    owners = owner_rank(result.block_idx.long().clamp_min(0), case, world)
    return int(((owners != rank) & (result.block_idx >= 0)).sum())


CASES = [
    Case(256, 4, 2, 16, 8, 16, 4, 20, "separate", "mlp", seed=1),
    Case(256, 2, 2, 8, 4, 16, 5, 9, "shared", "mean", seed=2),
    Case(384, 16, 1, 16, 16, 16, 3, 7, "separate", "mean", dk=8, dv=12, seed=3),
    Case(256, 8, 2, 32, 16, 32, 4, 16, "shared", "mlp", batch=2, seed=4),
    Case(256, 8, 2, 16, 8, 16, 4, 20, "separate", "mean", seed=7, selection_score="max"),
    # top-n from the gathered raw keys: every slice of the selection gather is taken before it runs
    Case(256, 8, 2, 16, 8, 16, 4, 20, "shared", "mean", seed=8, selection_score="exact"),
    Case(256, 4, 2, 16, 8, 16, 4, 20, "separate", "mean", seed=9, selection_score="bound"),
]


def _check_cases(rank, world, cases):
    remote = 0
    for case in cases:
        for per_gather in sorted({1, case.num_kv_heads}):
            remote += check_case(rank, world, case, per_gather)
    remote += check_case(rank, world, cases[0], 1, gather_group=dist.new_group(list(range(world))))
    shared = next(case for case in cases if case.kv == "shared" and case.window)
    remote += check_case(rank, world, shared, 1, selection_loss=0)
    total = torch.tensor([remote])
    dist.all_reduce(total)
    assert total.item() > 0, "no query selected a block held by another rank: the test proves nothing"


@pytest.mark.timeout(240)
@pytest.mark.parametrize("world", [2, 4])
def test_context_parallel_matches_single_rank(world):
    cases = [c for c in CASES if c.seq_len % (2 * world * c.selection_block) == 0
             and max(c.window - 1, c.block_size - c.stride) <= c.seq_len // (2 * world)]
    assert len(cases) >= 3
    run_distributed(_check_cases, world, cases)


# Documents that cross chunk and rank boundaries, one shorter than a compression block, one starting on a
# chunk boundary (256 tokens: chunks of 64 at P=2, 32 at P=4)
DOCUMENT_CASES = [
    Case(256, 4, 2, 16, 8, 16, 4, 20, "separate", "mlp", seed=11, documents=(0, 37, 100, 109, 128, 190, 256)),
    Case(256, 2, 1, 16, 16, 16, 3, 0, "shared", "mean", seed=12, documents=(0, 5, 160, 256)),
    # no document longer than n * l' = 64: top-n must pick every block of the gathered selection K/V
    Case(256, 4, 2, 16, 8, 16, 4, 20, "shared", "mlp", seed=14, documents=(0, 37, 100, 109, 128, 190, 250, 256)),
]


def _check_documents(rank, world):
    for case in DOCUMENT_CASES:
        check_case(rank, world, case, 1)
    check_case(rank, world, DOCUMENT_CASES[0], 1, gather_group=dist.new_group(list(range(world))))
    check_case(rank, world, DOCUMENT_CASES[2], 1, selection_loss=0)  # shared K/V and a window


@pytest.mark.timeout(240)
@pytest.mark.parametrize("world", [2, 4])
def test_packed_documents_under_context_parallelism_match_single_rank(world):
    """cu_seqlens honoured under CP: each rank's outputs and gradients equal the single-rank NSA over the
    same packed documents, and the collectives move the bytes nsa_cp_bytes says."""
    run_distributed(_check_documents, world)


def _check_triton(rank, world, case, selection_loss=1):
    remote = check_case(rank, world, case, 1, impl="triton", selection_loss=selection_loss)
    assert case.documents or remote > 0


@pytest.mark.timeout(240)
def test_context_parallel_on_triton_kernels_matches_single_rank_reference():
    """The Triton kernels (interpreted on CPU) under CP equal the single-rank reference."""
    run_distributed(_check_triton, 2, Case(128, 4, 2, 16, 8, 16, 4, 20, "separate", "mlp", seed=6))


@pytest.mark.timeout(240)
def test_packed_documents_under_cp_on_triton_kernels_match_single_rank_reference():
    run_distributed(_check_triton, 2, Case(128, 4, 2, 16, 8, 16, 4, 20, "separate", "mlp", seed=13,
                                           documents=(0, 20, 64, 70, 128)))


@pytest.mark.timeout(240)
def test_shared_kv_under_cp_on_triton_kernels_matches_single_rank_reference():
    """With shared K/V the rows less than min(w, n * l') tokens into their document take the window's output
    for the selected branch's, on each rank's zigzag chunks as on one rank."""
    run_distributed(_check_triton, 2, Case(128, 4, 2, 16, 8, 16, 4, 20, "shared", "mlp", seed=15,
                                           documents=(0, 20, 64, 70, 128)), 0)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("score", ["exact", "bound"])
def test_raw_key_score_under_cp_on_triton_kernels_matches_single_rank_reference(score):
    """nsa.selection_score "exact" or "bound" on the kernels: top-n reads the gathered raw keys of packed
    documents at each zigzag chunk's offset (with "bound", a rank's keys end before the documents do)."""
    run_distributed(_check_triton, 2, Case(128, 4, 2, 16, 8, 16, 4, 20, "separate", "mean", seed=14,
                                           documents=(0, 20, 64, 70, 128), selection_score=score))


def _check_gather_chunking(rank, world, case):
    results = []
    for per_gather in (1, case.num_kv_heads):
        leaves, params, upstream = make_inputs(case)
        local = {k: split_zigzag(v.detach(), rank, world).requires_grad_() for k, v in leaves.items()}
        compress_k, compress_v = phis(case, params)
        out = nsa_context_parallel(local["q"], *branch_kv(case, local), local["gates"], compress_k, compress_v,
                                   group=dist.group.WORLD, kv_heads_per_gather=per_gather, **sizes(case)).output
        grads = torch.autograd.grad(out, list(local.values()), split_zigzag(upstream, rank, world))
        results.append((out, grads))
    (out_a, grads_a), (out_b, grads_b) = results
    assert_rms_close(out_a, out_b, 1e-6, "output", atol=0)
    for name, a, b in zip(("q", "gates", "k_cmp", "v_cmp", "k_slc", "v_slc", "k_win", "v_win"), grads_a, grads_b):
        assert_rms_close(a, b, 1e-6, f"grad of {name}", atol=0)


@pytest.mark.timeout(120)
def test_results_do_not_depend_on_gather_chunking():
    run_distributed(_check_gather_chunking, 2, Case(256, 8, 4, 16, 8, 16, 4, 20, "separate", "mean", seed=5))


def test_zigzag_split_matches_megatron_layout_and_merges_back():
    x = torch.arange(2 * 32).view(2, 32)
    layout = ZigzagLayout(seq_len=32, cp_size=4, cp_rank=1)
    assert layout.chunk_ids == (1, 6)
    assert split_zigzag(x, 1, 4).tolist() == [[4, 5, 6, 7, 24, 25, 26, 27], [36, 37, 38, 39, 56, 57, 58, 59]]
    assert layout.positions().tolist() == [4, 5, 6, 7, 24, 25, 26, 27]
    assert torch.equal(merge_zigzag([split_zigzag(x, r, 4) for r in range(4)]), x)


@pytest.mark.parametrize("seq_len,cp,window,match", [
    (1000, 2, 16, "multiple of 2 \\* cp_size \\* selection_block = 256"),
    (512, 4, 128, "left halo \\(127 tokens"),
    (256, 0, 16, "at least 1"),
])
def test_invalid_layouts_are_explained(seq_len, cp, window, match):
    with pytest.raises(LayoutError, match=match):
        validate_layout(seq_len, cp, block_size=32, stride=16, selection_block=64, window=window)


def _check_dense(rank, world, documents):
    batch = 1 if documents else 2
    g = torch.Generator().manual_seed(7)
    q = torch.randn(batch, 64, 4, 8, generator=g, requires_grad=True)
    k = torch.randn(batch, 64, 2, 8, generator=g, requires_grad=True)
    v = torch.randn(batch, 64, 2, 6, generator=g, requires_grad=True)
    upstream = torch.randn(batch, 64, 4, 6, generator=g)
    cu_seqlens = torch.tensor(documents, dtype=torch.int32) if documents else None
    bounds = list(documents) or [0, 64]
    full = torch.cat([  # causal attention inside each document, on its own
        torch.nn.functional.scaled_dot_product_attention(
            *(x[:, lo:hi].transpose(1, 2) for x in (q, k, v)), is_causal=True, enable_gqa=True).transpose(1, 2)
        for lo, hi in zip(bounds[:-1], bounds[1:])], dim=1)
    ref_grads = torch.autograd.grad(full, (q, k, v), upstream)
    local = [split_zigzag(x.detach(), rank, world).requires_grad_() for x in (q, k, v)]
    out = dense_context_parallel(*local, group=dist.group.WORLD, cu_seqlens=cu_seqlens)
    grads = torch.autograd.grad(out, local, split_zigzag(upstream, rank, world))
    torch.testing.assert_close(out, split_zigzag(full.detach(), rank, world), rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, ref_grads):
        assert_rms_close(got, split_zigzag(want, rank, world), 1e-5, "dense grad")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("documents", [(), (0, 3, 21, 24, 50, 64)], ids=["one-sequence", "packed-documents"])
def test_dense_baseline_under_cp_matches_full_attention(documents):
    """Chunks of 8 tokens at P=4: the documents start mid-chunk, on a chunk boundary (24), and span ranks."""
    run_distributed(_check_dense, 4, documents)


def test_deferred_gather_on_one_rank_passes_the_gradient_through():
    """Without a CP group a deferred gather is the identity, and so is its gradient (no reduce-scatter)."""
    x = torch.randn(2, 8, 3, 5, requires_grad=True)
    weight = torch.randn(2, 8, 2, 5)
    deferred = DeferredReduceScatter(x, None)
    gathered = deferred.gather((slice(None), slice(None), slice(1, 3))).finish()
    assert torch.equal(gathered, x[:, :, 1:3])
    (gathered * weight).sum().backward()
    assert torch.equal(x.grad[:, :, 1:3], weight) and not x.grad[:, :, 0].any()


def _check_indexer(rank, world, case, impl):
    """selection_score "indexer" with its loss: this rank's picks and outputs are the single-rank ones, its
    loss terms add up over the ranks to one rank's, and so do the gradients they give the indexer's weight."""
    from kernels.block_selection.indexer import indexer_init

    leaves, params, _ = make_inputs(case)
    group = case.num_q_heads // case.num_kv_heads
    noise = torch.randn(2, 1, group, case.dk // 2, generator=torch.Generator().manual_seed(case.seed))
    weight = (indexer_init(1, group, case.dk) + 0.3 * noise).requires_grad_()
    # every 4th row: a stride that divides the zigzag chunks' length scores the same rows on P ranks as on one
    kwargs = dict(**{**sizes(case), "selection_score": "indexer"}, cu_seqlens=case.cu_seqlens(), indexer=weight,
                  indexer_loss=4)
    full = native_sparse_attention(leaves["q"], *branch_kv(case, leaves), leaves["gates"], *phis(case, params),
                                   **kwargs)
    want_grad, = torch.autograd.grad(full.indexer_terms.kl, weight)
    local = {k: split_zigzag(v.detach(), rank, world) for k, v in leaves.items()}
    result = nsa_context_parallel(local["q"], *branch_kv(case, local), local["gates"], *phis(case, params),
                                  group=dist.group.WORLD, impl=impl, **kwargs)
    assert torch.equal(result.block_idx, split_zigzag(full.block_idx, rank, world)), "selections differ"
    torch.testing.assert_close(result.output, split_zigzag(full.output.detach(), rank, world), rtol=2e-5, atol=2e-5)
    grad, = torch.autograd.grad(result.indexer_terms.kl, weight)
    both = torch.cat([torch.stack([t.detach().double() for t in result.indexer_terms]), grad.double().flatten()])
    dist.all_reduce(both)
    want = [t.detach().double() for t in full.indexer_terms]
    assert both[1] == want[1] and both[1] > 0  # rows
    assert both[2] == want[2] and both[3] == want[3] > 0  # the recall's shared picks and picks
    # the KL sums near-equal terms of opposite sign, and on the kernels each block's log-sum-exp is summed in
    # another order than PyTorch's: 1.3e-5 apart in fp32 here (the single-rank loss runs in PyTorch)
    torch.testing.assert_close(both[0], want[0], rtol=1e-4, atol=0)
    torch.testing.assert_close(both[4:].float().view_as(want_grad), want_grad, rtol=1e-4, atol=1e-7)


def _check_indexer_cases(rank, world):
    _check_indexer(rank, world, Case(256, 8, 2, 16, 8, 16, 5, 20, "shared", "mean", seed=16,
                                     documents=(0, 37, 100, 109, 256)), "reference")
    _check_indexer(rank, world, Case(128, 4, 2, 16, 8, 16, 4, 20, "separate", "mean", seed=17,
                                     documents=(0, 20, 100, 128)), "triton")  # rows 64+ into a document


@pytest.mark.timeout(240)
def test_indexer_under_cp_matches_single_rank():
    """The learned indexer under CP, on the reference and the kernels: its queries rank the gathered raw keys
    of packed documents, and each rank's loss covers its own rows."""
    run_distributed(_check_indexer_cases, 2)
