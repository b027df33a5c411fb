"""Properties of the pure-PyTorch NSA reference that hold by DESIGN §2, checked on the reference alone:
hand-computed block scores, causality, edge rows, forced blocks, determinism, gradients."""
import math

import pytest
import torch

from kernels.block_selection.naive import head_block_bounds, overlap_weights, select_blocks_ref, topn_from_scores
from kernels.compressed_attention.naive import compressed_attention_ref
from kernels.compression.naive import compress_documents, mean_compress, mlp_compress
from kernels.selected_attention.naive import selected_attention_ref
from kernels.window_attention.naive import window_attention_ref
from nsa_inputs import Case, Inputs, make_inputs, ref_phis, run_reference
from oracle import MlpPhiParams

CAUSAL_CASES = [
    Case(16, 8, 32, 4, 24, T=160, G=2, HK=2, kv="separate", phi="mlp"),
    Case(4, 2, 8, 6, 10, T=90, G=4, HK=1, kv="shared", phi="mean", B=2),
]


def test_overlap_weights_hand_computed():
    # l=32, d=16, l'=64, T=256: compressed block i covers [16i, 16i+32), N = 15; selection block j
    # covers [64j, 64j+64), S = 4. Block 4j-1 straddles into j by 16 tokens (1), 4j..4j+2 lie inside
    # (32 tokens: 2), 4j+3 sticks out of j by 16 (1). Block 0 has no i = -1; block 3 has no i = 15.
    want = torch.zeros(15, 4)
    want[0:4, 0] = torch.tensor([2, 2, 2, 1])
    want[3:8, 1] = torch.tensor([1, 2, 2, 2, 1])
    want[7:12, 2] = torch.tensor([1, 2, 2, 2, 1])
    want[11:15, 3] = torch.tensor([1, 2, 2, 2])
    torch.testing.assert_close(overlap_weights(15, 4, 32, 16, 64), want, rtol=0, atol=0)


def test_topn_from_scores_hand_built():
    l_sel, n = 16, 5
    scores = torch.tensor([
        # t=100: candidates 0..6, forced {0, 6, 5}; best two of 1..4 are 2 (0.7) then 3 (0.5, tied
        # with 4: the lower id wins); block 7 scores highest but starts after t.
        [0.0, 0.3, 0.7, 0.5, 0.5, 0.0, 0.0, 9.9],
        # t=20: only blocks 0 and 1 start at or before t, both forced: -1 padding after them.
        [0.0, 0.1, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0],
        # t=47: blocks 0..2 all forced (0, 2 and 1) even though they score least.
        [0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0],
        # t=127: forced {0, 7, 6}; 1..5 tie exactly, so the two lowest ids fill the free slots.
        [0.0, 0.5, 0.5, 0.5, 0.5, 0.5, 0.0, 0.0],
    ]).reshape(1, 4, 1, 8)
    query_pos = torch.tensor([100, 20, 47, 127])
    want = torch.tensor([[0, 2, 3, 5, 6], [0, 1, -1, -1, -1], [0, 1, 2, -1, -1], [0, 1, 2, 6, 7]],
                        dtype=torch.int32).reshape(1, 4, 1, n)
    got = topn_from_scores(scores, query_pos, l_sel, n)
    assert got.dtype == torch.int32
    assert torch.equal(got, want)


def test_select_blocks_from_hand_built_p_cmp():
    # One query at t=447 (q_start) with l=32, d=16, l'=64, n=5: all N=27 compressed blocks are
    # visible, selection blocks 0..6 are candidates, forced {0, 6, 5}, two free slots among 1..4.
    # With Dk=2, q_h = e_h, scale 1 and k_cmp[i] = (log p0[i], log p1[i]) the group's two heads
    # see exactly the probabilities p0, p1 below (every other block gets 1e-6).
    t, N = 447, 27
    p = torch.full((2, N), 1e-6, dtype=torch.float64)
    p[0, 7], p[0, 13], p[0, 0] = 0.26, 0.15, 0.59  # head 0
    p[1, 17], p[1, 11], p[1, 26] = 0.14, 0.10, 0.76  # head 1
    # Weighted scores (block j takes 1,2,2,2,1 from i = 4j-1..4j+3), summed over the two heads:
    #   block 1: i=7 (w1) 0.26                    = 0.26
    #   block 2: i=7 (w1) 0.26 + i=11 (w1) 0.10    = 0.36
    #   block 3: i=11 (w1) 0.10 + i=13 (w2) 0.30   = 0.40
    #   block 4: i=17 (w2) 0.28                    = 0.28
    # so {2, 3} win. Unweighted overlap would pick {1, 2}; max instead of sum over heads {3, 4}.
    q = torch.eye(2).reshape(1, 1, 2, 2)
    k_cmp = p.log().T.reshape(1, N, 1, 2).float()
    lse = torch.logsumexp(p.log(), dim=1).reshape(1, 1, 2).float()
    got = select_blocks_ref(q, k_cmp, lse, 32, 16, 64, 5, scale=1.0, q_start=t)
    assert got.tolist() == [[[[0, 2, 3, 5, 6]]]]
    # the largest head's score per block: 1: 0.26 (head 0), 2: 0.26 (head 0), 3: 0.30 (head 0), 4: 0.28 (head 1)
    got = select_blocks_ref(q, k_cmp, lse, 32, 16, 64, 5, scale=1.0, q_start=t, score="max")
    assert got.tolist() == [[[[0, 3, 4, 5, 6]]]]
    with pytest.raises(ValueError, match="'mean' is not one of"):
        select_blocks_ref(q, k_cmp, lse, 32, 16, 64, 5, scale=1.0, q_start=t, score="mean")


def branch_results(case: Case, inputs) -> dict:
    """Every reference branch run on its own, plus the composed function; each tensor has T at dim 1."""
    compress_k, compress_v = ref_phis(case, inputs)
    k_cmp, v_cmp = compress_k(inputs.kv_cmp[0]), compress_v(inputs.kv_cmp[1])
    o_cmp, lse_cmp = compressed_attention_ref(inputs.q, k_cmp, v_cmp, case.l, case.d)
    idx = select_blocks_ref(inputs.q, k_cmp, lse_cmp, case.l, case.d, case.l_sel, case.n)
    o_slc, lse_slc = selected_attention_ref(inputs.q, *inputs.kv_slc, idx, case.l_sel)
    o_win, lse_win = window_attention_ref(inputs.q, *inputs.kv_win, case.w)
    nsa = run_reference(case, inputs)
    return dict(k_cmp=k_cmp, v_cmp=v_cmp, o_cmp=o_cmp, lse_cmp=lse_cmp, idx=idx, o_slc=o_slc, lse_slc=lse_slc,
                o_win=o_win, lse_win=lse_win, output=nsa.output, block_idx=nsa.block_idx,
                nsa_lse_cmp=nsa.lse_cmp, nsa_lse_slc=nsa.lse_slc, nsa_lse_win=nsa.lse_win)


@pytest.mark.parametrize("case", CAUSAL_CASES)
def test_future_tokens_never_change_the_past(case):
    inputs = make_inputs(case)
    before = branch_results(case, inputs)
    gen = torch.Generator().manual_seed(7)
    # Cut points at a compression block end, a selection block end, and mid-block.
    for t0 in (case.l - 1, case.l_sel - 1, case.T // 2 + 3):
        changed = make_inputs(case)
        for x in {id(x): x for x in [changed.q, *changed.kv_cmp, *changed.kv_slc, *changed.kv_win,
                                     changed.gates]}.values():
            x[:, t0 + 1:] = torch.rand(x[:, t0 + 1:].shape, generator=gen) * 10 - 5
        after = branch_results(case, changed)
        ended = (t0 - case.l + 1) // case.d + 1  # compressed blocks with i*d + l - 1 <= t0
        for name in before:
            keep = ended if name in ("k_cmp", "v_cmp") else t0 + 1
            assert torch.equal(after[name][:, :keep], before[name][:, :keep]), (name, t0)
            if name in ("k_cmp", "v_cmp"):
                assert not torch.equal(after[name], before[name]), "the perturbation must reach phi"


def test_queries_without_a_compressed_block():
    # Queries t < l - 1 see no compressed block: o_cmp = 0 and lse = -inf, yet the output and
    # every gradient stay finite.
    case = CAUSAL_CASES[0]
    inputs = make_inputs(case)
    for x in inputs.leaves():
        x.requires_grad_(True)
    res = branch_results(case, inputs)
    early = case.l - 1
    assert torch.equal(res["o_cmp"][:, :early], torch.zeros_like(res["o_cmp"][:, :early]))
    assert torch.all(res["lse_cmp"][:, :early] == -math.inf)
    assert torch.all(res["nsa_lse_cmp"][:, :early] == -math.inf)
    assert torch.isfinite(res["lse_cmp"][:, early:]).all()
    assert torch.isfinite(res["output"]).all()
    grads = torch.autograd.grad(res["output"].sum() + res["o_cmp"].sum(), inputs.leaves())
    assert all(torch.isfinite(g).all() for g in grads)


def test_forced_blocks_always_selected():
    # Compressed scores peak in the middle of the sequence, so block 0 and the local blocks get the
    # least probability mass: they must be selected anyway.
    l, d, l_sel, n, T = 4, 2, 8, 4, 96
    N = (T - l) // d + 1
    q = torch.ones(1, T, 2, 4)
    k_cmp = (-0.05 * (torch.arange(N) - N / 2) ** 2).reshape(1, N, 1, 1).expand(1, N, 1, 4).contiguous()
    v_cmp = torch.randn(1, N, 1, 3)
    _, lse = compressed_attention_ref(q, k_cmp, v_cmp, l, d, scale=1.0)
    idx = select_blocks_ref(q, k_cmp, lse, l, d, l_sel, n, scale=1.0)
    for t in range(T):
        chosen = set(idx[0, t, 0].tolist())
        assert {0, t // l_sel, max(t // l_sel - 1, 0)} <= chosen, t
    # At t = 95 the one free slot goes to block 6 (compressed blocks 23..27, nearest the peak at
    # i = 23.5), so forcing is what kept block 0 and the local blocks 10, 11 in.
    assert set(idx[0, T - 1, 0].tolist()) == {0, 6, 10, 11}


def test_selection_is_deterministic_and_padded():
    case = CAUSAL_CASES[1]
    inputs = make_inputs(case)
    compress_k, compress_v = ref_phis(case, inputs)
    k_cmp, v_cmp = compress_k(inputs.kv_cmp[0]), compress_v(inputs.kv_cmp[1])
    _, lse = compressed_attention_ref(inputs.q, k_cmp, v_cmp, case.l, case.d)
    args = (inputs.q, k_cmp, lse, case.l, case.d, case.l_sel, case.n)
    idx = select_blocks_ref(*args)
    # Recomputation, and any chunking of the queries, selects identically.
    assert torch.equal(select_blocks_ref(*args), idx)
    assert torch.equal(select_blocks_ref(*args, chunk_size=7), idx)
    assert torch.equal(run_reference(case, inputs).block_idx, idx)
    assert idx.dtype == torch.int32 and idx.shape == (case.B, case.T, case.HK, case.n)
    for t in range(case.T):
        valid = min(case.n, t // case.l_sel + 1)
        for row in idx[:, t].reshape(-1, case.n).tolist():
            assert row[valid:] == [-1] * (case.n - valid), (t, row)
            assert row[:valid] == sorted(set(row[:valid])) and row[0] == 0, (t, row)


def test_exact_ties_go_to_the_lower_block():
    # k_cmp = 0 gives every visible compressed block the same probability; every selection block
    # that is neither forced nor recent has all its compressed blocks visible, so they tie exactly.
    l, d, l_sel, n, T = 4, 2, 8, 5, 96
    N = (T - l) // d + 1
    q = torch.randn(1, T, 2, 4, generator=torch.Generator().manual_seed(0))
    k_cmp = torch.zeros(1, N, 1, 4)
    _, lse = compressed_attention_ref(q, k_cmp, torch.zeros(1, N, 1, 3), l, d)
    idx = select_blocks_ref(q, k_cmp, lse, l, d, l_sel, n)
    for t in range(3 * l_sel, T):
        cur = t // l_sel
        free = [j for j in range(1, cur - 1)][:n - 3]
        assert [j for j in idx[0, t, 0].tolist() if j >= 0] == sorted({0, cur - 1, cur, *free}), t


# gradcheck at its float64 defaults: the reference computes in float64 for float64 inputs.
GRADCHECK = dict()
TINY = Case(4, 2, 8, 3, 5, T=20, G=2, HK=1, kv="separate", phi="mlp", Dk=3, Dv=2)


def test_gradcheck_nsa():
    # Every differentiable input of the composed function: q, (k, v) of each branch, gates and both
    # phi MLPs. n = 3 with l' = 8 leaves no free top-n slot, so the (non-differentiable) selection
    # cannot flip under the finite-difference steps.
    inputs = make_inputs(TINY, dtype=torch.float64, hidden=4)

    def nsa(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, *phi):
        rebuilt = Inputs(q, (k_cmp, v_cmp), (k_slc, v_slc), (k_win, v_win), gates,
                         MlpPhiParams(*phi[:5]), MlpPhiParams(*phi[5:]))
        return run_reference(TINY, rebuilt).output

    leaves = [x.requires_grad_(True) for x in inputs.leaves()]
    assert torch.autograd.gradcheck(nsa, leaves, **GRADCHECK)


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64,
                       requires_grad=True)


def test_gradcheck_compression():
    l, d = TINY.l, TINY.d
    x = _randn(1, 12, 2, 3)
    assert torch.autograd.gradcheck(lambda x: mean_compress(x, l, d), (x,), **GRADCHECK)
    p = make_inputs(TINY, dtype=torch.float64, hidden=4).phi_k
    params = [t.requires_grad_(True) for t in (p.pos_emb, p.w1, p.b1, p.w2, p.b2)]
    assert torch.autograd.gradcheck(lambda x, *p: mlp_compress(x, l, d, *p), (x, *params), **GRADCHECK)


@pytest.mark.parametrize("seq, l, d", [(67, 16, 8), (131, 32, 16), (64, 64, 64), (16, 16, 8), (15, 16, 8),
                                        (50, 12, 8)])
def test_mean_compress_is_each_blocks_mean(seq, l, d):
    """By runs of d tokens where d divides l (else by unfolded blocks): block i is the mean of tokens
    i*d .. i*d+l-1, with no block where fewer than l tokens remain."""
    x = _randn(2, seq, 3, 5)
    got = mean_compress(x, l, d)
    blocks = [x[:, i * d : i * d + l].mean(dim=1) for i in range((seq - l) // d + 1 if seq >= l else 0)]
    want = torch.stack(blocks, dim=1) if blocks else x.new_zeros(2, 0, 3, 5)
    assert got.shape == want.shape
    assert torch.allclose(got, want, rtol=0, atol=1e-12)


# The branch checks use chunk_size=8 so that several query chunks (each recomputed in backward) are hit.
def test_gradcheck_compressed_attention():
    l, d, T = TINY.l, TINY.d, TINY.T
    N = (T - l) // d + 1
    q, k_cmp, v_cmp = _randn(1, T, 2, 3, seed=1), _randn(1, N, 1, 3, seed=2), _randn(1, N, 1, 2, seed=3)

    def f(q, k_cmp, v_cmp):
        o, lse = compressed_attention_ref(q, k_cmp, v_cmp, l, d, chunk_size=8)
        return o, lse[:, l - 1:]  # earlier rows are -inf, which finite differences cannot difference

    assert torch.autograd.gradcheck(f, (q, k_cmp, v_cmp), **GRADCHECK)


def test_gradcheck_selected_attention():
    l_sel, T = TINY.l_sel, TINY.T
    q, k, v = _randn(1, T, 2, 3, seed=1), _randn(1, T, 1, 3, seed=2), _randn(1, T, 1, 2, seed=3)
    # Unordered ids with a -1 hole in the middle: the documented contract is "distinct ids, any order".
    cur = [t // l_sel for t in range(T)]
    idx = torch.tensor([[c, -1, 0 if c > 0 else -1] for c in cur], dtype=torch.int32).reshape(1, T, 1, 3)

    def f(q, k, v):
        return selected_attention_ref(q, k, v, idx, l_sel, chunk_size=8)

    assert torch.autograd.gradcheck(f, (q, k, v), **GRADCHECK)


def test_gradcheck_window_attention():
    T, w = TINY.T, TINY.w
    q, k, v = _randn(1, T, 2, 3, seed=1), _randn(1, T, 1, 3, seed=2), _randn(1, T, 1, 2, seed=3)

    def f(q, k, v):
        return window_attention_ref(q, k, v, w, chunk_size=8)

    assert torch.autograd.gradcheck(f, (q, k, v), **GRADCHECK)


@pytest.mark.parametrize("phi", ["mean", "mlp"])
def test_compress_documents_equals_each_document_alone(phi):
    """Packed documents compressed in one gather equal phi run on each document's slice, in value and in
    the gradients of x and of phi's weights; documents shorter than a block give no compressed token."""
    l, d, heads, dim = 8, 4, 2, 6
    torch.manual_seed(0)
    cu_seqlens = torch.tensor([0, 5, 40, 41, 100, 131], dtype=torch.int32)  # 5 and 1 tokens: no block
    x = torch.randn(1, 131, heads, dim, dtype=torch.float64, requires_grad=True)
    weights = [torch.randn(l, dim), torch.randn(16, l * dim) / 8, torch.randn(16), torch.randn(dim, 16) / 4,
               torch.randn(dim)]
    weights = [w.double().requires_grad_() for w in weights]
    if phi == "mean":
        def compress(t):
            return mean_compress(t, l, d)
    else:
        def compress(t):
            return mlp_compress(t, l, d, *weights)
    upstream = None
    grads = []
    for gathered in (True, False):
        if gathered:
            out = compress_documents(compress, x, cu_seqlens, l, d)
        else:
            bounds = cu_seqlens.tolist()
            out = torch.cat([compress(x[:, lo:hi]) for lo, hi in zip(bounds[:-1], bounds[1:])], dim=1)
        upstream = torch.randn_like(out) if upstream is None else upstream
        leaves = [x] + (weights if phi == "mlp" else [])
        grads.append((out.detach(), torch.autograd.grad(out, leaves, upstream)))
    (out_a, grads_a), (out_b, grads_b) = grads
    assert out_a.shape == (1, 7 + 13 + 6, heads, dim)  # documents of 35, 59 and 31 tokens: (n - 8) // 4 + 1
    torch.testing.assert_close(out_a, out_b, rtol=1e-12, atol=1e-12)  # the MLP batches its matmuls otherwise
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("branch", ["slc", "win"])
def test_short_documents_with_one_gate_open_are_dense_attention(branch):
    """On packed documents that fit in the window (and whose blocks fit in the n picks), NSA with only the
    window gate (or only the selection gate) open is causal softmax attention inside each document: the
    selection picks every block a query can see. tools/gpu_check.py checks the same on the Triton kernels
    at the proof's 2K-stage shape."""
    from kernels.nsa import native_sparse_attention

    l, d, l_sel, n, w = 8, 4, 16, 4, 24
    lengths = [24, 1, 17, 9, 24, 3, 20, 24, 16]  # each within the window and at most 3 selection blocks
    T, hq, hk, dim = sum(lengths), 4, 2, 6
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, T, h, dim, dtype=torch.float64) for h in (hq, hk, hk))
    bounds = cu.tolist()
    dense = torch.cat([
        torch.nn.functional.scaled_dot_product_attention(
            *(x[:, lo:hi].transpose(1, 2).repeat_interleave(hq // x.shape[2], dim=1) for x in (q, k, v)),
            is_causal=True).transpose(1, 2)
        for lo, hi in zip(bounds[:-1], bounds[1:])], dim=1)
    gates = torch.zeros(1, T, hq, 3, dtype=torch.float64)
    gates[..., ("cmp", "slc", "win").index(branch)] = 1
    phi = lambda x: mean_compress(x, l, d)  # noqa: E731
    out = native_sparse_attention(q, (k, v), (k, v), (k, v), gates, phi, phi, block_size=l, stride=d,
                                  selection_block=l_sel, num_selected=n, window=w, cu_seqlens=cu).output
    torch.testing.assert_close(out, dense, rtol=1e-12, atol=1e-12)


def _angles(positions: torch.Tensor, dim: int, base: float = 1e4) -> torch.Tensor:
    """RoPE angles [N, dim] of positions, each half's angle repeated (Megatron's rotate-half tables)."""
    angles = positions.double()[:, None] * base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    return torch.cat([angles, angles], dim=-1)


def test_rope_rows_rotates_channel_pairs():
    """rope_rows turns each pair (x_i, x_{i+R/2}) by its angle: the complex product (x_i + i x_{i+R/2}) e^{ia},
    and leaves the channels past R alone."""
    from kernels.nsa import rope_rows

    x = _randn(2, 7, 3, 10, seed=5)
    angles = _angles(torch.arange(7) * 13, 8)
    got = rope_rows(x, angles)
    z = torch.complex(x[..., :4], x[..., 4:8]) * torch.exp(1j * angles[:, None, :4])
    torch.testing.assert_close(got[..., :4], z.real, rtol=0, atol=1e-14)
    torch.testing.assert_close(got[..., 4:8], z.imag, rtol=0, atol=1e-14)
    assert torch.equal(got[..., 8:], x[..., 8:])


@pytest.mark.parametrize("kv", ["shared", "separate"])
def test_compressed_keys_roped_at_their_blocks_depend_on_distances_only(kv):
    """Moving a whole sequence to later RoPE positions changes nothing that depends on distances only.
    With nsa.compression_rope "blocks" (phi over the keys before RoPE, each compressed key rotated at its
    block's first position) NSA's output stays the same; so it does with "keys" and phi mean (a mean of
    rotated keys is the block's rotation of a mean of block-relative ones); with "keys" and phi mlp, the
    compressed keys depend on absolute positions, and the output changes."""
    from kernels.nsa import native_sparse_attention, rope_rows

    def nsa(case, inputs, offset, mode):
        token_angles = _angles(torch.arange(case.T) + offset, case.Dk)
        rope = lambda x: rope_rows(x, token_angles)  # noqa: E731
        (k_cmp, v_cmp), (k_slc, v_slc), (k_win, v_win) = inputs.kv_cmp, inputs.kv_slc, inputs.kv_win
        cmp_rope = None
        if mode == "blocks":
            blocks = (case.T - case.l) // case.d + 1
            cmp_rope = _angles(torch.arange(blocks) * case.d + offset, case.Dk)
        else:
            k_cmp = rope(k_cmp)
        compress_k, compress_v = ref_phis(case, inputs)
        return native_sparse_attention(
            rope(inputs.q), (k_cmp, v_cmp), (rope(k_slc), v_slc), (rope(k_win), v_win), inputs.gates, compress_k,
            compress_v, block_size=case.l, stride=case.d, selection_block=case.l_sel, num_selected=case.n,
            window=case.w, cmp_rope=cmp_rope)

    for phi, mode, invariant in (("mlp", "blocks", True), ("mean", "blocks", True), ("mean", "keys", True),
                                 ("mlp", "keys", False)):
        case = Case(8, 4, 16, 4, 12, T=96, G=2, HK=2, kv=kv, phi=phi)
        inputs = make_inputs(case, torch.float64)
        at_zero, later = nsa(case, inputs, 0, mode), nsa(case, inputs, 1003, mode)
        what = f"phi {phi}, compression_rope {mode}"
        if invariant:
            torch.testing.assert_close(later.output, at_zero.output, rtol=0, atol=1e-10, msg=lambda m: f"{what}: {m}")
            assert torch.equal(later.block_idx, at_zero.block_idx), what
        else:
            seen = slice(case.l - 1, None)  # queries that see a compressed block (before: lse -inf)
            assert (later.lse_cmp[:, seen] - at_zero.lse_cmp[:, seen]).abs().max() > 1e-2, what
            assert (later.output - at_zero.output).abs().max() > 1e-3, what


def test_bound_score_is_the_largest_possible_qk_of_each_block():
    """head_block_bounds against the bound computed by hand: per whole block and channel the larger of q
    times the block's smallest and largest key, summed and scaled, then a softmax over the whole blocks; no
    key of a block scores above its bound."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 4, 8, generator=gen, dtype=torch.float64).float()  # rows at 46, 47; HQ=4, HK=2
    keys = torch.randn(1, 48, 2, 8, generator=gen, dtype=torch.float64).float()  # 3 blocks of 16
    probs = head_block_bounds(q, keys, 16, 0.5, q_start=46)  # [1, C=2, HK=2, G=2, S=3]
    assert probs.shape == (1, 2, 2, 2, 3)
    for row, whole in ((0, 2), (1, 3)):  # position 46 has seen blocks 0-1 whole, 47 ends block 2 too
        for head in range(4):
            hk, g = divmod(head, 2)
            qv = q[0, row, head]
            logits = []
            for block in range(whole):
                k = keys[0, block * 16 : block * 16 + 16, hk]
                logits.append(0.5 * torch.maximum(qv * k.min(0).values, qv * k.max(0).values).sum())
                assert (0.5 * k @ qv).max() <= logits[-1] + 1e-5
            assert torch.allclose(probs[0, row, hk, g, :whole], torch.softmax(torch.stack(logits), 0), atol=1e-6)
            assert (probs[0, row, hk, g, whole:] == 0).all()  # a block still filling scores 0
