"""The held-out gate: which domains' query rows AutoCDSR's a_cd acts on (this project's addition to the paper).

Eq. 5 pools every query row's cross-domain attention into one a_cd, and the Pareto solver (Eq. 8-12) weighs
it against L_rec with training gradients only. On KuaiRand that lowers the cross-domain attention of the rows
whose recommendations need it (docs/results.md, "Per-domain gradient conflict" and "The held-out gate"): the
training gradients say lowering a_cd costs L_rec nothing, while on held-out targets it does, and only for
some domains' rows.

The gate asks the held-out question per query domain q. With a_cd^(q) = Eq. 5 over the rows of domain q and
L_val = Eq. 4 on held-out targets (the last item of each `valid` sequence, which training never predicts),
it estimates over the shared parameters θ (those of Eq. 8-12)

    u_q = E[∇L_val] · E[∇a_cd^(q)]

from M probe batches without the same-batch bias: (S_val · S_q − Σ_i g_val,i · g_q,i) / (M (M − 1)), sums
over batches (and ranks). u_q > 0: a step that lowers a_cd^(q) lowers the held-out loss too, to first order;
such a domain's rows keep weight 1 in a_cd. u_q ≤ 0: the held-out loss needs that cross-domain attention;
its rows get weight 0 (`SequenceRecommender.set_query_weights`). A domain without rows in the probe keeps its
weight. Every rank sums the same quantities, so every rank gets the same weights.

With ``min_z`` > 0 a domain's weight changes only where |u_q| exceeds ``min_z`` jackknife standard errors of
u_q (leave one probe batch out; the per-batch terms are reduced over ranks as scalars), otherwise it keeps its
previous weight, which before the first probe is ``initial``: ``initial=0, min_z=2`` starts as `cd` and
constrains a domain's rows only on clear held-out evidence. Costs memory for the per-batch gradients,
``batches × (domains + 1)`` float64 vectors of the shared parameters, only when ``min_z`` > 0.

BERT4Rec's held-out batches are its serving layout: the history, then [MASK] tagged with the target's domain
(`heldout_batch`); the rows of domain q include that masked position when the target is in q.

Cost: per probe batch one forward and backward per domain (a_cd^(q)) plus one backward of L_val, on
``sequences`` held-out sequences; `autocdsr.gate.every` sets how often (docs/configuration.md).

Measured (KuaiRand, SASRec; docs/results.md): on the sign alone (two seeds) one seed ahead of `cd` on every
domain, one level overall and behind on `type_a`, the weights flipping between probes on estimates within one
SE; with ``initial=0, min_z=2`` (four seeds) the decisions hold and every seed is behind `cd`: once a domain's
rows are constrained, the held-out gradient asks for more of the same. An experiment, off by default.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from autocdsr.data import batching


@dataclass(frozen=True)
class GateConfig:
    """`autocdsr.gate.*`: the held-out gate over query domains. Off by default; acts in `cd+autocdsr` runs
    (SASRec and BERT4Rec), other methods ignore it."""

    enabled: bool = False
    # steps between probes after the first, which runs at the first step the a_cd objective acts; 0: that one
    # probe only (the weights then hold for the whole run)
    every: int = 0
    batches: int = 8  # M probe batches per probe (>= 2: the estimate pairs distinct batches)
    sequences: int = 256  # held-out sequences per probe batch
    max_sequences: int = 20_000  # held-out sequences each rank keeps in memory to draw probe batches from
    # a weight changes only where |u_q| > min_z × its jackknife SE (0: on the sign alone; > 0 needs batches >= 3)
    min_z: float = 0.0
    # every domain's weight until a probe decides otherwise (1: the paper's a_cd over all rows; 0: `cd`)
    initial: float = 1.0

    def __post_init__(self) -> None:
        if self.every < 0:
            raise ValueError(f"GateConfig.every must be >= 0, got {self.every}")
        if self.min_z < 0:
            raise ValueError(f"GateConfig.min_z must be >= 0, got {self.min_z}")
        if self.initial < 0:
            raise ValueError(f"GateConfig.initial must be >= 0, got {self.initial}")
        if self.min_z > 0 and self.batches < 3:
            raise ValueError(
                f"GateConfig.min_z > 0 needs batches >= 3 (a leave-one-out estimate), got {self.batches}"
            )
        for name in ("sequences", "max_sequences"):
            if getattr(self, name) < 1:
                raise ValueError(f"GateConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.batches < 2:
            raise ValueError(
                f"GateConfig.batches must be >= 2 (pairs of distinct batches), got {self.batches}"
            )


@dataclass(frozen=True)
class GateResult:
    """One probe: u_q per domain 1..D (nan where the probe had no row of q), the weights it chose and, with
    ``min_z`` > 0, the jackknife standard errors of u_q."""

    u: tuple[float, ...]
    weights: tuple[float, ...]
    heldout_loss: float
    se: tuple[float, ...] | None = None

    def as_metrics(self, domains: Sequence[str]) -> dict[str, float]:
        out = {"gate/heldout_loss_rec": self.heldout_loss}
        for q, (name, u, w) in enumerate(zip(domains, self.u, self.weights, strict=True)):
            out[f"gate/u/{name}"] = u
            out[f"gate/weight/{name}"] = w
            if self.se is not None:
                out[f"gate/se/{name}"] = self.se[q]
        return out


def heldout_batch(
    items: Sequence[np.ndarray], domains: Sequence[np.ndarray], max_len: int, mask_token: int | None = None
) -> dict:
    """A batch of held-out sequences whose only target is each sequence's last item (left-padded, so the
    last column holds every sequence's target).

    SASRec (``mask_token`` None): the items before it are the inputs, as in training. BERT4Rec: the serving
    layout (`BERT4Rec.user_embedding`): the newest ``max_len`` - 1 items before it, then [MASK] tagged with the
    target's domain, the only masked position."""
    if mask_token is None:
        b = batching.sasrec_batch(items, domains, max_len)
        last = torch.zeros_like(b["target_idx"], dtype=torch.bool)
        last[:, -1] = True
        b["target_idx"] = b["target_idx"] * last
        return b
    b = batching.eval_batch(items, domains, max_len - 1)
    n = len(items)
    item_idx = torch.cat([b["item_idx"], torch.full((n, 1), mask_token, dtype=b["item_idx"].dtype)], 1)
    target_idx = torch.zeros_like(item_idx)
    target_idx[:, -1] = b["target_idx"]
    return {
        "item_idx": item_idx,
        "domain_idx": torch.cat([b["domain_idx"], b["target_domain"].view(-1, 1)], 1),
        "target_idx": target_idx,
    }


def unbiased_dots(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """g [N, T, P] per-batch gradients of T objectives -> (U [T, T], jackknife SE of U / diag ratios).

    U[a, b] estimates E[g_a] · E[g_b] from independent batches: (S_a · S_b − Σ_i g_a,i · g_b,i) / (N (N − 1)).
    Also returns the jackknife standard error of R[a, b] = U[a, b] / U[b, b] (N >= 3)."""
    n = g.shape[0]
    s = g.sum(0)  # [T, P]
    ss = s @ s.T  # [T, T]
    own = torch.einsum("itp,iup->tu", g, g)  # Σ_i g_a,i · g_b,i
    u = (ss - own) / (n * (n - 1))
    # leave batch i out: (S − g_i)_a · (S − g_i)_b − (own − g_i,a · g_i,b), over (N − 1)(N − 2)
    s_gi = torch.einsum("tp,iup->itu", s, g)  # S_a · g_i,b
    gi_gi = torch.einsum("itp,iup->itu", g, g)  # g_i,a · g_i,b
    loo = (ss[None] - s_gi - s_gi.transpose(1, 2) + gi_gi - (own[None] - gi_gi)) / ((n - 1) * (n - 2))
    ratio = loo / torch.diagonal(loo, dim1=1, dim2=2)[:, None, :]
    se = ((n - 1) / n * ((ratio - ratio.mean(0)) ** 2).sum(0)).sqrt()
    return u, se


def flat_grad(value: torch.Tensor, params: Sequence[torch.Tensor], retain: bool) -> torch.Tensor:
    """∂value/∂params as one float64 vector (zeros for parameters the value does not reach)."""
    grads = torch.autograd.grad(value, params, retain_graph=retain, allow_unused=True)
    return torch.cat(
        [
            (g if g is not None else torch.zeros_like(p)).reshape(-1).double()
            for g, p in zip(grads, params, strict=True)
        ]
    )


def _distributed() -> bool:
    """More than one rank: the probe's sums are all-reduced."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _jackknife_se(
    per_batch: Sequence[tuple[torch.Tensor, torch.Tensor]],
    s_val: torch.Tensor,
    s_q: torch.Tensor,
    cross: torch.Tensor,
    own: torch.Tensor,
    n: int,
) -> torch.Tensor:
    """Jackknife SE of u_q over all ranks' probe batches. Leaving batch i out, u_q^(-i) =
    ((S_val − g_val,i)·(S_q − g_q,i) − (own_q − g_val,i·g_q,i)) / ((n − 1)(n − 2)); every rank computes it
    for its own batches from the global sums and contributes Σ u^(-i) and Σ (u^(-i))² (2D scalars)."""
    loo = []
    for g_val, gq in per_batch:
        c = gq @ g_val
        loo.append((cross - gq @ s_val - s_q @ g_val + c - (own - c)) / ((n - 1) * (n - 2)))
    u_i = torch.stack(loo)  # [this rank's batches, D]
    sums = torch.cat([u_i.sum(0), (u_i**2).sum(0)])
    if _distributed():
        dist.all_reduce(sums)
    D = s_q.shape[0]
    mean = sums[:D] / n
    var = ((n - 1) / n) * (sums[D:] - n * mean**2)
    return var.clamp_min(0).sqrt()


def probe(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    shared: Sequence[torch.Tensor],
    previous: Sequence[float],
    min_z: float = 0.0,
) -> GateResult:
    """Run the gate on held-out ``batches`` (from `heldout_batch`; this rank's share) with the unwrapped
    model and return u_q and the new weights (with ``min_z`` > 0 a weight changes only where |u_q| >
    min_z × SE). Leaves no `.grad`; restores the model's query weights, its mode and the RNG streams
    (dropout here must not shift training's); every rank must call it (the sums are all-reduced when
    torch.distributed is initialised)."""
    D = model.cfg.num_domains
    per_batch: list[tuple[torch.Tensor, torch.Tensor]] = []  # kept only for the SE (min_z > 0)
    kept, was_training = model.query_weights, model.training
    device = next(model.parameters()).device
    s_val = s_q = None
    stats = torch.zeros(2 * D + 2, dtype=torch.float64, device=device)  # own[D], rows[D], loss, batches
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            model.train()  # dropout as in training: the gradients a training step sees
            for batch in batches:
                g_q, g_val = [], None
                for q in range(D):
                    model.set_query_weights([float(d == q) for d in range(D)])
                    out = model(batch)
                    if g_val is None:  # L_val does not depend on the query weights: once per batch
                        g_val = flat_grad(out.loss_rec, shared, retain=True)
                        stats[2 * D] += out.loss_rec.detach().double()
                    g_q.append(flat_grad(out.a_cd, shared, retain=False))
                gq = torch.stack(g_q)  # [D, P]
                stats[:D] += gq @ g_val
                own = getattr(model, "query_domain", lambda b: None)(batch)
                own = batch["domain_idx"] if own is None else own
                valid = batch["item_idx"] != 0
                stats[D : 2 * D] += torch.stack([(valid & (own == q + 1)).sum() for q in range(D)]).double()
                stats[2 * D + 1] += 1
                s_val = g_val if s_val is None else s_val + g_val
                s_q = gq if s_q is None else s_q + gq
                if min_z > 0:
                    per_batch.append((g_val, gq))
    finally:
        model.set_query_weights(kept)
        model.train(was_training)
    if s_val is None or s_q is None:
        raise ValueError("gate probe: no held-out batch on this rank")
    if _distributed():
        # S_val · S_q over all ranks needs the summed vectors, not the sum of per-rank dot products
        flat = torch.cat([s_val, s_q.reshape(-1), stats])
        dist.all_reduce(flat)
        P = s_val.numel()
        s_val, s_q, stats = flat[:P], flat[P : P * (D + 1)].view(D, P), flat[P * (D + 1) :]
    cross_t = s_q @ s_val
    values = torch.cat([cross_t, stats]).tolist()
    cross, own, rows = values[:D], values[D : 2 * D], values[2 * D : 3 * D]
    loss_sum, n = values[3 * D], int(values[3 * D + 1])
    if n < 2:
        raise ValueError(f"gate probe: needs >= 2 held-out batches over all ranks, got {n}")
    u = [(c - o) / (n * (n - 1)) if r > 0 else float("nan") for c, o, r in zip(cross, own, rows, strict=True)]
    se: tuple[float, ...] | None = None
    if min_z > 0:
        if n < 3:
            raise ValueError(f"gate probe: min_z > 0 needs >= 3 held-out batches over all ranks, got {n}")
        sd = _jackknife_se(per_batch, s_val, s_q, cross_t, stats[:D], n).tolist()
        se = tuple(x if r > 0 else float("nan") for x, r in zip(sd, rows, strict=True))
    weights = tuple(
        float(p) if r == 0 or (se is not None and abs(x) <= min_z * se[q]) else (1.0 if x > 0 else 0.0)
        for q, (x, r, p) in enumerate(zip(u, rows, previous, strict=True))
    )
    return GateResult(tuple(u), weights, loss_sum / n, se)


class HeldoutGate:
    """The gate's schedule and state in a training run: probes at the first step the a_cd objective acts
    (``start_after`` + 1), then every ``config.every`` steps (0: never again), on probe batches drawn from
    this rank's held-out sequences with a generator seeded by (seed, step, rank)."""

    def __init__(
        self,
        config: GateConfig,
        start_after: int,
        max_len: int,
        seed: int,
        rank: int,
        items: Sequence[np.ndarray],
        domains: Sequence[np.ndarray],
        num_domains: int,
    ) -> None:
        keep = [i for i, s in enumerate(items) if len(s) >= 2]
        if not keep:
            raise ValueError("autocdsr.gate: no held-out sequence with a history on this rank")
        self.config, self.start_after, self.max_len, self.seed, self.rank = (
            config,
            start_after,
            max_len,
            seed,
            rank,
        )
        self.items = [items[i] for i in keep]
        self.domains = [domains[i] for i in keep]
        self.weights: tuple[float, ...] = (float(config.initial),) * num_domains
        self.last_probe: int | None = None

    def due(self, step: int) -> bool:
        """Whether the gate probes before training step ``step`` (the same answer on every rank)."""
        if step <= self.start_after:
            return False
        if self.last_probe is None:
            return True
        return self.config.every > 0 and step - self.last_probe >= self.config.every

    def run(self, model: nn.Module, shared: Sequence[torch.Tensor], step: int) -> tuple[GateResult, bool]:
        """Probe, set the model's query weights; returns the result and whether the weights changed."""
        cfg = self.config
        rng = np.random.default_rng([self.seed, step, self.rank])
        n = cfg.batches * cfg.sequences
        order = rng.permutation(len(self.items))
        order = np.resize(order, n) if n > len(order) else order[:n]
        device = next(model.parameters()).device
        mask = model.cfg.mask_token if model.cfg.backbone == "bert4rec" else None

        def batches():
            for b in range(cfg.batches):
                idx = order[b * cfg.sequences : (b + 1) * cfg.sequences]
                batch = heldout_batch(
                    [self.items[i] for i in idx], [self.domains[i] for i in idx], self.max_len, mask
                )
                yield {k: v.to(device) for k, v in batch.items()}

        result = probe(model, batches(), shared, self.weights, cfg.min_z)
        changed = result.weights != self.weights
        self.weights, self.last_probe = result.weights, step
        model.set_query_weights(self.weights)
        return result, changed

    def state_dict(self) -> dict:
        return {"weights": list(self.weights), "last_probe": self.last_probe}

    def load_state_dict(self, state: dict, model: nn.Module) -> None:
        self.weights = tuple(float(w) for w in state["weights"])
        self.last_probe = state["last_probe"]
        model.set_query_weights(self.weights)
