"""kernels/block_selection/indexer.py: the learned indexer's queries commute with RoPE, its loss equals a loop
over rows, blocks and keys written from its definition, only its weight learns from it, and top-n with
selection_score "indexer" picks as the exact score does over the indexer's queries (reference and kernels)."""

import math

import pytest
import torch

from kernels.block_selection import indexer
from kernels.block_selection.indexer import indexer_init, indexer_loss_terms, indexer_queries
from kernels.compression import mean_compress
from kernels.nsa import native_sparse_attention, rope_rows
from triton_cases import DEVICE, LOW_PRECISION, require_backend


def _weight(heads, group, dim, seed, spread=0.3):
    """The start plus noise: a weight that mixes heads and channel pairs, as a trained one does."""
    g = torch.Generator().manual_seed(seed)
    return (indexer_init(heads, group, dim) + spread * torch.randn(2, heads, group, dim // 2, generator=g)).double()


def test_start_is_the_mean_of_each_slice_of_heads():
    q = torch.randn(2, 5, 8, 6, dtype=torch.float64)  # HQ 8 = HK 2 x G 4
    assert torch.equal(indexer_queries(q, indexer_init(4, 4, 6).double(), 2), q)  # H = G: the identity
    pairs = indexer_queries(q, indexer_init(2, 4, 6).double(), 2)
    want = q.reshape(2, 5, 2, 2, 2, 6).mean(dim=4).reshape(2, 5, 4, 6)
    torch.testing.assert_close(pairs, want, rtol=0, atol=1e-15)


def test_queries_are_complex_combinations_of_the_groups_queries():
    """q_idx[i] = sum over h of W[i, h] * q[h], each RoPE pair (x_f, x_{f + D/2}) a complex number."""
    q = torch.randn(2, 7, 6, 8, dtype=torch.float64)  # HK 2, G 3
    weight = torch.randn(2, 3, 3, 4, dtype=torch.float64)
    pairs = torch.complex(q[..., :4], q[..., 4:]).reshape(2, 7, 2, 3, 4)  # [B, T, HK, G, D / 2]
    mixed = (pairs[:, :, :, None] * torch.complex(weight[0], weight[1])).sum(dim=4)  # [B, T, HK, H, D / 2]
    want = torch.cat([mixed.real, mixed.imag], dim=-1).reshape(2, 7, 6, 8)
    torch.testing.assert_close(indexer_queries(q, weight, 2), want, rtol=1e-12, atol=1e-12)


def test_queries_commute_with_rope():
    """Rotating the queries and then mixing them is mixing them and then rotating: the indexer's scores
    depend on distances only."""
    q = torch.randn(1, 11, 6, 8, dtype=torch.float64)  # HK 2, G 3
    weight = _weight(3, 3, 8, seed=1)
    angles = torch.rand(11, 8, dtype=torch.float64) * 6
    angles = torch.cat([angles[:, :4], angles[:, :4]], dim=-1)  # each half's angle repeated (rotate-half)
    rotated_first = indexer_queries(rope_rows(q, angles), weight, 2)
    torch.testing.assert_close(rotated_first, rope_rows(indexer_queries(q, weight, 2), angles), rtol=1e-12, atol=1e-12)


def _loop(q, q_idx, keys, lp, scale, q_start, docs, row_stride, free):
    """One (row, KV head) at a time: KL(target || pred) over blocks 1 .. current - 2 of the row's document,
    target the group's mean exact mass on each, pred the indexer heads' mean, each renormalised; and where
    there are more such blocks than `free`, how many of target's first `free` are pred's first too."""
    _, t, hq, _ = q.shape
    hk, hi = keys.shape[2], q_idx.shape[2]
    g, h = hq // hk, hi // hk
    total, rows, overlap, choices = 0.0, 0, 0, 0

    def mass(query, head, first, pos):  # softmax over the document's keys up to pos, summed per block
        logits = [float(query @ keys[0, key, head]) * scale for key in range(first, pos + 1)]
        top = max(logits)
        weights = [math.exp(x - top) for x in logits]
        per_block = [0.0] * ((pos - first) // lp + 1)
        for i, w in enumerate(weights):
            per_block[i // lp] += w / sum(weights)
        return per_block

    for r in range(0, t, row_stride):
        p = q_start + r
        first = max(start for start, _ in docs if start <= p)
        current = (p - first) // lp
        if current < 4:  # fewer than two blocks to rank
            continue
        for kv in range(hk):
            target = [sum(x) / g for x in zip(*(mass(q[0, r, kv * g + j], kv, first, p) for j in range(g)))]
            pred = [sum(x) / h for x in zip(*(mass(q_idx[0, r, kv * h + j], kv, first, p) for j in range(h)))]
            target, pred = target[1:current - 1], pred[1:current - 1]
            t_sum, p_sum = sum(target), sum(pred)
            total += sum(a / t_sum * math.log((a / t_sum) / (b / p_sum)) for a, b in zip(target, pred) if a > 0)
            rows += 1
            if len(target) > free:
                tops = [sorted(range(len(x)), key=lambda j: -x[j])[:free] for x in (target, pred)]
                overlap += len(set(tops[0]) & set(tops[1]))
                choices += free
    return total, rows, overlap, choices


@pytest.mark.parametrize("q_start,docs,row_stride,chunk", [
    (0, [(0, 70)], 1, 64),
    (0, [(0, 30), (30, 70)], 3, 2),  # two documents; chunks of two rows, the key window per chunk
    (20, [(0, 33), (33, 90)], 2, 5),  # rows from position 20 of a longer sequence (a CP chunk)
])
def test_loss_matches_a_loop_from_its_definition(q_start, docs, row_stride, chunk):
    torch.manual_seed(0)
    t, hk, g, h, d, lp = 70 - (20 if q_start else 0), 2, 4, 2, 8, 8
    q = torch.randn(1, t, hk * g, d, dtype=torch.float64)
    keys = torch.randn(1, q_start + t, hk, d, dtype=torch.float64)
    weight = _weight(h, g, d, seed=2)
    cu = torch.tensor([0] + [end for _, end in docs], dtype=torch.int32) if len(docs) > 1 or q_start else None
    terms = indexer_loss_terms(q, weight, keys, selection_block=lp, num_selected=4, q_start=q_start, cu_seqlens=cu,
                               row_stride=row_stride, chunk_size=chunk)
    kl, rows, overlap, choices = _loop(q, indexer_queries(q, weight, hk), keys, lp, d**-0.5, q_start, docs,
                                       row_stride, free=1)
    assert rows > 0 and terms.rows.item() == rows
    assert math.isclose(terms.kl.item(), kl, rel_tol=1e-5)  # the loss sums in fp32
    assert choices > 0 and (terms.overlap.item(), terms.choices.item()) == (overlap, choices)


def test_chunks_bounded_by_logits_give_the_same_terms(monkeypatch):
    """A small _CHUNK_LOGITS splits the rows into more segments and chunks (one row a chunk at least); the
    sums stay those of one chunk."""
    torch.manual_seed(6)
    q = torch.randn(1, 150, 4, 8, dtype=torch.float64)
    keys = torch.randn(1, 150, 1, 8, dtype=torch.float64)
    kw = dict(selection_block=8, num_selected=5, row_stride=3,
              cu_seqlens=torch.tensor([0, 41, 43, 100, 150], dtype=torch.int32))
    whole = indexer_loss_terms(q, _weight(2, 4, 8, seed=7), keys, **kw)
    segments = indexer._segments([0, 41, 43, 100, 150], 0, 150, 3, 8, 64, 4)
    assert len(list(indexer._chunks(segments, 4))) == 1 and len(segments) == 3  # documents 0, 2 and 3
    monkeypatch.setattr(indexer, "_CHUNK_LOGITS", 800)
    segments = indexer._segments([0, 41, 43, 100, 150], 0, 150, 3, 8, 64, 4)
    assert len(segments) > 3 and len(list(indexer._chunks(segments, 4))) > len(segments) // 2
    split = indexer_loss_terms(q, _weight(2, 4, 8, seed=7), keys, **kw)
    assert whole.rows.item() > 0 and whole.choices.item() > 0
    for a, b in zip(whole, split):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("dtype", [torch.float32] + LOW_PRECISION)
def test_block_lse_kernels_match_pytorch(dtype):
    """indexer_triton.block_lse_triton against the same log-sum-exps in fp32 PyTorch: per (row, head,
    block), the lowest fp32 where the row sees no key of the block (padding rows see none), and the
    queries' gradient through them; blocks of 8 keys (under tl.dot's 16: the tile is padded and masked)."""
    require_backend()
    from kernels.block_selection.indexer_triton import FLOOR, block_lse_triton

    torch.manual_seed(8)
    b, n, r, hq, hk, d, lp, s = 2, 3, 5, 8, 2, 16, 8, 48
    q = torch.randn(b, n, r, hq, d).to(device=DEVICE, dtype=dtype)
    window = torch.randn(b, n, s, hk, d).to(device=DEVICE, dtype=dtype)
    seen = torch.randint(-1, s, (n, r, 1), device=DEVICE)
    seen[0, 0], seen[1, 2], seen[2, 4] = -1, 0, s - 1  # padding, one key, the whole window

    def reference(queries):
        logits = torch.einsum("bnrhgd,bnkhd->bnrhgk", queries.float().view(b, n, r, hk, hq // hk, d) * 0.25,
                              window.float())
        visible = torch.arange(s, device=DEVICE) <= seen
        logits = logits.masked_fill(~visible[None, :, :, None, None, :], FLOOR)
        return logits.unflatten(-1, (-1, lp)).logsumexp(-1).view(b, n, r, hq, s // lp)

    leaf = q.clone().requires_grad_()
    got = block_lse_triton(leaf, window, seen, lp, 0.25)
    want = reference(q.float().requires_grad_())
    empty = want <= FLOOR / 2
    assert empty.any() and (~empty).any()
    assert torch.equal(got <= FLOOR / 2, empty) and (got[empty] == FLOOR).all()
    # fp32 dots run in tf32 on the GPU (indexer_triton.PRECISION), in full precision interpreted
    tol = (1e-5 if DEVICE == "cpu" else 5e-3) if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got[~empty], want[~empty].detach(), rtol=tol, atol=tol)
    grad = torch.randn_like(got) * ~empty
    (got_grad,) = torch.autograd.grad((got * grad).sum(), leaf)
    queries = q.float().requires_grad_()
    (want_grad,) = torch.autograd.grad((reference(queries) * grad).sum(), queries)
    torch.testing.assert_close(got_grad.float(), want_grad, rtol=tol, atol=tol * want_grad.abs().max().item())


@pytest.mark.timeout(240)
def test_loss_through_the_kernels_matches_pytorch():
    """indexer_loss_terms with impl "triton" (the kernels, nothing recomputed) against "reference", fp32:
    the same KL, rows, recall counts and weight gradient over packed documents from a CP chunk's offset
    (on the GPU within tf32's rounding)."""
    require_backend()
    torch.manual_seed(9)
    q = torch.randn(1, 150, 8, 16, device=DEVICE)
    keys = torch.randn(1, 170, 2, 16, device=DEVICE)
    cu = torch.tensor([0, 45, 47, 120, 170], dtype=torch.int32, device=DEVICE)
    results = []
    for impl in ("reference", "triton"):
        weight = _weight(2, 4, 16, seed=10).float().to(DEVICE).requires_grad_()
        terms = indexer_loss_terms(q, weight, keys, selection_block=8, num_selected=5, q_start=20, cu_seqlens=cu,
                                   row_stride=3, impl=impl)
        (terms.kl / terms.rows).backward()
        results.append((terms, weight.grad))
    (ref, ref_grad), (tri, tri_grad) = results
    assert ref.rows.item() > 0 and ref.choices.item() > 0
    assert (ref.rows.item(), ref.choices.item()) == (tri.rows.item(), tri.choices.item())
    # tf32 dots on the GPU (indexer_triton.PRECISION) may swap two near-tied blocks in a ranking
    swaps = 0 if DEVICE == "cpu" else 0.05 * ref.choices.item()
    assert abs(ref.overlap.item() - tri.overlap.item()) <= swaps
    tol = 1e-4 if DEVICE == "cpu" else 2e-2
    torch.testing.assert_close(tri.kl, ref.kl, rtol=tol, atol=tol * 1e-2)
    torch.testing.assert_close(tri_grad, ref_grad, rtol=tol, atol=tol * 1e-2 * ref_grad.abs().max().item())


def test_only_the_weight_learns_and_training_lowers_the_loss():
    torch.manual_seed(3)
    q = torch.randn(1, 96, 8, 8, requires_grad=True)  # HK 1, G 8
    keys = torch.randn(1, 96, 1, 8, requires_grad=True)
    start = indexer_loss_terms(q, indexer_init(8, 8, 8), keys, selection_block=8, num_selected=5)
    assert start.kl.item() < 1e-5 and start.overlap == start.choices > 0  # H = G: the exact score itself

    weight = indexer_init(2, 8, 8).requires_grad_()
    terms = indexer_loss_terms(q, weight, keys, selection_block=8, num_selected=5, row_stride=2)
    (terms.kl / terms.rows).backward()
    assert q.grad is None and keys.grad is None, "the indexer's loss moved the attention's inputs"
    assert weight.grad.abs().sum() > 0

    optimizer = torch.optim.Adam([weight], lr=0.05)
    losses = []
    for _ in range(40):
        optimizer.zero_grad()
        terms = indexer_loss_terms(q, weight, keys, selection_block=8, num_selected=5, row_stride=2)
        (terms.kl / terms.rows).backward()
        optimizer.step()
        losses.append(terms.kl.item() / terms.rows.item())
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.timeout(240)
@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_indexer_score_picks_as_the_exact_score_over_its_queries(impl):
    """nsa.selection_score "indexer": with H = G at the start it is the exact score; with a trained-like
    weight and H < G its picks are the exact score's over the indexer's queries, and the loss terms come
    back with the result."""
    torch.manual_seed(4)
    dtype, device = (torch.float64, "cpu") if impl == "reference" else (torch.float32, DEVICE)
    if impl == "triton":
        require_backend()
    b, t, hk, g, d = 1, 200, 2, 4, 16
    q = torch.randn(b, t, hk * g, d, dtype=dtype, device=device)
    k, v = (torch.randn(b, t, hk, d, dtype=dtype, device=device) for _ in range(2))
    gates = torch.rand(b, t, hk * g, 3, dtype=dtype, device=device)
    compress = lambda x: mean_compress(x, 8, 4)  # noqa: E731
    kw = dict(block_size=8, stride=4, selection_block=16, num_selected=4, window=16, impl=impl,
              cu_seqlens=torch.tensor([0, 70, 200], dtype=torch.int32, device=device))
    exact = native_sparse_attention(q, (k, v), (k, v), (k, v), gates, compress, compress, selection_score="exact", **kw)
    start = native_sparse_attention(q, (k, v), (k, v), (k, v), gates, compress, compress, selection_score="indexer",
                                    indexer=indexer_init(g, g, d).to(device=device, dtype=dtype), **kw)
    assert torch.equal(start.block_idx, exact.block_idx)

    weight = _weight(1, g, d, seed=5).to(device=device, dtype=dtype)
    mixed = native_sparse_attention(q, (k, v), (k, v), (k, v), gates, compress, compress, selection_score="indexer",
                                    indexer=weight, indexer_loss=4, **kw)
    q_idx = indexer_queries(q, weight, hk).to(dtype)
    want = native_sparse_attention(q_idx, (k, v), (k, v), (k, v), torch.rand_like(gates[:, :, :hk]), compress,
                                   compress, selection_score="exact", **kw).block_idx
    assert torch.equal(mixed.block_idx, want)
    assert not torch.equal(mixed.block_idx, exact.block_idx), "one head picked as the group: the test proves nothing"
    terms = mixed.indexer_terms
    assert terms.rows.item() == sum(1 for r in range(0, t, 4) for _ in range(hk) if (r - (70 if r >= 70 else 0)) // 16 >= 4)
    assert terms.kl.item() > 0
    assert terms.choices == terms.rows and 0 < terms.overlap < terms.choices  # n = 4: one free pick a row


def test_indexer_score_needs_the_weight():
    q = torch.randn(1, 40, 2, 8)
    k = torch.randn(1, 40, 1, 8)
    compress = lambda x: mean_compress(x, 8, 4)  # noqa: E731
    with pytest.raises(ValueError, match="nsa.indexer_heads"):
        native_sparse_attention(q, (k, k), (k, k), (k, k), torch.rand(1, 40, 2, 3), compress, compress,
                                block_size=8, stride=4, selection_block=16, num_selected=3, window=8,
                                selection_score="indexer")


def test_rows_with_one_block_to_rank_cost_nothing():
    """Rows less than 4 l' into their document (one block to rank or none) are left out before anything is
    computed: documents of 30 tokens at l' = 8 give no term, and no graph to the weight."""
    q = torch.randn(1, 120, 4, 8)
    weight = indexer_init(1, 4, 8).requires_grad_()
    terms = indexer_loss_terms(q, weight, torch.randn(1, 120, 1, 8), selection_block=8, num_selected=5,
                               cu_seqlens=torch.tensor([0, 30, 60, 90, 120], dtype=torch.int32))
    assert [t.item() for t in terms] == [0.0, 0.0, 0.0, 0.0] and not terms.kl.requires_grad
