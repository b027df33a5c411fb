"""Random NSA inputs for the reference-vs-oracle tests, and phi callables for both sides."""
from dataclasses import dataclass
from functools import partial

import torch

import oracle
from kernels.compression.naive import mean_compress, mlp_compress
from kernels.nsa import native_sparse_attention


@dataclass(frozen=True)
class Case:
    l: int  # compression block
    d: int  # compression stride
    l_sel: int  # selection block l'
    n: int  # selected blocks
    w: int  # window
    T: int
    G: int  # query heads per KV head
    HK: int
    kv: str  # "shared" | "separate"
    phi: str  # "mean" | "mlp"
    B: int = 1
    Dk: int = 8
    Dv: int = 5  # != Dk so that a swapped k/v dimension cannot go unnoticed
    seed: int = 0
    score: str = "sum"  # how top-n combines the group's heads (nsa.selection_score)

    @property
    def HQ(self) -> int:
        return self.G * self.HK


@dataclass
class Inputs:
    q: torch.Tensor
    kv_cmp: tuple[torch.Tensor, torch.Tensor]
    kv_slc: tuple[torch.Tensor, torch.Tensor]
    kv_win: tuple[torch.Tensor, torch.Tensor]
    gates: torch.Tensor
    phi_k: oracle.MlpPhiParams | None  # None for phi mean
    phi_v: oracle.MlpPhiParams | None

    def leaves(self) -> list[torch.Tensor]:
        """Every distinct tensor NSA is differentiable in (shared K/V counted once)."""
        tensors = [self.q, *self.kv_cmp, *self.kv_slc, *self.kv_win, self.gates]
        for p in (self.phi_k, self.phi_v):
            if p is not None:
                tensors += [p.pos_emb, p.w1, p.b1, p.w2, p.b2]
        unique = []
        for x in tensors:
            if not any(x is u for u in unique):
                unique.append(x)
        return unique


def _mlp_params(l: int, dim: int, hidden: int, gen: torch.Generator, dtype) -> oracle.MlpPhiParams:
    def randn(*shape, std):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * std).to(dtype)

    return oracle.MlpPhiParams(
        pos_emb=randn(l, dim, std=0.5),
        w1=randn(hidden, l * dim, std=(l * dim) ** -0.5),
        b1=randn(hidden, std=0.1),
        w2=randn(dim, hidden, std=hidden ** -0.5),
        b2=randn(dim, std=0.1),
    )


def make_inputs(case: Case, dtype=torch.float32, hidden: int = 16) -> Inputs:
    """Deterministic in case.seed; separate K/V draws fresh k, v per branch."""
    gen = torch.Generator().manual_seed(case.seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    B, T, HK = case.B, case.T, case.HK
    q = randn(B, T, case.HQ, case.Dk)

    def kv():
        return randn(B, T, HK, case.Dk), randn(B, T, HK, case.Dv)

    kv_cmp = kv()
    kv_slc, kv_win = (kv(), kv()) if case.kv == "separate" else (kv_cmp, kv_cmp)
    gates = torch.sigmoid(randn(B, T, case.HQ, 3))
    if case.phi == "mlp":
        phi_k = _mlp_params(case.l, case.Dk, hidden, gen, dtype)
        phi_v = _mlp_params(case.l, case.Dv, hidden, gen, dtype)
    else:
        phi_k = phi_v = None
    return Inputs(q, kv_cmp, kv_slc, kv_win, gates, phi_k, phi_v)


def ref_phis(case: Case, inputs: Inputs):
    """(compress_k, compress_v) built from kernels.compression, for native_sparse_attention."""
    if case.phi == "mean":
        f = partial(mean_compress, block_size=case.l, stride=case.d)
        return f, f

    def mlp(p: oracle.MlpPhiParams):
        return partial(mlp_compress, block_size=case.l, stride=case.d, pos_emb=p.pos_emb,
                       w1=p.w1, b1=p.b1, w2=p.w2, b2=p.b2)

    return mlp(inputs.phi_k), mlp(inputs.phi_v)


def oracle_phis(case: Case, inputs: Inputs):
    """(phi_k, phi_v) from the oracle."""
    if case.phi == "mean":
        f = partial(oracle.phi_mean, l=case.l, d=case.d)
        return f, f
    return (partial(oracle.phi_mlp, l=case.l, d=case.d, p=inputs.phi_k),
            partial(oracle.phi_mlp, l=case.l, d=case.d, p=inputs.phi_v))


def run_reference(case: Case, inputs: Inputs):
    compress_k, compress_v = ref_phis(case, inputs)
    return native_sparse_attention(
        inputs.q, inputs.kv_cmp, inputs.kv_slc, inputs.kv_win, inputs.gates, compress_k, compress_v,
        block_size=case.l, stride=case.d, selection_block=case.l_sel, num_selected=case.n, window=case.w,
        selection_score=case.score)


def run_oracle(case: Case, inputs: Inputs) -> oracle.OracleResult:
    phi_k, phi_v = oracle_phis(case, inputs)
    return oracle.nsa(inputs.q, inputs.kv_cmp, inputs.kv_slc, inputs.kv_win, inputs.gates, phi_k, phi_v,
                      case.l, case.d, case.l_sel, case.n, case.w, score=case.score)


def block_sets(block_idx: torch.Tensor) -> list:
    """Reference block ids [B, T, HK, n] (-1 padded) -> sets[b][t][hk], the oracle's layout."""
    return [[[frozenset(i for i in row if i >= 0) for row in per_t] for per_t in per_b]
            for per_b in block_idx.tolist()]


def block_idx_tensor(selected: list, n: int) -> torch.Tensor:
    """Oracle sets[b][t][hk] -> [B, T, HK, n] int32 ascending, -1 padded (the reference's layout)."""
    return torch.tensor([[[sorted(s) + [-1] * (n - len(s)) for s in per_t] for per_t in per_b]
                         for per_b in selected], dtype=torch.int32)
