"""The pure-PyTorch reference (kernels/) against the independent per-token oracle (oracle.py).

Inputs are fp32 (the reference's working precision); the oracle recomputes in float64, so the
tolerance is fp32 rounding. Selected block sets must match exactly.
"""
from functools import cache

import pytest
import torch

import oracle
from kernels.block_selection.naive import select_blocks_ref
from kernels.compressed_attention.naive import compressed_attention_ref
from kernels.compression.naive import num_compressed_blocks
from kernels.selected_attention.naive import selected_attention_ref
from kernels.window_attention.naive import window_attention_ref
from nsa_inputs import (Case, block_idx_tensor, block_sets, make_inputs, ref_phis, run_oracle,
                        run_reference)

# (l, d, l', n, w) with T chosen so that top-n has real choices where n allows it: with n = 3 the
# three forced blocks fill every slot, so those geometries pin the forced rule and the -1 padding,
# and the n = 4, 5, 6 ones (T past n+1 selection blocks) pin the scoring.
CASES = [
    Case(16, 8, 32, 4, 24, T=160, G=1, HK=2, kv="shared", phi="mean", B=2),
    Case(16, 8, 32, 4, 24, T=160, G=4, HK=2, kv="separate", phi="mlp"),
    Case(32, 16, 64, 5, 40, T=400, G=2, HK=1, kv="separate", phi="mean"),
    Case(32, 16, 64, 5, 40, T=400, G=1, HK=2, kv="shared", phi="mlp", Dk=4, Dv=6),
    Case(8, 4, 16, 3, 7, T=72, G=16, HK=1, kv="shared", phi="mlp"),
    Case(8, 4, 16, 3, 7, T=72, G=2, HK=2, kv="separate", phi="mean", B=2),
    Case(16, 16, 16, 3, 33, T=100, G=4, HK=1, kv="separate", phi="mlp"),
    Case(16, 16, 16, 3, 33, T=100, G=16, HK=1, kv="shared", phi="mean"),
    Case(4, 2, 8, 6, 10, T=90, G=2, HK=2, kv="shared", phi="mlp", B=2),
    Case(4, 2, 8, 6, 10, T=90, G=16, HK=1, kv="separate", phi="mean"),
]
IDS = [f"l{c.l}d{c.d}s{c.l_sel}n{c.n}w{c.w}-G{c.G}HK{c.HK}-{c.kv}-{c.phi}" for c in CASES]
TOL = dict(rtol=1e-5, atol=1e-5)


@cache
def computed(case: Case):
    """Inputs, reference result and oracle result of one case, shared by the tests below."""
    inputs = make_inputs(case)
    return inputs, run_reference(case, inputs), run_oracle(case, inputs)


def close(ref: torch.Tensor, want: torch.Tensor, **tol):
    torch.testing.assert_close(ref.to(torch.float64), want.to(torch.float64), **(tol or TOL))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_compression_matches_oracle(case):
    inputs, _, want = computed(case)
    compress_k, compress_v = ref_phis(case, inputs)
    assert num_compressed_blocks(case.T, case.l, case.d) == oracle.num_blocks(case.T, case.l, case.d)
    close(compress_k(inputs.kv_cmp[0]), want.k_cmp)
    close(compress_v(inputs.kv_cmp[1]), want.v_cmp)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_compressed_attention_matches_oracle(case):
    inputs, _, want = computed(case)
    o, lse = compressed_attention_ref(inputs.q, want.k_cmp.float(), want.v_cmp.float(), case.l, case.d)
    close(o, want.o_cmp)
    close(lse, want.lse_cmp)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_block_selection_matches_oracle(case):
    inputs, _, want = computed(case)
    idx = select_blocks_ref(inputs.q, want.k_cmp.float(), want.lse_cmp.float(), case.l, case.d, case.l_sel,
                            case.n)
    assert block_sets(idx) == want.selected


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_selected_attention_matches_oracle(case):
    inputs, _, want = computed(case)
    idx = block_idx_tensor(want.selected, case.n)
    o, lse = selected_attention_ref(inputs.q, *inputs.kv_slc, idx, case.l_sel)
    close(o, want.o_slc)
    close(lse, want.lse_slc)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_window_attention_matches_oracle(case):
    inputs, _, want = computed(case)
    o, lse = window_attention_ref(inputs.q, *inputs.kv_win, case.w)
    close(o, want.o_win)
    close(lse, want.lse_win)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_nsa_matches_oracle(case):
    _, got, want = computed(case)
    assert block_sets(got.block_idx) == want.selected
    close(got.output, want.output)
    close(got.lse_cmp, want.lse_cmp)
    close(got.lse_slc, want.lse_slc)
    close(got.lse_win, want.lse_win)


def test_cases_make_real_top_n_choices():
    """Guards the suite against vacuity: some queries must pick a block other than the lowest free id."""
    surprising = 0
    for case in CASES:
        for per_b in computed(case)[2].selected:
            for t, per_t in enumerate(per_b):
                candidates = (t // case.l_sel) + 1
                for chosen in per_t:
                    forced = {0, t // case.l_sel, t // case.l_sel - 1} - {-1}
                    lowest = sorted(set(range(candidates)) - forced)[:case.n - len(forced)]
                    surprising += chosen != forced | set(lowest)
    assert surprising > 100


# nsa.selection_score "max": top-n ranks a block by its largest single head's score, not the group's sum
MAX_CASES = [
    Case(16, 8, 32, 4, 24, T=160, G=4, HK=2, kv="separate", phi="mlp", score="max"),
    Case(4, 2, 8, 6, 10, T=90, G=16, HK=1, kv="shared", phi="mean", score="max", B=2),
]


def nsa_matches_oracle_with_gradients(case: Case):
    """Whole NSA, reference against oracle: the picks, the output, the selected branch's lse and the
    gradient of every differentiable input. Returns (inputs, reference result, oracle result)."""
    inputs = make_inputs(case)
    leaves = inputs.leaves()
    for x in leaves:
        x.requires_grad_(True)
    got, want = run_reference(case, inputs), run_oracle(case, inputs)
    assert block_sets(got.block_idx) == want.selected
    close(got.output, want.output)
    close(got.lse_slc, want.lse_slc)
    cotangent = torch.randn(got.output.shape, generator=torch.Generator().manual_seed(1))
    got_grads = torch.autograd.grad(got.output, leaves, cotangent)
    want_grads = torch.autograd.grad(want.output, leaves, cotangent.double())
    for g, w in zip(got_grads, want_grads):
        close(g, w)
    return inputs, got, want


# nsa.selection_score "exact": top-n ranks a block by the group's attention mass on its raw keys (the
# selection branch's keys, separate from the compressed branch's in the first case)
EXACT_CASES = [
    Case(16, 8, 16, 4, 24, T=112, G=4, HK=2, kv="separate", phi="mlp", score="exact"),
    Case(8, 4, 16, 4, 10, T=160, G=16, HK=1, kv="shared", phi="mean", score="exact", B=2),
]


# nsa.selection_score "bound": top-n ranks a block by the largest q.k its keys' channel-wise range allows
BOUND_CASES = [
    Case(16, 8, 16, 4, 24, T=112, G=4, HK=2, kv="separate", phi="mlp", score="bound"),
    Case(8, 4, 16, 4, 10, T=160, G=16, HK=1, kv="shared", phi="mean", score="bound", B=2),
]


@pytest.mark.parametrize("case", MAX_CASES + EXACT_CASES + BOUND_CASES,
                         ids=["max-G4HK2", "max-G16HK1", "exact-G4HK2-separate", "exact-G16HK1-shared",
                              "bound-G4HK2-separate", "bound-G16HK1-shared"])
def test_other_scores_match_oracle(case):
    inputs, got, want = nsa_matches_oracle_with_gradients(case)
    # not the sum's picks: the option changes what is selected
    summed = select_blocks_ref(inputs.q, want.k_cmp.float(), want.lse_cmp.float(), case.l, case.d, case.l_sel,
                               case.n)
    assert (summed != got.block_idx).any(-1).sum() > 10


@pytest.mark.parametrize("case", [CASES[1], CASES[4], CASES[9]], ids=[IDS[1], IDS[4], IDS[9]])
def test_nsa_gradients_match_oracle(case):
    """Reference autograd (fp32) against the oracle's autograd (float64) for every differentiable input."""
    inputs = make_inputs(case)
    leaves = inputs.leaves()
    for x in leaves:
        x.requires_grad_(True)
    got = run_reference(case, inputs).output
    want = run_oracle(case, inputs).output
    cotangent = torch.randn(got.shape, generator=torch.Generator().manual_seed(1))
    got_grads = torch.autograd.grad(got, leaves, cotangent)
    want_grads = torch.autograd.grad(want, leaves, cotangent.double())
    for g, w in zip(got_grads, want_grads):
        close(g, w)


# Sequences of at most n * l' tokens: every query can choose from at most n blocks, so top-n must pick them
# all (the curriculum's short samples). The oracle selects and attends per token: the picks, outputs, each
# branch's lse and every gradient must agree.
SHORT_CASES = [
    Case(16, 8, 32, 4, 24, T=128, G=4, HK=2, kv="separate", phi="mlp"),  # exactly n * l'
    Case(8, 4, 16, 5, 7, T=75, G=2, HK=1, kv="shared", phi="mean", B=2),
]


@pytest.mark.parametrize("case", SHORT_CASES, ids=["T=n*l'", "T<n*l'"])
def test_sequence_within_n_blocks_takes_every_block(case):
    _, _, want = nsa_matches_oracle_with_gradients(case)
    every = [[[frozenset(range(t // case.l_sel + 1))] * case.HK for t in range(case.T)] for _ in range(case.B)]
    assert want.selected == every


# q_start: a query chunk [s, e) at its global offset, as context parallelism calls the branches.
@pytest.mark.parametrize("case,s,e", [(CASES[1], 37, 131), (CASES[6], 15, 61), (CASES[9], 9, 90)],
                         ids=[IDS[1], IDS[6], IDS[9]])
def test_q_start_equals_slice_of_full_sequence(case, s, e):
    inputs, _, want = computed(case)
    q = inputs.q[:, s:e]
    k_cmp, v_cmp = want.k_cmp.float(), want.v_cmp.float()

    full_o, full_lse = compressed_attention_ref(inputs.q, k_cmp, v_cmp, case.l, case.d)
    o, lse = compressed_attention_ref(q, k_cmp, v_cmp, case.l, case.d, q_start=s)
    close(o, full_o[:, s:e])
    close(lse, full_lse[:, s:e])
    oo, olse = oracle.compressed_attention(q, k_cmp, v_cmp, case.l, case.d, q_start=s)
    close(o, oo)
    close(lse, olse)

    full_idx = select_blocks_ref(inputs.q, k_cmp, full_lse, case.l, case.d, case.l_sel, case.n)
    idx = select_blocks_ref(q, k_cmp, full_lse[:, s:e], case.l, case.d, case.l_sel, case.n, q_start=s)
    assert torch.equal(idx, full_idx[:, s:e])
    assert block_sets(idx) == oracle.select_blocks(q, k_cmp, case.l, case.d, case.l_sel, case.n, case.T,
                                                   q_start=s)

    full_o, full_lse = selected_attention_ref(inputs.q, *inputs.kv_slc, full_idx, case.l_sel)
    o, lse = selected_attention_ref(q, *inputs.kv_slc, idx, case.l_sel, q_start=s)
    close(o, full_o[:, s:e])
    close(lse, full_lse[:, s:e])

    # The window branch gets keys from a left halo only; start the halo a few tokens earlier than
    # needed so that keys outside the window are present and must be ignored.
    k_start = max(0, s - case.w - 3)
    k, v = (x[:, k_start:e] for x in inputs.kv_win)
    full_o, full_lse = window_attention_ref(inputs.q, *inputs.kv_win, case.w)
    o, lse = window_attention_ref(q, k, v, case.w, q_start=s, k_start=k_start)
    close(o, full_o[:, s:e])
    close(lse, full_lse[:, s:e])
    oo, olse = oracle.window_attention(q, k, v, case.w, q_start=s, k_start=k_start)
    close(o, oo)
    close(lse, olse)

