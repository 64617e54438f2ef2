"""AutoCDSR⁺ (Section 4.3.2): per-domain attention whose only cross-domain path is T information-bottleneck
(IB) tokens per domain, exchanged by element-wise sum across domains (Eq. 14).

Per layer: every domain's items attend only to items of their own domain and to their domain's IB tokens;
IB tokens attend to their domain's items; then the IB tokens of all domains are summed (Eq. 14) and the
sum is every domain's IB state for the next layer, where the items re-attend to it. With
``ib_exchange=False`` each domain keeps its own IB tokens and domains are fully isolated. a_cd (Eq. 13) is
the attention mass from item queries to IB keys, normalised like Eq. 5 (mean over valid item rows, heads
and layers, in [0, 1]).

Block-diagonal, not masked (App. A.2 admits the paper's masked full-length attention wastes compute):
the valid tokens of each (sequence, domain) pair are gathered into their own packed row, rows of similar
length share one SDPA call (length buckets a quarter octave wide), and the outputs are scattered back.
No score is ever computed for a cross-domain item pair, so attention costs Σ_d L_d² instead of L².
Per-token work (LayerNorm, FFN, projections) runs on the flat [B*L] tokens as in the plain encoder.

Bidirectional (BERT4Rec): each packed row is [T IB tokens, items of domain d]; the IB tokens are ordinary
tokens of that row. Their state is per (sequence, domain) row and, after the exchange, per sequence.

Causal (SASRec): an IB token that saw the whole domain would leak future items into earlier positions.
Here IB tokens belong to runs, the maximal stretches of consecutive items of one domain in a sequence.
Each run r of domain d gets its own T IB tokens. Their state entering a layer is the sum (Eq. 14), over
domains, of the IB output of that domain's latest run that ended before r began; with exchange off, of
d's own previous run; where there is none, d's learned initial tokens. Every item of r attends to its
domain's items up to itself and to r's IB tokens; r's IB tokens attend to r's IB tokens and d's items up
to r's last item, and that output is what later runs read. So an item at t reads only runs that ended
before its own run began, plus items <= t of its own domain: nothing after t, through any path. A run
is the span over which no other domain acts, so reading the run's IB tokens loses an item no other-domain
information (its own domain it reads directly), and IB tokens cost per-token work per run, not per item.
Implementation: the IB keys of a query depend on its run, so they enter the fused kernel as "sink" keys:
T extra key positions at the start of the packed row whose score for each query is precomputed (q · k of
that query's own run's IB tokens) and written into spare head-dim columns of the query; the kernel's
output in matching value columns is the softmax mass on each sink, from which the IB values are added
and a_cd is read. A run's IB queries go through a second kernel call over the same keys, with a mask
that stops them at the run's last item; there are only T per run, so that call is small.

The IB state is summed, not averaged (Eq. 14). Under post-LN (Eq. 3, the default) every block output is
normalised, so the sum stays bounded; under pre-LN the IB residual can grow by up to D per layer.
Domain tags and positions are part of every token (including SASRec's next-domain tag), so the timing and
domains of other-domain events are visible to a domain's tokens; item identities are not.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from autocdsr.models.attention import (
    PAD_SCORE,
    EncoderOutput,
    TransformerBlock,
    kernel_head_dim,
    merge_heads,
    split_heads,
)
from autocdsr.models.config import ModelConfig

# Rows whose length is within this factor of a bucket's longest row share that bucket (a quarter octave:
# at most ~1.4x wasted score work per row) ...
BUCKET_RATIO = 2**0.25
# ... and rows this short all share one bucket: their attention is cheap, a kernel call is not.
SHORT_ROW = 32


@dataclass
class Bucket:
    """Packed rows of similar length: the tokens of one (sequence, domain) pair per row, right-padded."""

    tok: torch.Tensor  # [n, Lb] flat token index b * L + t, or N (a zero row) on padding
    valid: torch.Tensor  # [n, Lb] bool
    row: torch.Tensor  # [n] global row id (index into the per-row IB state, bidirectional)
    run: torch.Tensor | None  # [n, Lb] run id of each token (causal; R on padding)
    ib_run: torch.Tensor | None  # [n, Rmax] runs ending in each row, in time order (causal; R on padding)
    ib_mask: torch.Tensor | None  # [n, 1, Rmax * T, T + Lb] keys each IB query sees (causal)
    k_ext: torch.Tensor  # [n, 1, T + Lb, E - dh] extra key columns (padding score, sink one-hots)
    v_ext: torch.Tensor  # [n, 1, T + Lb, E - dh] extra value columns (IB indicator / sink one-hots)


class DomainLayout:
    """Everything the IB encoder's layers share for one batch: the packing plan and the exchange indices."""

    def __init__(
        self, domain_idx: torch.Tensor, valid: torch.Tensor, cfg: ModelConfig, dtype: torch.dtype
    ) -> None:
        B, L = valid.shape
        D = cfg.num_domains
        self.B, self.L, self.N = B, L, B * L
        self.T, self.H, self.dh = cfg.num_ib_tokens, cfg.n_heads, cfg.head_dim
        self.d = cfg.d_model
        self.causal = cfg.causal
        self.E = kernel_head_dim(self.dh + 1 + self.T)
        device = valid.device

        dom = domain_idx.reshape(-1).cpu().numpy().astype(np.int64)
        pos_time = np.flatnonzero(valid.reshape(-1).cpu().numpy())  # valid tokens, in (sequence, time) order
        self.n_valid = len(pos_time)
        # Group valid tokens by (sequence, domain); a stable sort keeps time order inside a row.
        key = (pos_time // L) * (D + 1) + dom[pos_time]
        order = np.argsort(key, kind="stable")
        pos, key = pos_time[order], key[order]
        row_keys, starts, counts = np.unique(key, return_index=True, return_counts=True)
        self.num_rows = len(row_keys)
        self.row_seq = torch.as_tensor(row_keys // (D + 1), device=device)
        self.row_dom = torch.as_tensor(row_keys % (D + 1), device=device)

        if self.causal:
            # Runs: maximal stretches of consecutive items of one domain within a sequence.
            seq_t, dom_t = pos_time // L, dom[pos_time]
            new_run = np.ones(len(pos_time), dtype=bool)
            new_run[1:] = (seq_t[1:] != seq_t[:-1]) | (dom_t[1:] != dom_t[:-1])
            run_of_valid = np.cumsum(new_run) - 1
            self.num_runs = R = int(new_run.sum())
            run_seq, run_dom = seq_t[new_run], dom_t[new_run]
            run_of_tok = np.full(self.N + 1, R, dtype=np.int64)  # index N (padding slot) -> R (zero row)
            run_of_tok[pos_time] = run_of_valid
            self.run_dom = torch.as_tensor(run_dom, device=device)
            # prev[r, d] = the latest run of domain d in r's sequence that ended before r started (R if none)
            prev = np.full((R, D), R, dtype=np.int64)
            idx = np.arange(R)
            for d in range(1, D + 1):
                latest = np.maximum.accumulate(np.where(run_dom == d, idx, -1)) if R else idx
                before = np.concatenate([[-1], latest[:-1]]) if R else idx
                ok = (before >= 0) & (run_seq[np.maximum(before, 0)] == run_seq)
                prev[ok, d - 1] = before[ok]
            self.prev_run = torch.as_tensor(prev, device=device)
            self.prev_same = torch.as_tensor(prev[idx, run_dom - 1] if R else idx, device=device)

        self.buckets: list[Bucket] = []
        slot_of_tok = np.full(self.N, -1, dtype=np.int64)  # where each token's output lands in the concat
        slot_of_row = np.empty(self.num_rows, dtype=np.int64)
        slot_of_run = np.empty(self.num_runs if self.causal else 0, dtype=np.int64)
        n_slots = n_row_slots = n_run_slots = 0
        by_length = np.argsort(-counts, kind="stable")
        i = 0
        while i < len(by_length):
            longest = counts[by_length[i]]
            j = i + 1
            while j < len(by_length) and (
                longest <= SHORT_ROW or counts[by_length[j]] * BUCKET_RATIO >= longest
            ):
                j += 1
            rows = by_length[i:j]
            n, Lb = len(rows), int(longest)
            tok = np.full((n, Lb), self.N, dtype=np.int64)
            for r_local, r in enumerate(rows):
                tok[r_local, : counts[r]] = pos[starts[r] : starts[r] + counts[r]]
            is_tok = tok < self.N
            slot_of_tok[tok[is_tok]] = n_slots + np.flatnonzero(is_tok.reshape(-1))
            slot_of_row[rows] = n_row_slots + np.arange(n)
            n_slots += n * Lb
            n_row_slots += n
            bucket = self._bucket(tok, is_tok, rows, run_of_tok[tok] if self.causal else None, dtype, device)
            if self.causal:
                ib_run = bucket.ib_run.cpu().numpy()
                has = ib_run < self.num_runs
                slot_of_run[ib_run[has]] = n_run_slots + np.flatnonzero(has.reshape(-1))
                n_run_slots += ib_run.size
            self.buckets.append(bucket)
            i = j
        # Padding tokens read the zero row appended after the last slot.
        slot_of_tok[slot_of_tok < 0] = n_slots
        self.slot_of_tok = torch.as_tensor(slot_of_tok, device=device)
        self.slot_of_row = torch.as_tensor(slot_of_row, device=device)
        self.slot_of_run = torch.as_tensor(slot_of_run, device=device)
        self.tok_all = (
            torch.cat([b.tok.reshape(-1) for b in self.buckets]) if self.buckets else self.slot_of_row
        )
        self.bucket_sizes = [b.tok.numel() for b in self.buckets]

    def _bucket(self, tok, is_tok, rows, run, dtype, device) -> Bucket:
        n, Lb = tok.shape
        T, dh, E = self.T, self.dh, self.E
        k_ext = torch.zeros(n, 1, T + Lb, E - dh, dtype=dtype)
        v_ext = torch.zeros(n, 1, T + Lb, E - dh, dtype=dtype)
        k_ext[:, 0, T:, 0] = torch.as_tensor(~is_tok, dtype=dtype) * PAD_SCORE
        ib_run = ib_mask = None
        if self.causal:
            # sink key tau scores its own query column dh + 1 + tau; its value column reports the mass
            eye = torch.eye(T, dtype=dtype)
            k_ext[:, 0, :T, 1 : 1 + T] = eye
            v_ext[:, 0, :T, 1 : 1 + T] = eye
            # the runs ending in each row, and for their IB queries the keys up to the run's last item
            R = self.num_runs
            is_end = is_tok & (np.concatenate([run[:, 1:], np.full((n, 1), R)], axis=1) != run)
            r_max = max(int(is_end.sum(1).max()), 1)
            rows_i, end_pos = np.nonzero(is_end)
            k_i = np.cumsum(is_end, axis=1)[rows_i, end_pos] - 1
            ib_run_np = np.full((n, r_max), R, dtype=np.int64)
            ib_run_np[rows_i, k_i] = run[rows_i, end_pos]
            last = np.full((n, r_max), -1, dtype=np.int64)
            last[rows_i, k_i] = end_pos
            visible = np.arange(T + Lb)[None, None, :] <= (last[:, :, None] + T)
            visible[:, :, :T] = True  # the run's own IB tokens
            ib_run = torch.as_tensor(ib_run_np, device=device)
            ib_mask = torch.as_tensor(np.repeat(visible, T, axis=1)[:, None], device=device)
        else:
            v_ext[:, 0, :T, 1] = 1.0  # mass on the row's IB tokens (Eq. 13)
        return Bucket(
            tok=torch.as_tensor(tok, device=device),
            valid=torch.as_tensor(is_tok, device=device),
            row=torch.as_tensor(rows, device=device),
            run=None if run is None else torch.as_tensor(run, device=device),
            ib_run=ib_run,
            ib_mask=ib_mask,
            k_ext=k_ext.to(device),
            v_ext=v_ext.to(device),
        )

    @property
    def ib_domain(self) -> torch.Tensor:
        """Domain of each IB token set: one per run (causal) or per (sequence, domain) row."""
        return self.run_dom if self.causal else self.row_dom

    # -- attention -------------------------------------------------------------------------------------

    def attend(self, qkv_all: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """qkv of [item tokens; IB tokens] -> (attention output for the same rows, Σ item->IB mass)."""
        N, T, d = self.N, self.T, self.d
        qkv_items, qkv_ib = qkv_all[:N], qkv_all[N:].view(-1, T, 3 * d)
        zero = qkv_items.new_zeros(1, 3 * d)
        items_pad = torch.cat([qkv_items, zero])  # index N reads zeros
        if self.causal:
            ib_pad = torch.cat([qkv_ib, zero.expand(1, T, 3 * d)])  # index R (padding) reads zeros
        item_out, ib_out, mass = [], [], qkv_all.new_zeros((), dtype=torch.float32)
        # one gather for all buckets (index_select: its backward is index_add, cheaper than index_put)
        gathered = items_pad.index_select(0, self.tok_all).split(self.bucket_sizes)
        for bucket, g in zip(self.buckets, gathered, strict=True):
            g = g.view(*bucket.tok.shape, 3 * d)  # [n, Lb, 3d]
            if self.causal:
                o_items, o_ib, m = self._attend_causal(g, ib_pad, bucket)
            else:
                o_items, o_ib, m = self._attend_bidirectional(g, qkv_ib[bucket.row], bucket)
            item_out.append(o_items.reshape(-1, d))
            ib_out.append(o_ib.reshape(-1, T * d))
            mass = mass + m
        out_items = torch.cat([*item_out, qkv_items.new_zeros(1, d)])[self.slot_of_tok]  # [N, d]
        slots = self.slot_of_run if self.causal else self.slot_of_row
        out_ib = torch.cat([*ib_out, qkv_items.new_zeros(0, T * d)]).index_select(0, slots)  # [R, T*d]
        return torch.cat([out_items, out_ib.reshape(-1, d)]), mass

    def _attend_causal(self, g: torch.Tensor, ib_pad: torch.Tensor, bucket: Bucket):
        """g [n, Lb, 3d] items of a bucket; ib_pad [R + 1, T, 3d] every run's IB tokens (+ a zero row)."""
        T, H, dh, E = self.T, self.H, self.dh, self.E
        n, Lb, _ = g.shape
        scale = 1.0 / math.sqrt(dh)
        q, k, v = split_heads(g, H)  # [n, H, Lb, dh]
        # Keys: T sink slots (standing for the query's own run's IB tokens), then the row's items.
        K = torch.cat([F.pad(k, (0, 0, T, 0)), bucket.k_ext.to(k.dtype).expand(n, H, T + Lb, E - dh)], dim=-1)
        V = torch.cat([F.pad(v, (0, 0, T, 0)), bucket.v_ext.to(v.dtype).expand(n, H, T + Lb, E - dh)], dim=-1)

        def sink_queries(q_: torch.Tensor, k_own: torch.Tensor) -> torch.Tensor:
            """q_ [n, H, M, dh], k_own [n, H, M, T, dh] -> [n, H, M, E] with the own-IB scores in the sink columns."""
            # unscaled, like the kernel's q·k; broadcasting beats bmm on these [1 x dh] @ [dh x T] products
            sink = (q_.unsqueeze(-2) * k_own).sum(-1)
            ones = q_.new_full((1,) * q_.dim(), 1.0 / scale).expand(*q_.shape[:-1], 1)
            fill = q_.new_zeros((1,) * q_.dim()).expand(*q_.shape[:-1], E - dh - 1 - T)
            return torch.cat([q_, ones, sink, fill], dim=-1)

        def own_ib(runs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            """runs [n, M] -> q, k, v of those runs' IB tokens, each [n, H, M, T, dh]."""
            x = ib_pad.index_select(0, runs.reshape(-1)).view(n, runs.shape[1], T, 3, H, dh)
            return tuple(x.select(3, i).permute(0, 3, 1, 2, 4) for i in range(3))

        # Items: causal over their row, plus their run's IB tokens.
        _, k_run, v_run = own_ib(bucket.run)  # [n, H, Lb, T, dh]
        Q = F.pad(sink_queries(q, k_run), (0, 0, T, 0))  # the T sink rows are never read
        o = F.scaled_dot_product_attention(Q, K, V, is_causal=True, scale=scale).split([T, Lb], dim=2)[1]
        o_val, _, p_sink, _ = o.split([dh, 1, T, E - dh - 1 - T], dim=-1)  # p_sink [n, H, Lb, T]
        out_items = merge_heads(o_val + (p_sink.unsqueeze(-1) * v_run).sum(-2))
        mass = (p_sink.float().sum(-1) * bucket.valid[:, None]).sum()  # Eq. 13

        # IB tokens of each run ending in this row: the same keys as the run's last item, nothing later.
        r_max = bucket.ib_run.shape[1]
        q_ib, k_ib, v_ib = own_ib(bucket.ib_run)  # [n, H, Rmax, T, dh]
        Q_ib = sink_queries(q_ib.reshape(n, H, r_max * T, dh), k_ib.repeat_interleave(T, dim=2))
        o = F.scaled_dot_product_attention(Q_ib, K, V, attn_mask=bucket.ib_mask, scale=scale)
        o_val, _, p_sink, _ = o.split([dh, 1, T, E - dh - 1 - T], dim=-1)  # [n, H, Rmax * T, T]
        v_own = v_ib.repeat_interleave(T, dim=2)  # [n, H, Rmax * T, T, dh]
        out_ib = merge_heads(o_val + (p_sink.unsqueeze(-1) * v_own).sum(-2))  # [n, Rmax * T, d]
        return out_items, out_ib, mass

    def _attend_bidirectional(self, g: torch.Tensor, ib: torch.Tensor, bucket: Bucket):
        """g [n, Lb, 3d] items of a bucket; ib [n, T, 3d] each row's IB tokens."""
        T, H, dh, E = self.T, self.H, self.dh, self.E
        n, Lb, _ = g.shape
        q, k, v = split_heads(torch.cat([ib, g], dim=1), H)  # [n, H, T + Lb, dh]: the row's IB tokens first
        scale = 1.0 / math.sqrt(dh)
        q_ext = q.new_zeros(1, 1, 1, E - dh)
        q_ext[..., 0] = 1.0 / scale
        Q = torch.cat([q, q_ext.expand(n, H, T + Lb, E - dh)], dim=-1)
        K = torch.cat([k, bucket.k_ext.to(k.dtype).expand(n, H, T + Lb, E - dh)], dim=-1)
        V = torch.cat([v, bucket.v_ext.to(v.dtype).expand(n, H, T + Lb, E - dh)], dim=-1)
        o = F.scaled_dot_product_attention(Q, K, V, scale=scale)  # [n, H, T + Lb, E]
        o_val, _, p_ib, _ = o.split([dh, 1, 1, E - dh - 2], dim=-1)
        out = o_val.transpose(1, 2).reshape(n, T + Lb, H * dh)
        mass = (p_ib[:, :, T:, 0].float() * bucket.valid[:, None]).sum()  # Eq. 13
        o_ib, o_items = out.split([T, Lb], dim=1)
        return o_items, o_ib, mass

    # -- exchange (Eq. 14) -------------------------------------------------------------------------------

    def exchange(self, ib: torch.Tensor, initial: torch.Tensor, on: bool) -> torch.Tensor:
        """IB token states after a layer -> the IB state each token set starts the next layer with.

        ``initial`` is the layer-0 state (the domain's learned tokens), used where there is nothing to read.
        """
        T, d = self.T, self.d
        flat, first = ib.view(-1, T * d), initial.view(-1, T * d)
        padded = torch.cat([flat, flat.new_zeros(1, T * d)])  # index R reads zeros
        if self.causal:
            # a run reads, per domain, the IB output of that domain's latest run that ended before it began
            if on:
                summed = padded[self.prev_run].sum(dim=1)  # Σ over domains, Eq. 14
                has_any = (self.prev_run < len(flat)).any(dim=1, keepdim=True)
            else:
                summed = padded[self.prev_same]
                has_any = (self.prev_same < len(flat)).unsqueeze(1)
            return torch.where(has_any, summed, first).view(-1, d)
        if not on:
            return ib
        per_seq = flat.new_zeros(self.B, T * d).index_add(0, self.row_seq, flat)  # Σ over domains, Eq. 14
        return per_seq[self.row_seq].view(-1, d)


class IBEncoder(nn.Module):
    """The AutoCDSR⁺ encoder: the same blocks as the plain encoder, run over per-domain packed rows."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.blocks = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
        self.ln_final = nn.LayerNorm(cfg.d_model) if cfg.norm_first else nn.Identity()
        # T initial IB tokens per domain; row 0 (padding domain) stays zero
        self.ib_tokens = nn.Embedding(cfg.num_domains + 1, cfg.num_ib_tokens * cfg.d_model, padding_idx=0)

    def forward(
        self,
        x: torch.Tensor,
        domain_idx: torch.Tensor,
        valid: torch.Tensor,
        input_norm: Callable[[torch.Tensor], torch.Tensor],
        need_a_cd: bool = True,
    ) -> EncoderOutput:
        B, L, d = x.shape
        layout = DomainLayout(domain_idx, valid, self.cfg, x.dtype)
        ib = initial = input_norm(self.ib_tokens(layout.ib_domain).view(-1, d))
        items = x.reshape(-1, d)
        total = x.new_zeros((), dtype=torch.float32)
        for i, block in enumerate(self.blocks):
            h, mass = block(torch.cat([items, ib]), layout)
            items, ib = h[: layout.N], h[layout.N :]
            total = total + mass
            if i + 1 < len(self.blocks):
                ib = layout.exchange(ib, initial, self.cfg.ib_exchange)
        n_rows = max(layout.n_valid, 1)
        a_cd = total / (n_rows * self.cfg.n_heads * len(self.blocks)) if need_a_cd else None
        return EncoderOutput(self.ln_final(items.view(B, L, d)), a_cd, None)
