"""kernels/block_selection/alignment.py: the selection alignment loss against a loop over rows, blocks and
keys written from its definition; its gradient reaches the queries and compressed keys only."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels.block_selection.alignment import selection_alignment_terms
from kernels.selected_attention.naive import selected_attention_ref


def _loop(q, k_slc, lse_slc, k_cmp, lse_cmp, block_idx, l, d, lp, scale, q_start, docs, row_stride=1):
    """One (row, KV head) at a time: KL(target || pred) over the free picked blocks (not block 0 or the two
    local ones) that an ended compressed token overlaps, target the selected branch's mass there (mean over
    the group), pred the selection score."""
    _, t, hq, _ = q.shape
    hk = k_slc.shape[2]
    g = hq // hk
    cmp_counts = [max(0, (end - start - l) // d + 1) for start, end in docs]
    total, rows = 0.0, 0
    for r in range(0, t, row_stride):
        p = q_start + r
        doc = next(i for i, (start, end) in enumerate(docs) if start <= p < end)
        first, pos, cmp_first = docs[doc][0], p - docs[doc][0], sum(cmp_counts[:doc])
        for h in range(hk):
            targets, scores = [], []
            for b in (int(x) for x in block_idx[0, r, h] if x >= 0 and x not in (0, pos // lp, pos // lp - 1)):
                mass = sum(math.exp(float(q[0, r, h * g + j] @ k_slc[0, first + key, h]) * scale
                                    - float(lse_slc[0, r, h * g + j]))
                           for j in range(g) for key in range(b * lp, b * lp + lp) if key <= pos) / g
                score, comparable = 0.0, False
                for i in range(cmp_counts[doc]):
                    overlap = max(0, min(i * d + l, (b + 1) * lp) - max(i * d, b * lp))
                    if overlap > 0 and i * d + l - 1 <= pos:
                        comparable = True
                        score += sum(overlap / d * math.exp(float(q[0, r, h * g + j] @ k_cmp[0, cmp_first + i, h])
                                                            * scale - float(lse_cmp[0, r, h * g + j]))
                                     for j in range(g))
                if comparable:
                    targets.append(mass)
                    scores.append(score)
            if sum(targets) > 0:
                targets = [x / sum(targets) for x in targets]
                preds = [x / sum(scores) for x in scores]
                total += sum(x * math.log(x / y) for x, y in zip(targets, preds) if x > 0)
                rows += 1
    return total, rows


def _slot_lse(q, k_slc, block_idx, lp, scale=None, q_start=0, cu_seqlens=None):
    """The selected branch's log-sum-exp per slot, as compose_nsa takes it from the branch's forward (the
    reference's; the Triton kernel's is checked against it in test_triton_selected_attention.py)."""
    return selected_attention_ref(q, k_slc, k_slc, block_idx, lp, scale, q_start=q_start, cu_seqlens=cu_seqlens,
                                  slot_lse=True)[2]


def _inputs(t, hq, hk, d_head, num_cmp, n, lp, q_start, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, t, hq, d_head, generator=gen, dtype=torch.float64)
    k_slc = torch.randn(1, q_start + t, hk, d_head, generator=gen, dtype=torch.float64)
    k_cmp = torch.randn(1, num_cmp, hk, d_head, generator=gen, dtype=torch.float64)
    lse_slc = torch.rand(1, t, hq, generator=gen, dtype=torch.float64) * 3
    lse_cmp = torch.rand(1, t, hq, generator=gen, dtype=torch.float64) * 3
    # picks: block 0, the row's own block and random earlier ones, -1 padded (as top-n writes them)
    block_idx = torch.full((1, t, hk, n), -1, dtype=torch.int32)
    return q, k_slc, lse_slc, k_cmp, lse_cmp, block_idx, gen


@pytest.mark.timeout(120)
@pytest.mark.parametrize("packed, q_start, row_stride", [(False, 0, 1), (False, 40, 1), (True, 0, 1), (True, 24, 1),
                                                        (True, 24, 3)])
def test_matches_a_loop_over_rows_blocks_and_keys(packed, q_start, row_stride):
    l, d, lp, n, t, hq, hk = 8, 4, 8, 5, 56, 4, 2
    docs = [(0, 37), (37, 61), (61, q_start + t)] if packed else [(0, q_start + t)]
    num_cmp = sum(max(0, (end - start - l) // d + 1) for start, end in docs)
    q, k_slc, lse_slc, k_cmp, lse_cmp, block_idx, gen = _inputs(t, hq, hk, 8, num_cmp, n, lp, q_start, 0)
    for r in range(t):
        p = q_start + r
        start = next(s for s, e in docs if s <= p < e)
        current = (p - start) // lp
        for h in range(hk):
            picks = sorted({0, current} | set(torch.randint(0, current + 1, (n,), generator=gen).tolist()))[:n]
            block_idx[0, r, h, : len(picks)] = torch.tensor(picks, dtype=torch.int32)
    cu_seqlens = torch.tensor([s for s, _ in docs] + [docs[-1][1]], dtype=torch.int32) if packed else None
    slot_lse = _slot_lse(q, k_slc, block_idx, lp, 0.3, q_start, cu_seqlens)
    total, rows = selection_alignment_terms(q, slot_lse, lse_slc, k_cmp, lse_cmp, block_idx, block_size=l, stride=d,
                                            selection_block=lp, scale=0.3, q_start=q_start, cu_seqlens=cu_seqlens,
                                            row_stride=row_stride, chunk_size=13)
    want_total, want_rows = _loop(q, k_slc, lse_slc, k_cmp, lse_cmp, block_idx, l, d, lp, 0.3, q_start, docs,
                                  row_stride)
    assert want_rows >= 10 // row_stride and want_total > 0  # (row, KV head) pairs with free comparable blocks
    assert rows.item() == want_rows and total.item() == pytest.approx(want_total, rel=1e-5)


@pytest.mark.timeout(120)
def test_gradient_reaches_queries_and_compressed_keys_and_lowers_the_loss():
    l, d, lp, n, t, hq, hk = 8, 4, 16, 6, 128, 4, 1
    num_cmp = (t - l) // d + 1
    q, k_slc, lse_slc, k_cmp, lse_cmp, block_idx, _ = _inputs(t, hq, hk, 8, num_cmp, n, lp, 0, 1)
    for r in range(t):  # every visible block, up to n
        picks = list(range(min(n, r // lp + 1)))
        block_idx[0, r, 0, : len(picks)] = torch.tensor(picks, dtype=torch.int32)
    q.requires_grad_(True)
    k_cmp.requires_grad_(True)
    k_slc.requires_grad_(True)
    kwargs = dict(block_size=l, stride=d, selection_block=lp, scale=0.3)

    slot_lse = _slot_lse(q, k_slc, block_idx, lp, 0.3)
    assert not slot_lse.requires_grad  # the target is a constant

    def loss():
        total, rows = selection_alignment_terms(q, slot_lse, lse_slc, k_cmp, lse_cmp, block_idx, **kwargs)
        return total / rows

    before = loss()
    before.backward()
    assert before.item() > 0
    assert q.grad.abs().sum() > 0 and k_cmp.grad.abs().sum() > 0
    assert k_slc.grad is None
    for _ in range(20):  # a few steps on the compressed keys alone move the scores toward the target
        (grad,) = torch.autograd.grad(loss(), k_cmp)
        with torch.no_grad():
            k_cmp -= 50.0 * grad
    assert loss().item() < 0.5 * before.item()


def test_a_sequence_without_compressed_tokens_has_nothing_to_align():
    q, k_slc, lse_slc, k_cmp, lse_cmp, block_idx, _ = _inputs(6, 2, 1, 8, 0, 3, 16, 0, 2)
    block_idx[..., 0] = 0
    total, rows = selection_alignment_terms(q, _slot_lse(q, k_slc, block_idx, 16), lse_slc, k_cmp, lse_cmp, block_idx,
                                            block_size=8, stride=4,
                                            selection_block=16)
    assert total.item() == 0 and rows.item() == 0


@pytest.mark.timeout(60)
def test_a_later_compressed_key_far_above_the_rows_scores_leaves_the_gradient_finite():
    # A compressed token a row cannot see yet (it ends after the row) whose logit lies far above the row's
    # log-sum-exp: its exp overflows, and before the exponent was masked, its zero weight turned that inf
    # into a NaN gradient (the v20_align probe's NaN at step 434 of its first stage)
    l, d, lp, n, t, hq, hk = 8, 4, 8, 8, 64, 2, 1
    num_cmp = (t - l) // d + 1
    q, k_slc, lse_slc, k_cmp, lse_cmp, block_idx, _ = _inputs(t, hq, hk, 8, num_cmp, n, lp, 0, 3)
    q, k_cmp = q.float(), k_cmp.float()
    for r in range(t):
        picks = list(range(min(n, r // lp + 1)))
        block_idx[0, r, 0, : len(picks)] = torch.tensor(picks, dtype=torch.int32)
    # compressed token 13 (keys 52-59) overlaps row 50's own block (48-55), which top-n picks, and ends after it
    k_cmp[0, 13, 0] = 50.0 * q[0, 50, 0] / q[0, 50, 0].norm()
    q[0, 50, 0] *= 10.0 / q[0, 50, 0].norm()  # row 50 (blocks 1-4 are free) sees it 500 / sqrt(8) above its lse
    q.requires_grad_(True)
    k_cmp.requires_grad_(True)
    slot_lse = _slot_lse(q.detach(), k_slc.float(), block_idx, lp)
    total, rows = selection_alignment_terms(q, slot_lse, lse_slc.float(), k_cmp, lse_cmp.float(), block_idx,
                                            block_size=l, stride=d, selection_block=lp)
    (total / rows).backward()
    assert torch.isfinite(total) and rows.item() > 0
    assert torch.isfinite(q.grad).all() and torch.isfinite(k_cmp.grad).all()
    assert q.grad[0, 50].abs().sum() > 0


@pytest.mark.timeout(180)
def test_the_cost_benchmark_times_the_layer_with_and_without_the_loss(tmp_path):
    """tools/bench_selection_loss.py on CPU (reference kernels, one small shape): a row for the layer, one
    per stride, top-n alone with the sum, exact and bound scores, the layer with each of the two and dense
    SDPA, each the median of its timed runs, with its ratio to the layer's (top-n: to the sum's top-n)."""
    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "cost.json"
    subprocess.run([sys.executable, "tools/bench_selection_loss.py", "--impl", "reference", "--shapes", "1x256",
                    "--strides", "2", "8", "--scores", "exact", "bound", "--reps", "3", "--out", str(out)], cwd=root,
                   check=True, timeout=170, capture_output=True)
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert [(r["B"], r["T"], r.get("stride"), r.get("topn"), r.get("score"), r.get("dense")) for r in rows] == [
        (1, 256, None, None, None, None), (1, 256, 2, None, None, None), (1, 256, 8, None, None, None),
        (1, 256, None, "sum", None, None), (1, 256, None, None, "exact", None), (1, 256, None, "exact", None, None),
        (1, 256, None, None, "bound", None), (1, 256, None, "bound", None, None), (1, 256, None, None, None, "sdpa")]
    base, topn_sum = rows[0]["ms"], rows[3]["ms"]
    for r in rows:
        assert r["runs"] == 3 and r["ms"] > 0
        assert r["ratio"] == pytest.approx(r["ms"] / (topn_sum if "topn" in r else base))
    assert report["nsa"]["window"] == 512 and "--strides 2 8" in report["command"]
    assert "--scores exact bound" in report["command"]


@pytest.mark.timeout(180)
def test_bench_indexer_loss_lines_beside_a_baseline(tmp_path):
    """tools/bench_selection_loss.py --scores indexer --indexer-baseline: the indexer's loss alone, on one
    document a sequence and on packed ones, through PyTorch and through an earlier copy of its module
    (here the current file itself), each the median of its timed runs against the layer's time."""
    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "indexer.json"
    subprocess.run([sys.executable, "tools/bench_selection_loss.py", "--impl", "reference", "--shapes", "1x512",
                    "--strides", "--scores", "indexer", "--no-dense", "--indexer-loss-stride", "16", "--reps", "3",
                    "--indexer-baseline", str(root / "kernels/block_selection/indexer.py"), "--out", str(out)],
                   cwd=root, check=True, timeout=170, capture_output=True)
    report = json.loads(out.read_text())
    rows = [r for r in report["rows"] if "indexer_loss" in r]
    assert [(r["indexer_loss"], r["packed"]) for r in rows] == [  # no "kernels" line with --impl reference
        ("pytorch", False), ("baseline", False), ("pytorch", True), ("baseline", True)]
    base = report["rows"][0]["ms"]
    for r in rows:
        assert r["runs"] == 3 and r["ms"] > 0 and r["ratio"] == pytest.approx(r["ms"] / base)
    assert report["indexer_baseline"].endswith("indexer.py") and "--indexer-baseline" in report["command"]
