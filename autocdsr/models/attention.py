"""Multi-head self-attention that computes AutoCDSR's a_cd (Eq. 5) inside the attention call, and the
transformer block of Eq. 2-3.

How a_cd comes for free. Eq. 5 needs, for every query row i, the attention mass on keys of another domain:
cross_i = Σ_j softmax(A)_ij · 1[d(x_j) ≠ d(x_i)]. Appending the one-hot domain of each key to its value
vector makes the attention output itself carry the per-domain mass, Σ_j P_ij · onehot(d_j), so a_cd is a
by-product of the same fused `F.scaled_dot_product_attention` call (and differentiable through it) instead
of a materialised [B, H, L, L] probability matrix. Padding is masked the same way: one extra query/key
column adds -1e4 to the score of every padding key, so one kernel serves causal and bidirectional models
without an explicit [L, L] mask. Measured on the 2-core CPU (batch 16 x 800, 4 heads, fwd+bwd of one
attention): manual softmax with materialised probabilities ~1000 ms; SDPA with an explicit [B, 1, L, L]
mask ~200-250 ms; SDPA with these extra columns ~115-160 ms, a_cd included. Head dims are padded to a
multiple of 8 because the CPU kernel is faster at 16 than at 8, and q, k, v must share one head dim or
SDPA falls back to its slow math path.

Normalisation (METHOD.md): a_cd is the mean over valid (non-padding) query rows of the cross-domain mass,
averaged over heads and layers, so it lies in [0, 1] whatever the sequence length; the encoders return the
per-layer sums and divide once. Attention probabilities get no dropout: dropping them would make a_cd a
noisy, no longer normalised quantity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from autocdsr.models.config import ModelConfig

# Added to the score of a padding key. exp(-1e4) is exactly 0 in float32 and bfloat16, and unlike -inf it
# keeps rows that only see padding (left padding under a causal mask) finite instead of NaN.
PAD_SCORE = -1e4


def kernel_head_dim(n: int) -> int:
    """Head dim handed to SDPA: ``n`` rounded up to a multiple of 8 (see module docstring)."""
    return -(-n // 8) * 8


def split_heads(qkv: torch.Tensor, n_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[..., L, 3*d] -> three [..., H, L, dh] views."""
    *lead, L, three_d = qkv.shape
    dh = three_d // (3 * n_heads)
    parts = qkv.view(*lead, L, 3, n_heads, dh).movedim(-3, 0).transpose(-3, -2)
    return parts[0], parts[1], parts[2]


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[..., H, L, dh] -> [..., L, H*dh]."""
    return x.transpose(-3, -2).flatten(-2)


@dataclass
class SequenceLayout:
    """Full attention over a left-padded batch [B, L]: what every layer's attention needs, built once."""

    valid: torch.Tensor  # [B, L] bool, False on padding
    causal: bool
    n_heads: int
    head_dim: int
    need_a_cd: bool
    q_ext: torch.Tensor  # [1, 1, 1, E - dh] constant query columns
    k_ext: torch.Tensor  # [B, 1, L, E - dh] padding score column (and zeros)
    v_ext: torch.Tensor  # [B, 1, L, E - dh] zero column, then the key's one-hot domain (a_cd only)
    cross_weight: torch.Tensor | None  # [B, 1, L, D]: 1 where a valid query row's domain differs
    domain_idx: torch.Tensor  # [B, L]

    @classmethod
    def build(
        cls,
        domain_idx: torch.Tensor,
        valid: torch.Tensor,
        cfg: ModelConfig,
        need_a_cd: bool,
        dtype: torch.dtype,
        query_domain: torch.Tensor | None = None,
        query_weights: tuple[float, ...] | None = None,
    ) -> SequenceLayout:
        """``query_domain`` [B, L]: the domain each query row counts as its own in Eq. 5 (default: its
        item's, ``domain_idx``; SASRec with ``cd_query_domain="target"``: the domain it predicts).
        ``query_weights``: per domain 1..D, the weight of a row's cross-domain mass by its own domain (None:
        all 1, Eq. 5 as written; the model passes its `SequenceRecommender.query_weights`)."""
        B, L = valid.shape
        dh = cfg.head_dim
        D = cfg.num_domains if need_a_cd else 0
        E = kernel_head_dim(dh + 1 + D)
        scale = 1.0 / math.sqrt(dh)
        dev = valid.device
        # score += scale * (1/scale) * PAD_SCORE on padding keys, += 0 on valid keys
        q_ext = torch.zeros(1, 1, 1, E - dh, device=dev, dtype=dtype)
        q_ext[..., 0] = 1.0 / scale
        k_ext = torch.zeros(B, 1, L, E - dh, device=dev, dtype=dtype)
        k_ext[:, 0, :, 0] = (~valid).to(dtype) * PAD_SCORE
        v_ext = torch.zeros(B, 1, L, E - dh, device=dev, dtype=dtype)
        cross_weight = None
        if need_a_cd:

            def onehot(idx: torch.Tensor) -> torch.Tensor:  # [B, L, D]; 0 (padding) has no column
                return F.one_hot(idx.clamp(0, D), D + 1)[..., 1:].to(dtype)

            keys = onehot(domain_idx) * valid.unsqueeze(-1)
            v_ext[:, 0, :, 1 : 1 + D] = keys
            # a valid query row of domain d counts the mass on every other domain's keys
            own = keys if query_domain is None else onehot(query_domain)
            row = valid.to(dtype)
            if query_weights is not None:  # each row's weight, by its own domain
                row = row * (own @ torch.tensor(query_weights, device=dev, dtype=dtype))
            if cfg.cd_query_average == "domains":  # rows of domain q weigh n / (P n_q): a mean over domains
                row = row * (own @ domain_balance(own, valid))
            cross_weight = ((1.0 - own) * row.unsqueeze(-1)).unsqueeze(1)
        return cls(
            valid, cfg.causal, cfg.n_heads, dh, need_a_cd, q_ext, k_ext, v_ext, cross_weight, domain_idx
        )

    def attend(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """qkv [B, L, 3d] -> (softmax(A)·V as [B, L, d], Σ over valid rows and heads of cross-domain mass)."""
        q, k, v = split_heads(qkv, self.n_heads)
        B, H, L, dh = q.shape
        e = self.q_ext.shape[-1]
        q = torch.cat([q, self.q_ext.to(q.dtype).expand(B, H, L, e)], dim=-1)
        k = torch.cat([k, self.k_ext.to(k.dtype).expand(B, H, L, e)], dim=-1)
        v = torch.cat([v, self.v_ext.to(v.dtype).expand(B, H, L, e)], dim=-1)
        o = F.scaled_dot_product_attention(
            q, k, v, is_causal=self.causal, scale=1.0 / math.sqrt(dh)
        )  # Eq. 2-3
        out = merge_heads(o[..., :dh])
        if self.cross_weight is None:
            return out, None
        D = self.cross_weight.shape[-1]
        mass = o[..., dh + 1 : dh + 1 + D]  # [B, H, L, D]: attention mass per key domain, Eq. 5
        return out, (mass.float() * self.cross_weight).sum()

    def probabilities(self, qkv: torch.Tensor) -> torch.Tensor:
        """Explicit softmax(A) [B, H, L, L] for analysis and tests (slow: materialises L x L per head).
        Padding rows and columns are 0."""
        q, k, _ = split_heads(qkv, self.n_heads)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        allowed = self.valid[:, None, None, :].expand_as(scores)
        if self.causal:
            L = scores.shape[-1]
            allowed = allowed & torch.ones(L, L, dtype=torch.bool, device=scores.device).tril()
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        return torch.nan_to_num(probs, nan=0.0) * self.valid[:, None, :, None]

    def normalise_a_cd(self, total: torch.Tensor, n_layers: int) -> torch.Tensor:
        """Σ over layers, heads, valid rows -> mean per valid row, head and layer (in [0, 1])."""
        n_rows = self.valid.sum().clamp_min(1)
        return total / (n_rows * self.n_heads * n_layers)


class MultiHeadSelfAttention(nn.Module):
    """Q, K, V projections (Eq. 2) and the output projection; which keys each query sees is the layout's job."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(
        self, x: torch.Tensor, layout, n_out: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        out, cross = layout.attend(self.qkv(x)) if n_out is None else layout.attend(self.qkv(x), n_out)
        return self.proj(out), cross


class TransformerBlock(nn.Module):
    """H* = LN(FFN(softmax(A)·V) + H) (Eq. 3), as the usual two residual sub-layers.

    ``norm_first=False`` normalises after each residual (Eq. 3, BERT); ``True`` normalises the input of
    each sub-layer (GPT-2), which then needs a final LayerNorm (the encoders add it).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm_first = cfg.norm_first
        self.attn = MultiHeadSelfAttention(cfg)
        self.ln_attn = nn.LayerNorm(cfg.d_model)
        self.ln_ffn = nn.LayerNorm(cfg.d_model)
        self.ffn = nn.Sequential(
            nn.Linear(cfg.d_model, cfg.ffn_dim), nn.GELU(), nn.Linear(cfg.ffn_dim, cfg.d_model)
        )
        self.drop = nn.Dropout(cfg.dropout)

    def forward(
        self, x: torch.Tensor, layout, n_out: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``n_out``: only the first ``n_out`` rows are queried and returned (all rows stay keys); the IB
        encoder's last layer uses it, where the IB tokens' own outputs would be thrown away."""
        if self.norm_first:
            a, cross = self.attn(self.ln_attn(x), layout, n_out)
            x = (x if n_out is None else x[:n_out]) + self.drop(a)
            return x + self.drop(self.ffn(self.ln_ffn(x))), cross
        a, cross = self.attn(x, layout, n_out)
        x = self.ln_attn((x if n_out is None else x[:n_out]) + self.drop(a))
        return self.ln_ffn(x + self.drop(self.ffn(x))), cross

    def attention_input(self, x: torch.Tensor) -> torch.Tensor:
        """The qkv projection this block's attention sees for input ``x`` (for explicit attention maps)."""
        return self.attn.qkv(self.ln_attn(x) if self.norm_first else x)


@dataclass
class EncoderOutput:
    hidden: torch.Tensor  # [B, L, d], final item states
    a_cd: torch.Tensor | None  # scalar, Eq. 5 (plain) or Eq. 13 (IB), normalised to [0, 1]
    maps: list[torch.Tensor] | None  # per layer [B, H, L, L] attention probabilities, when asked for


class Encoder(nn.Module):
    """A stack of full-attention blocks: the `cd` / `cd+autocdsr` encoder (causal for SASRec)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.blocks = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
        self.ln_final = nn.LayerNorm(cfg.d_model) if cfg.norm_first else nn.Identity()

    def forward(
        self,
        x: torch.Tensor,
        domain_idx: torch.Tensor,
        valid: torch.Tensor,
        need_a_cd: bool = True,
        return_maps: bool = False,
        query_domain: torch.Tensor | None = None,
        query_weights: tuple[float, ...] | None = None,
    ) -> EncoderOutput:
        layout = SequenceLayout.build(
            domain_idx, valid, self.cfg, need_a_cd, x.dtype, query_domain, query_weights
        )
        total = x.new_zeros((), dtype=torch.float32) if need_a_cd else None
        maps = [] if return_maps else None
        for block in self.blocks:
            if maps is not None:
                maps.append(layout.probabilities(block.attention_input(x)))
            x, cross = block(x, layout)
            if total is not None:
                total = total + cross
        a_cd = layout.normalise_a_cd(total, len(self.blocks)) if total is not None else None
        return EncoderOutput(self.ln_final(x), a_cd, maps)


def domain_balance(own: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[D] row weights that turn a mean over valid rows into a mean over the query domains present of each
    domain's row mean: n / (P n_q) for a domain with n_q > 0 of the n valid rows (P such domains), else 0.
    ``own`` [B, L, D]: each row's own domain, one-hot (a row without one weighs 0). Constants: no gradient
    flows through the counts."""
    counts = (own * valid.unsqueeze(-1).to(own.dtype)).sum(dim=(0, 1))
    present = counts > 0
    n = valid.sum().to(own.dtype)  # normalise_a_cd divides by every valid row
    return torch.where(
        present, n / (present.sum().clamp_min(1) * counts.clamp_min(1)), torch.zeros_like(counts)
    )


def cross_mass_per_row(
    maps: list[torch.Tensor],
    domain_idx: torch.Tensor,
    valid: torch.Tensor,
    query_domain: torch.Tensor | None = None,
    query_weights: tuple[float, ...] | None = None,
) -> torch.Tensor:
    """[B, L]: each query row's attention mass on keys of other domains, averaged over heads and layers
    (0 on padded rows), from explicit attention maps (per layer [B, H, L, L]).
    ``query_domain``: each query row's own domain, when it is not its item's (see `SequenceLayout.build`).
    ``query_weights``: per domain 1..D, the weight of a row's mass by its own domain (`cd_query_weights`)."""
    own = domain_idx if query_domain is None else query_domain
    cross_pair = ((own[:, :, None] != domain_idx[:, None, :]) & valid[:, :, None] & valid[:, None, :]).to(
        maps[0].dtype
    )
    if query_weights is not None:
        w = torch.tensor((0.0, *query_weights), dtype=maps[0].dtype, device=own.device)
        cross_pair = cross_pair * w[own][:, :, None]
    return sum((m * cross_pair[:, None]).sum(dim=(1, 3)) for m in maps) / (maps[0].shape[1] * len(maps))


def a_cd_from_maps(
    maps: list[torch.Tensor],
    domain_idx: torch.Tensor,
    valid: torch.Tensor,
    query_domain: torch.Tensor | None = None,
    query_weights: tuple[float, ...] | None = None,
    average: str = "rows",
) -> torch.Tensor:
    """Eq. 5 from explicit attention maps, normalised as the encoders do (arguments as `cross_mass_per_row`).
    ``average``: "rows" (Eq. 5) or "domains" (`ModelConfig.cd_query_average`): here computed directly, as
    the mean over the query domains present of each domain's mean over its rows.

    Used to cross-check the fused computation and for per-sequence analysis; returns a scalar.
    """
    per_row = cross_mass_per_row(maps, domain_idx, valid, query_domain, query_weights)
    if average == "rows":
        return per_row.sum() / valid.sum().clamp_min(1)
    if average != "domains":
        raise ValueError(f"average must be 'rows' or 'domains', got {average!r}")
    own = domain_idx if query_domain is None else query_domain
    means = [per_row[(own == q) & valid].mean() for q in own[valid].unique().tolist() if q > 0]
    return torch.stack(means).mean() if means else per_row.sum() * 0
