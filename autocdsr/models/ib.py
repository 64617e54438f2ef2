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
length share one SDPA call (length buckets a quarter octave wide by default; `ModelConfig.ib_bucket_ratio`
and `ib_short_row`), and the outputs are scattered back.
No score is ever computed for a cross-domain item pair, so attention costs Σ_d L_d² instead of L².
Per-token work (LayerNorm, FFN, projections) runs on the flat [B*L + IB] tokens as in the plain encoder.
Per layer the layout builds each flat token's q, k, v extended to the kernel head dim once (in flat
order, contiguous), gathers them into the packed rows with one index_select per q, k, v for all buckets,
and gathers the outputs back into flat order with one more; everything per-run (sink scores, IB value
mixing, below) is done in flat order too, where it costs O(tokens · T · d) with no padding.
The packing plan (`LayoutPlan`: which token goes where, in NumPy) depends only on the batch's domain tags
and padding; training batches bring it from the data path (`batching.TrainBatcher`, in Ray Data's collate
threads), so the training thread only uploads it (`DomainLayout`: one host-to-device copy, masks built on
the device); batches without one (evaluation, serving, benchmarks) are planned in the encoder.

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
and a_cd is read. A run's IB queries go through a second kernel call over the same keys, with an
additive mask (built once per batch) that stops them at the run's last item; there are only T per run,
so that call is small. (Putting the IB queries into the items' causal rows instead, as query-only slots
after their run, measured slower: at these row lengths the CPU kernel computes the full square anyway,
so longer rows cost more than the separate masked call.)

The IB state is summed, not averaged (Eq. 14). Under post-LN (Eq. 3, the default) every block output is
normalised, so the sum stays bounded; under pre-LN the IB residual can grow by up to D per layer.
Domain tags and positions are part of every token (including SASRec's next-domain tag), so the timing and
domains of other-domain events are visible to a domain's tokens; item identities are not.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from autocdsr.models.attention import (
    PAD_SCORE,
    EncoderOutput,
    TransformerBlock,
    kernel_head_dim,
)
from autocdsr.models.config import ModelConfig

# The defaults of `ModelConfig.ib_bucket_ratio` / `ib_short_row`: rows whose length is within this factor of
# a bucket's longest row share that bucket (a quarter octave: at most ~1.4x wasted score work per row) ...
BUCKET_RATIO = ModelConfig.ib_bucket_ratio
# ... and rows this short all share one bucket: their attention is cheap, a kernel call is not.
SHORT_ROW = ModelConfig.ib_short_row
# SDPA backends for the packed rows. Not cuDNN: PyTorch picks it first on Hopper GPUs, and it builds an
# execution plan for every new shape (~0.2 s each), while the buckets' shapes change with every batch:
# measured on an H200 with KuaiRand batches (128 x 800), 6.3 s forward + 6.3 s backward for a batch of
# unseen shapes against 0.10 s + 0.08 s once cached, and 0.2 steps/s in training. Flash and
# memory-efficient attention need no per-shape plan. (The plain encoder's shapes, batch x width, repeat
# from batch to batch: it keeps PyTorch's choice.)
PACKED_ROW_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
# The batch key under which the training data path hands the encoder a batch's `LayoutPlan`.
PLAN_KEY = "ib_plan"


class LayoutPlan:
    """The packing plan of one batch in NumPy: which flat token goes to which packed-row slot, the buckets,
    the runs (causal) and the exchange indices. It depends only on the batch's domain tags and padding
    (and D, T, causal), never on the model's weights, so the data path can build it next to the batch
    (`autocdsr.data.batching.TrainBatcher`, under the batch key `PLAN_KEY`), off the training thread and
    without a device-to-host copy of the tags; `DomainLayout` uploads it. A plain class, not a dataclass
    or a tensor, so that DDP and the loaders pass it through untouched.
    """

    def __init__(
        self,
        domain_idx: np.ndarray,
        valid: np.ndarray,
        num_domains: int,
        num_ib_tokens: int,
        causal: bool,
        bucket_ratio: float = BUCKET_RATIO,
        short_row: int = SHORT_ROW,
    ) -> None:
        B, L = valid.shape
        D, T = num_domains, num_ib_tokens
        self.B, self.L, self.N = B, L, B * L
        self.D, self.T, self.causal = D, T, causal
        self.bucket_ratio, self.short_row = float(bucket_ratio), int(short_row)
        N = self.N
        self.idx: dict[str, np.ndarray] = {}  # int64 index arrays, uploaded together by DomainLayout

        dom = np.asarray(domain_idx).reshape(-1).astype(np.int64)
        pos_time = np.flatnonzero(np.asarray(valid).reshape(-1))  # valid tokens, in (sequence, time) order
        self.n_valid = nv = len(pos_time)
        # Rows: the valid tokens of one (sequence, domain) pair.
        row_keys, row_of_valid = np.unique((pos_time // L) * (D + 1) + dom[pos_time], return_inverse=True)
        row_of_valid = row_of_valid.reshape(-1)
        self.num_rows = G = len(row_keys)
        self.idx["row_seq"] = row_keys // (D + 1)
        self.idx["row_dom"] = row_keys % (D + 1)

        if causal:
            # Runs: maximal stretches of consecutive items of one domain within a sequence.
            seq_t, dom_t = pos_time // L, dom[pos_time]
            new_run = np.ones(nv, dtype=bool)
            new_run[1:] = (seq_t[1:] != seq_t[:-1]) | (dom_t[1:] != dom_t[:-1])
            run_of_valid = np.cumsum(new_run) - 1
            self.num_runs = R = int(new_run.sum())
            run_seq, run_dom = seq_t[new_run], dom_t[new_run]
            self.idx["run_dom"] = run_dom
            # prev[r, d] = the latest run of domain d in r's sequence that ended before r started (R if none)
            prev = np.full((R, D), R, dtype=np.int64)
            idx = np.arange(R)
            for d in range(1, D + 1):
                latest = np.maximum.accumulate(np.where(run_dom == d, idx, -1)) if R else idx
                before = np.concatenate([[-1], latest[:-1]]) if R else idx
                ok = (before >= 0) & (run_seq[np.maximum(before, 0)] == run_seq)
                prev[ok, d - 1] = before[ok]
            self.idx["prev_run"] = prev
            self.idx["prev_same"] = prev[idx, run_dom - 1] if R else idx
            n_sets = R
        else:
            n_sets = G
        self.M = M = N + n_sets * T
        self.Mx = M + 1 + (T if causal else 0)  # + the zero row (+ the sink rows)
        zero, sink = M, M + 1

        # What each packed row holds, in order: bidirectional, the row's T IB tokens, then its items;
        # causal, T sinks, then its items. Sorted by (row, time, sub-order).
        if causal:
            ids = np.concatenate([pos_time, np.tile(sink + np.arange(T), G)])
        else:
            ids = np.concatenate([pos_time, N + np.arange(G * T)])
        row = np.concatenate([row_of_valid, np.repeat(np.arange(G), T)])
        time = np.concatenate([pos_time, np.full(G * T, -1)])
        sub = np.concatenate([np.zeros(nv, np.int64), np.tile(np.arange(T), G)])
        ids = ids[np.lexsort((sub, time, row))]
        counts = np.bincount(row, minlength=G)
        starts = np.cumsum(counts) - counts
        if causal:
            # each run's row, its index among the runs of that row, and its last item's place in the row
            run_end = np.flatnonzero(np.r_[new_run[1:], True])  # index into pos_time
            run_row = row_of_valid[run_end]
            place = np.empty(nv, dtype=np.int64)
            place[np.lexsort((pos_time, row_of_valid))] = np.arange(nv)
            run_last = place[run_end] - (starts[run_row] - T * run_row)  # position among the row's items
            runs_per_row = np.bincount(run_row, minlength=G)
            by_row = np.argsort(run_row, kind="stable")
            run_k = np.empty(R, dtype=np.int64)
            run_k[by_row] = np.arange(R) - (np.cumsum(runs_per_row) - runs_per_row)[run_row[by_row]]

        # Rows of similar length share one kernel call (buckets, longest first). Query slots per bucket:
        # its rows, then (causal) the IB tokens of the runs ending in each row; key slots: its rows.
        self.buckets: list[tuple[int, int, int]] = []  # n, Lb, Rmax * T
        # causal: per bucket, the last row slot each IB query slot may see ([n, Rmax * T]; mask built on
        # the device by DomainLayout)
        self.ib_limits: list[np.ndarray | None] = []
        q_toks, kv_toks, self.q_sizes = [], [], []
        row_chunks = []  # the query slots of the rows themselves (no causal IB queries), in order
        local = np.empty(G, dtype=np.int64)
        by_length = np.argsort(-counts, kind="stable")
        i = 0
        while i < len(by_length):
            longest = counts[by_length[i]]
            j = i + 1
            while j < len(by_length) and (
                longest <= short_row or counts[by_length[j]] * bucket_ratio >= longest
            ):
                j += 1
            rows = by_length[i:j]
            n, Lb, c = len(rows), int(longest), counts[rows]
            tok = np.full((n, Lb), zero, dtype=np.int64)
            within = np.arange(c.sum()) - np.repeat(np.cumsum(c) - c, c)
            tok[np.arange(Lb)[None, :] < c[:, None]] = ids[np.repeat(starts[rows], c) + within]
            q_toks.append(tok.reshape(-1))
            kv_toks.append(tok.reshape(-1))
            row_chunks.append(tok.reshape(-1))
            self.q_sizes.append(n * Lb)
            limit, width = None, 0
            if causal:
                # the runs ending in each row; their IB queries see the same keys as the run's last item:
                # row slots 0 .. last + T, i.e. the T sinks (the run's own IB tokens) and the row's items up
                # to the run's last one; the slots of absent runs (last = -1) see the sinks alone
                r_max = max(int(runs_per_row[rows].max()), 1)
                local[rows] = np.arange(n)
                sel = np.flatnonzero(np.isin(run_row, rows))
                ib_tok = np.full((n, r_max, T), zero, dtype=np.int64)
                ib_tok[local[run_row[sel]], run_k[sel]] = N + sel[:, None] * T + np.arange(T)
                last = np.full((n, r_max), -1, dtype=np.int64)
                last[local[run_row[sel]], run_k[sel]] = run_last[sel]
                limit = np.repeat(last + T, T, axis=1)
                width = r_max * T
                q_toks.append(ib_tok.reshape(-1))
                self.q_sizes.append(n * width)
            self.buckets.append((n, Lb, width))
            self.ib_limits.append(limit)
            i = j
        q_all = np.concatenate(q_toks) if q_toks else np.zeros(0, dtype=np.int64)
        kv_all = np.concatenate(kv_toks) if kv_toks else np.zeros(0, dtype=np.int64)
        self.kv_sizes = [n * Lb for n, Lb, _ in self.buckets]
        # where each flat token's output lands among the query slots; padding reads the zero row after them
        slot_of = np.full(M, len(q_all), dtype=np.int64)
        real = q_all < M
        slot_of[q_all[real]] = np.flatnonzero(real)
        self.idx.update(q_all=q_all, kv_all=kv_all, slot_of=slot_of)
        # the same for the items alone when only the rows are queried (the last layer, see `attend`)
        rows_all = np.concatenate(row_chunks) if row_chunks else np.zeros(0, dtype=np.int64)
        slot_items = np.full(N, len(rows_all), dtype=np.int64)
        is_item = rows_all < N
        slot_items[rows_all[is_item]] = np.flatnonzero(is_item)
        self.idx["slot_items"] = slot_items
        if causal:
            # each flat token's own run's T IB tokens (the zero row where there is none)
            run_x = np.full(self.Mx, -1, dtype=np.int64)
            run_x[pos_time] = run_of_valid
            run_x[N:M] = np.repeat(np.arange(R), T)
            own_ib = np.where(run_x[:, None] >= 0, N + run_x[:, None] * T + np.arange(T), zero)
            self.idx["own_ib"] = own_ib.reshape(-1)

    def check(self, B: int, L: int, cfg: ModelConfig) -> None:
        """Raise if this plan was built for another batch shape or model (a bug in the caller)."""
        want = (
            B,
            L,
            cfg.num_domains,
            cfg.num_ib_tokens,
            cfg.causal,
            float(cfg.ib_bucket_ratio),
            cfg.ib_short_row,
        )
        have = (self.B, self.L, self.D, self.T, self.causal, self.bucket_ratio, self.short_row)
        if have != want:
            raise ValueError(
                "LayoutPlan does not fit this batch and model: built for (batch, length, domains, IB tokens, "
                f"causal, bucket ratio, short row) = {have}, the encoder has {want}"
            )


class DomainLayout:
    """Everything the IB encoder's layers share for one batch: the packing plan, on the device, and the
    constant extra query/key/value columns.

    Tokens are numbered flat: items 0..N-1 (b * L + t), then the IB tokens N + s * T + tau of IB set s
    (a run, causal; a (sequence, domain) row, bidirectional), then one zero row (padding) and, causal,
    the T sink rows. Each packed row lists the flat tokens it holds in order; ``attend`` builds every
    flat token's extended q, k, v once per layer, gathers them into the rows with one index_select each,
    and gathers the outputs back in flat order with one more. The plan's index arrays reach the device in
    one copy (pinned and asynchronous on CUDA); the causal IB queries' masks are built there.
    """

    def __init__(self, plan: LayoutPlan, cfg: ModelConfig, dtype: torch.dtype, device: torch.device) -> None:
        self.B, self.L, self.N, self.M, self.Mx = plan.B, plan.L, plan.N, plan.M, plan.Mx
        self.T, self.H, self.dh = cfg.num_ib_tokens, cfg.n_heads, cfg.head_dim
        T, dh = self.T, self.dh
        self.d = cfg.d_model
        self.causal = causal = plan.causal
        self.E = E = kernel_head_dim(dh + 1 + T)
        self.n_valid, self.num_rows = plan.n_valid, plan.num_rows
        self.q_sizes, self.kv_sizes = plan.q_sizes, plan.kv_sizes
        N, M, Mx = self.N, self.M, self.Mx
        zero, sink = M, M + 1

        # every index array (and the causal mask limits) in one host-to-device copy
        names = list(plan.idx)
        limits = [lim for lim in plan.ib_limits if lim is not None]
        flat = np.concatenate([plan.idx[k].reshape(-1) for k in names] + [lim.reshape(-1) for lim in limits])
        host = torch.from_numpy(flat)
        if device.type == "cuda":
            host = host.pin_memory()
        dev = host.to(device, non_blocking=True)
        parts = iter(dev.split([plan.idx[k].size for k in names] + [lim.size for lim in limits]))
        idx = {k: next(parts).view(plan.idx[k].shape) for k in names}
        self.row_seq, self.row_dom = idx["row_seq"], idx["row_dom"]
        self.q_all, self.kv_all = idx["q_all"], idx["kv_all"]
        self.slot_of, self.slot_items = idx["slot_of"], idx["slot_items"]
        if causal:
            self.num_runs = plan.num_runs
            self.run_dom, self.prev_run, self.prev_same = idx["run_dom"], idx["prev_run"], idx["prev_same"]
            self.own_ib = idx["own_ib"]

        # causal IB queries: additive (float) masks, built once per batch (SDPA would convert a bool mask
        # at every call): a query slot sees the row slots 0 .. its limit
        minus_inf = torch.full((), float("-inf"), dtype=dtype, device=device)
        nothing = torch.zeros((), dtype=dtype, device=device)
        self.buckets: list[tuple[int, int, int, torch.Tensor | None]] = []  # n, Lb, Rmax * T, IB mask
        for (n, Lb, width), lim in zip(plan.buckets, plan.ib_limits, strict=True):
            mask = None
            if lim is not None:
                limit = next(parts).view(n, width)
                hidden = torch.arange(Lb, device=device) > limit[:, None, :, None]  # [n, 1, width, Lb]
                mask = torch.where(hidden, minus_inf, nothing)
            self.buckets.append((n, Lb, width, mask))

        # Constant extra columns (module docstring): query column 0 is 1/scale, key column 0 PAD_SCORE on
        # padding (and causal IB slots), so that the score gains PAD_SCORE there and 0 elsewhere.
        scale = 1.0 / math.sqrt(dh)
        kv_ext = torch.zeros(Mx, 2, 1, E - dh, dtype=dtype, device=device)
        kv_ext[zero, 0, 0, 0] = PAD_SCORE
        if causal:
            eye = torch.eye(T, dtype=dtype, device=device)
            kv_ext[sink:, 0, 0, 1 : 1 + T] = eye  # sink key tau scores query column 1 + tau ...
            kv_ext[sink:, 1, 0, 1 : 1 + T] = eye  # ... and its value column reports the mass on it
            self.q_one = torch.full((1, 1, 1), 1.0 / scale, dtype=dtype, device=device)
            self.q_zero = torch.zeros(1, 1, E - dh - 1 - T, dtype=dtype, device=device)
        else:
            kv_ext[N:M, 1, 0, 1] = 1.0  # mass on the row's IB tokens (Eq. 13)
            self.q_ext = torch.zeros(1, 1, E - dh, dtype=dtype, device=device)
            self.q_ext[..., 0] = 1.0 / scale
        self.k_ext, self.v_ext = kv_ext.unbind(1)  # [Mx, 1, E - dh]

    @classmethod
    def from_batch(
        cls, domain_idx: torch.Tensor, valid: torch.Tensor, cfg: ModelConfig, dtype: torch.dtype
    ) -> DomainLayout:
        """Plan and upload in one go (evaluation, serving, benchmarks: batches that come without a plan).
        On a GPU this reads the tags back to the host, which waits for the device."""
        plan = LayoutPlan(
            domain_idx.cpu().numpy(), valid.cpu().numpy(), cfg.num_domains, cfg.num_ib_tokens, cfg.causal,
            cfg.ib_bucket_ratio, cfg.ib_short_row,
        )  # fmt: skip
        return cls(plan, cfg, dtype, valid.device)

    @property
    def ib_domain(self) -> torch.Tensor:
        """Domain of each IB token set: one per run (causal) or per (sequence, domain) row."""
        return self.run_dom if self.causal else self.row_dom

    # -- attention -------------------------------------------------------------------------------------

    def attend(self, qkv_all: torch.Tensor, n_out: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """qkv of [item tokens; IB tokens] -> (attention output for the same rows, Σ item->IB mass).

        ``n_out=N`` (the last layer): every token is still a key, but only the items' outputs are computed
        and returned; the causal IB queries' kernel call is skipped (their outputs would be thrown away).
        """
        N, M, Mx, T, H, dh, E = self.N, self.M, self.Mx, self.T, self.H, self.dh, self.E
        if n_out not in (None, N):
            raise ValueError(f"DomainLayout.attend: n_out must be None or the item count {N}, got {n_out}")
        items_only = n_out is not None
        # + the zero (and sink) rows; unbind, not slicing: a slice's backward zero-fills the whole input
        q, k, v = F.pad(qkv_all, (0, 0, 0, Mx - M)).view(Mx, 3, H, dh).unbind(1)
        if self.causal:
            # every token's own run's IB keys and values (the zero row where there is none); separate
            # contiguous k and v: elementwise ops on strided slices cost twice as much
            k_own = k.index_select(0, self.own_ib).view(Mx, T, H, dh)
            v_own = v.index_select(0, self.own_ib).view(Mx, T, H, dh)
            # sink scores, unscaled like the kernel's q·k
            sink = (q.unsqueeze(1) * k_own).sum(-1).transpose(1, 2)  # [Mx, H, T]
            xq = torch.cat(
                [q, self.q_one.expand(Mx, H, 1), sink, self.q_zero.expand(Mx, H, E - dh - 1 - T)], dim=-1
            )
        else:
            xq = torch.cat([q, self.q_ext.expand(Mx, H, E - dh)], dim=-1)
        xk = torch.cat([k, self.k_ext.to(k.dtype).expand(Mx, H, E - dh)], dim=-1)
        xv = torch.cat([v, self.v_ext.to(v.dtype).expand(Mx, H, E - dh)], dim=-1)
        # one gather each for all buckets (index_select: its backward is index_add, cheaper than index_put)
        gq = iter(xq.index_select(0, self.q_all).split(self.q_sizes))
        gk = xk.index_select(0, self.kv_all).split(self.kv_sizes)
        gv = xv.index_select(0, self.kv_all).split(self.kv_sizes)
        keep = dh + 1 + (T if self.causal else 1)
        with sdpa_kernel(PACKED_ROW_BACKENDS):
            outs = self._attend_buckets(gq, gk, gv, items_only, keep)
        outs.append(qkv_all.new_zeros(1, H, keep))
        o = torch.cat(outs).index_select(0, self.slot_items if items_only else self.slot_of)  # flat order
        rows = len(o)  # M, or N (items only)
        if self.causal:
            p_sink = o[..., dh + 1 :]  # [rows, H, T]: mass on the own run's IB tokens
            mix = (p_sink.transpose(1, 2).unsqueeze(-1) * v_own[:rows]).sum(1)
            out = o[..., :dh] + mix
            mass = p_sink[:N].float().sum()  # Eq. 13; padding rows read zeros
        else:
            out = o[..., :dh]
            mass = o[:N, :, dh + 1].float().sum()
        return out.reshape(rows, H * dh), mass

    def _attend_buckets(
        self,
        gq: Iterator[torch.Tensor],
        gk: Sequence[torch.Tensor],
        gv: Sequence[torch.Tensor],
        items_only: bool,
        keep: int,
    ) -> list[torch.Tensor]:
        """One SDPA call per bucket (and, causal, one for the IB queries of its runs): their outputs, in order."""
        H, E = self.H, self.E
        scale = 1.0 / math.sqrt(self.dh)
        outs = []
        for (n, Lb, width, ib_mask), bk, bv in zip(self.buckets, gk, gv, strict=True):
            k, v = (t.view(n, Lb, H, E).transpose(1, 2) for t in (bk, bv))
            q = next(gq).view(n, Lb, H, E).transpose(1, 2)
            o = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal, scale=scale)  # [n, H, Lb, E]
            outs.append(o.transpose(1, 2).reshape(n * Lb, H, E)[..., :keep])
            if ib_mask is not None:  # the IB queries of the runs ending in these rows
                q = next(gq)
                if items_only:
                    continue
                q = q.view(n, width, H, E).transpose(1, 2)
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=ib_mask, scale=scale)
                outs.append(o.transpose(1, 2).reshape(n * width, H, E)[..., :keep])
        return outs

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
        plan: LayoutPlan | None = None,
    ) -> EncoderOutput:
        """``plan``: the batch's `LayoutPlan` when the data path built one; else it is built here."""
        B, L, d = x.shape
        if plan is None:
            layout = DomainLayout.from_batch(domain_idx, valid, self.cfg, x.dtype)
        else:
            plan.check(B, L, self.cfg)
            layout = DomainLayout(plan, self.cfg, x.dtype, x.device)
        ib = initial = input_norm(self.ib_tokens(layout.ib_domain).view(-1, d))
        items = x.reshape(-1, d)
        total = x.new_zeros((), dtype=torch.float32)
        for i, block in enumerate(self.blocks):
            if i + 1 == len(self.blocks):  # the IB tokens' last outputs would be unused: keys only
                items, mass = block(torch.cat([items, ib]), layout, n_out=layout.N)
                total = total + mass
                break
            h, mass = block(torch.cat([items, ib]), layout)
            items, ib = h[: layout.N], h[layout.N :]
            total = total + mass
            ib = layout.exchange(ib, initial, self.cfg.ib_exchange)
        n_rows = max(layout.n_valid, 1)
        a_cd = total / (n_rows * self.cfg.n_heads * len(self.blocks)) if need_a_cd else None
        return EncoderOutput(self.ln_final(items.view(B, L, d)), a_cd, None)
