"""A naive NSA oracle written from DESIGN §2 alone, independent of kernels/.

Plain Python loops over batch, query token and head, one small attention per (b, t, h), all in float64
so that disagreements with the reference are the reference's, not rounding. Tiny shapes only.
Everything stays differentiable (torch ops on slices), so the oracle's autograd gradients can be
compared with the reference's too.
"""
from dataclasses import dataclass

import torch


@dataclass
class MlpPhiParams:
    """phi = Linear(l*D -> hidden), SiLU, Linear(hidden -> D) over a block's l tokens + pos_emb."""

    pos_emb: torch.Tensor  # [l, D]
    w1: torch.Tensor  # [hidden, l*D]
    b1: torch.Tensor  # [hidden]
    w2: torch.Tensor  # [D, hidden]
    b2: torch.Tensor  # [D]


@dataclass
class OracleResult:
    output: torch.Tensor  # [B, T, HQ, Dv]
    o_cmp: torch.Tensor  # [B, T, HQ, Dv]
    o_slc: torch.Tensor
    o_win: torch.Tensor
    lse_cmp: torch.Tensor  # [B, T, HQ]
    lse_slc: torch.Tensor
    lse_win: torch.Tensor
    selected: list  # selected[b][j][hk]: frozenset of selection block ids for query j
    k_cmp: torch.Tensor  # [B, N, HK, Dk]
    v_cmp: torch.Tensor  # [B, N, HK, Dv]


def _f64(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float64)


def num_blocks(seq_len: int, l: int, d: int) -> int:
    """Compressed blocks that fit whole: block i covers [i*d, i*d + l)."""
    return len([i for i in range(seq_len) if i * d + l <= seq_len])


def phi_mean(x: torch.Tensor, l: int, d: int) -> torch.Tensor:
    """[B, T, H, D] -> [B, N, H, D]: mean of each block's l tokens."""
    B, T, H, _ = x.shape
    x = _f64(x)
    return torch.stack([
        torch.stack([
            torch.stack([x[b, i * d:i * d + l, h].mean(dim=0) for h in range(H)])
            for i in range(num_blocks(T, l, d))
        ])
        for b in range(B)
    ])


def phi_mlp(x: torch.Tensor, l: int, d: int, p: MlpPhiParams) -> torch.Tensor:
    """[B, T, H, D] -> [B, N, H, D]: the MLP over (block [l, D] + pos_emb) flattened token-major."""
    B, T, H, _ = x.shape
    x = _f64(x)

    def one(block):
        h = torch.nn.functional.silu(_f64(p.w1) @ (block + _f64(p.pos_emb)).reshape(-1) + _f64(p.b1))
        return _f64(p.w2) @ h + _f64(p.b2)

    return torch.stack([
        torch.stack([
            torch.stack([one(x[b, i * d:i * d + l, h]) for h in range(H)])
            for i in range(num_blocks(T, l, d))
        ])
        for b in range(B)
    ])


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """One query [Dk] over keys [m, Dk] / values [m, Dv] -> (o [Dv], lse []); m = 0 gives (0, -inf)."""
    if k.shape[0] == 0:
        return q.new_zeros(v.shape[-1]), q.new_tensor(float("-inf"))
    s = scale * (k @ q)
    return torch.softmax(s, dim=0) @ v, torch.logsumexp(s, dim=0)


def _scale(q: torch.Tensor, scale: float | None) -> float:
    return q.shape[-1] ** -0.5 if scale is None else scale


def _per_query(q: torch.Tensor, hk_count: int, fn):
    """Runs fn(b, j, h, hk) -> (o, lse) for every query and stacks to ([B, Tq, HQ, Dv], [B, Tq, HQ])."""
    B, Tq, HQ, _ = q.shape
    G = HQ // hk_count
    rows = [[[fn(b, j, h, h // G) for h in range(HQ)] for j in range(Tq)] for b in range(B)]
    o = torch.stack([torch.stack([torch.stack([r[0] for r in row]) for row in rb]) for rb in rows])
    lse = torch.stack([torch.stack([torch.stack([r[1] for r in row]) for row in rb]) for rb in rows])
    return o, lse


def compressed_attention(q, k_cmp, v_cmp, l, d, scale=None, q_start=0):
    """Query at position t = q_start + j sees compressed block i iff i*d + l - 1 <= t."""
    q, k_cmp, v_cmp, scale = _f64(q), _f64(k_cmp), _f64(v_cmp), _scale(q, scale)
    N = k_cmp.shape[1]

    def one(b, j, h, hk):
        visible = [i for i in range(N) if i * d + l - 1 <= q_start + j]
        return _attend(q[b, j, h], k_cmp[b, visible, hk], v_cmp[b, visible, hk], scale)

    return _per_query(q, k_cmp.shape[2], one)


def overlap(i: int, j: int, l: int, d: int, l_sel: int) -> float:
    """|tokens(compressed block i) & tokens(selection block j)| / d, by counting the tokens."""
    return len(set(range(i * d, i * d + l)) & set(range(j * l_sel, (j + 1) * l_sel))) / d


def block_scores(q, k_cmp, l, d, l_sel, seq_len, scale=None, q_start=0, score="sum"):
    """scores[b][j][hk][sb]: each head's p_cmp spread by overlap onto blocks sb*l' <= t, then the sum over
    the group's heads (score "sum") or the largest head's (score "max")."""
    combine = {"sum": sum, "max": max}[score]
    q, k_cmp, scale = _f64(q), _f64(k_cmp), _scale(q, scale)
    B, Tq, HQ, _ = q.shape
    N, HK = k_cmp.shape[1], k_cmp.shape[2]
    G = HQ // HK
    S = (seq_len + l_sel - 1) // l_sel
    weights = [[overlap(i, sb, l, d, l_sel) for sb in range(S)] for i in range(N)]
    scores = []
    for b in range(B):
        per_query = []
        for j in range(Tq):
            t = q_start + j
            visible = [i for i in range(N) if i * d + l - 1 <= t]
            per_group = []
            candidates = [sb for sb in range(S) if sb * l_sel <= t]
            for hk in range(HK):
                per_head = []
                for h in range(hk * G, (hk + 1) * G):
                    p = [0.0] * N
                    if visible:
                        probs = torch.softmax(scale * (k_cmp[b, visible, hk] @ q[b, j, h]), dim=0)
                        for i, pi in zip(visible, probs.tolist()):
                            p[i] = pi
                    per_head.append({sb: sum(p[i] * weights[i][sb] for i in range(N)) for sb in candidates})
                per_group.append({sb: combine(head[sb] for head in per_head) for sb in candidates})
            per_query.append(per_group)
        scores.append(per_query)
    return scores


def _group_block_scores(q, k, l_sel, scale, head_scores):
    """scores[b][j][hk][sb] for a raw-key score: head_scores(q_h, keys [t + 1, D] of the head's KV head at
    positions <= t, scale) -> {block: score} per query head, summed over the group's heads; every block up
    to t's is listed (0 where no head scores it)."""
    q, k, scale = _f64(q), _f64(k), _scale(q, scale)
    B, T, HQ, _ = q.shape
    HK = k.shape[2]
    G = HQ // HK
    scores = []
    for b in range(B):
        per_query = []
        for t in range(T):
            per_group = []
            for hk in range(HK):
                total = {sb: 0.0 for sb in range(t // l_sel + 1)}
                for h in range(hk * G, (hk + 1) * G):
                    for sb, score in head_scores(q[b, t, h], k[b, : t + 1, hk], scale).items():
                        total[sb] += score
                per_group.append(total)
            per_query.append(per_group)
        scores.append(per_query)
    return scores


def exact_block_scores(q, k, l_sel, scale=None):
    """scores[b][j][hk][sb] for the "exact" score: each head's softmax over the raw keys at positions <= t,
    summed over the tokens of block sb, then over the group's heads."""

    def head(qh, keys, scale):
        mass = {}
        for s, p in enumerate(torch.softmax(scale * (keys @ qh), dim=0).tolist()):
            mass[s // l_sel] = mass.get(s // l_sel, 0.0) + p
        return mass

    return _group_block_scores(q, k, l_sel, scale, head)


def bound_block_scores(q, k, l_sel, scale=None):
    """scores[b][j][hk][sb] for the "bound" score: per head and whole block sb (its l' tokens all <= t), the
    largest of scale * q.x over every x in the box the block's keys span (each channel between the keys'
    smallest and largest value), softmaxed over the whole blocks, then summed over the group's heads."""

    def head(qh, keys, scale):
        whole = range(keys.shape[0] // l_sel)  # keys at positions 0..t: the blocks that end by t
        best = []
        for sb in whole:
            block = keys[sb * l_sel : (sb + 1) * l_sel]
            corner = torch.where(qh >= 0, block.max(0).values, block.min(0).values)  # the furthest along q
            best.append(scale * float((corner @ qh).detach()))  # a choice: no gradient
        if not best:
            return {}
        return dict(zip(whole, torch.softmax(torch.tensor(best, dtype=torch.float64), 0).tolist()))

    return _group_block_scores(q, k, l_sel, scale, head)


def top_n(scores: dict, t: int, l_sel: int, n: int) -> frozenset:
    """Block 0, t//l' and t//l' - 1 always, counting toward n; the rest by score, ties to the lower id."""
    forced = {sb for sb in (0, t // l_sel, t // l_sel - 1) if sb >= 0}
    rest = sorted((sb for sb in scores if sb not in forced), key=lambda sb: (-scores[sb], sb))
    return frozenset(forced | set(rest[:max(n - len(forced), 0)]))


def select_blocks(q, k_cmp, l, d, l_sel, n, seq_len, scale=None, q_start=0, score="sum"):
    """selected[b][j][hk]: the frozenset of selection blocks query j's GQA group attends to."""
    scores = block_scores(q, k_cmp, l, d, l_sel, seq_len, scale, q_start, score)
    return [[[top_n(s, q_start + j, l_sel, n) for s in per_query] for j, per_query in enumerate(sb)]
            for sb in scores]


def selected_attention(q, k, v, selected, l_sel, scale=None, q_start=0):
    """Query t attends to the tokens <= t of its group's selected blocks (k, v at global positions)."""
    q, k, v, scale = _f64(q), _f64(k), _f64(v), _scale(q, scale)

    def one(b, j, h, hk):
        t = q_start + j
        tokens = sorted(s for sb in selected[b][j][hk] for s in range(sb * l_sel, (sb + 1) * l_sel) if s <= t)
        return _attend(q[b, j, h], k[b, tokens, hk], v[b, tokens, hk], scale)

    return _per_query(q, k.shape[2], one)


def window_attention(q, k, v, w, scale=None, q_start=0, k_start=0):
    """Query t attends to keys at positions p with t - w < p <= t; key s sits at k_start + s."""
    q, k, v, scale = _f64(q), _f64(k), _f64(v), _scale(q, scale)
    Tk = k.shape[1]

    def one(b, j, h, hk):
        t = q_start + j
        keys = [s for s in range(Tk) if t - w < k_start + s <= t]
        return _attend(q[b, j, h], k[b, keys, hk], v[b, keys, hk], scale)

    return _per_query(q, k.shape[2], one)


def nsa(q, kv_cmp, kv_slc, kv_win, gates, phi_k, phi_v, l, d, l_sel, n, w, scale=None, score="sum") -> OracleResult:
    """The composed NSA over one full sequence; phi_k / phi_v map [B, T, HK, D] -> [B, N, HK, D]."""
    T = q.shape[1]
    k_cmp, v_cmp = phi_k(kv_cmp[0]), phi_v(kv_cmp[1])
    o_cmp, lse_cmp = compressed_attention(q, k_cmp, v_cmp, l, d, scale)
    if score in ("exact", "bound"):
        by_block = exact_block_scores if score == "exact" else bound_block_scores
        selected = [[[top_n(s, t, l_sel, n) for s in per_query] for t, per_query in enumerate(sb)]
                    for sb in by_block(q, kv_slc[0], l_sel, scale)]
    else:
        selected = select_blocks(q, k_cmp, l, d, l_sel, n, T, scale, score=score)
    o_slc, lse_slc = selected_attention(q, *kv_slc, selected, l_sel, scale)
    o_win, lse_win = window_attention(q, *kv_win, w, scale)
    g = _f64(gates)
    output = g[..., 0:1] * o_cmp + g[..., 1:2] * o_slc + g[..., 2:3] * o_win
    return OracleResult(output, o_cmp, o_slc, o_win, lse_cmp, lse_slc, lse_win, selected, k_cmp, v_cmp)
