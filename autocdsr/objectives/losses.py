"""The recommendation loss L_rec (Eq. 4): softmax over items of cosine(h*, Emb(x)) / temperature.

`full_softmax_loss` is Eq. 4 as written: every item is in the denominator, the padding item 0 never is.
It never holds the [rows, items] logits at once: the rows go through in chunks of about
``chunk_elements`` logits (forward: each chunk's log-sum-exp; backward: the chunk's logits again, then
softmax minus one-hot times the items and the users). Memory is O(chunk · items) instead of O(rows · items),
and on a CPU each chunk stays in cache: at 25,600 rows × 7,101 items (SASRec 128 × 200) forward and
backward take about a third of the time of materialising the logits (docs/benchmarks.md). The price is one
more [rows × items × d] matrix product in the backward pass.
`sampled_softmax_loss` is the opt-in alternative for item sets too large for a full softmax: one shared set
of negatives per batch drawn with replacement from a proposal Q, each corrected by -log(M·Q(x)) (logQ
correction), accidental hits of the target removed. The positive keeps its plain logit, which makes
e^{s*} + Σ_j e^{s_j} / (M·Q(x_j)) an unbiased estimate of the full denominator, so the loss tends to the
full softmax as M grows. Both return the mean over the target rows they are given.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


def cosine_logits(user: torch.Tensor, items: torch.Tensor, temperature: float) -> torch.Tensor:
    """r(x) of Eq. 4 for every (user row, item row) pair: cos(user, item) / temperature, [N, V]."""
    # dividing the [N, d] factor rather than the [N, V] product saves a pass over the logits
    return (F.normalize(user, dim=-1) / temperature) @ F.normalize(items, dim=-1).T


# Logits per chunk: ~16 MB of fp32 on a CPU (the measured sweet spot for its caches, from 7k to 100k items);
# on an accelerator large chunks only bound memory (1 GB of fp32), fewer launches matter more.
CPU_CHUNK_ELEMENTS = 2**22
ACCELERATOR_CHUNK_ELEMENTS = 2**28


def full_softmax_loss(
    user: torch.Tensor,
    item_emb: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    chunk_elements: int | None = None,
) -> torch.Tensor:
    """Eq. 4: user [N, d], item_emb [num_items + 1, d] (row 0 = padding), targets [N] in 1..num_items.

    The mean over the N rows (NaN for N = 0, as ``F.cross_entropy``). ``chunk_elements``: logits held at a
    time (default by device, module doc); the result does not depend on it beyond float rounding.
    """
    if chunk_elements is None:
        chunk_elements = CPU_CHUNK_ELEMENTS if user.device.type == "cpu" else ACCELERATOR_CHUNK_ELEMENTS
    rows = max(1, chunk_elements // max(len(item_emb), 1))
    # dividing the [N, d] factor rather than the [N, V] product saves a pass over the logits
    return _ChunkedSoftmaxLoss.apply(
        F.normalize(user, dim=-1) / temperature, F.normalize(item_emb, dim=-1), targets, rows
    )


class _ChunkedSoftmaxLoss(torch.autograd.Function):
    """mean_i [logsumexp_{j>=1}(u_i · x_j) − u_i · x_{t_i}] over rows u_i of ``user`` (already scaled),
    ``rows`` rows of logits at a time. Under autocast the products run in the autocast dtype and the
    softmax in fp32, as autocast runs ``matmul`` + ``cross_entropy``."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, user: torch.Tensor, items: torch.Tensor, targets: torch.Tensor, rows: int
    ) -> torch.Tensor:
        device = user.device.type
        mm_dtype = (
            torch.get_autocast_dtype(device)
            if torch.is_autocast_enabled(device)
            else torch.promote_types(user.dtype, items.dtype)
        )
        acc = torch.promote_types(mm_dtype, torch.float32)  # the softmax's dtype
        with torch.autocast(device, enabled=False):
            u, x = user.to(mm_dtype), items.to(mm_dtype)
            lse = torch.empty(len(u), dtype=acc, device=user.device)
            target = torch.empty_like(lse)
            for start in range(0, len(u), rows):
                logits = (u[start : start + rows] @ x.T).to(acc)
                # the target's logit from the same product as the denominator's (same rounding)
                target[start : start + rows] = logits.gather(1, targets[start : start + rows, None]).squeeze(
                    1
                )
                logits[:, 0] = float("-inf")  # padding is not an item
                lse[start : start + rows] = torch.logsumexp(logits, dim=1)
            loss = (lse - target).sum() / len(u)  # 0 / 0 = NaN without rows
        ctx.save_for_backward(u, x, targets, lse)
        ctx.rows, ctx.dtypes = rows, (user.dtype, items.dtype)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None, None]:  # type: ignore[override]
        u, x, targets, lse = ctx.saved_tensors
        rows, (user_dtype, items_dtype) = ctx.rows, ctx.dtypes
        acc = lse.dtype
        scale = grad.to(acc) / len(u)
        grad_u = torch.empty_like(u)
        grad_x = torch.zeros(x.shape, dtype=acc, device=x.device)
        minus_one = torch.full((1, 1), -1.0, dtype=acc, device=u.device)
        with torch.autocast(u.device.type, enabled=False):
            for start in range(0, len(u), rows):
                chunk, t = u[start : start + rows], targets[start : start + rows]
                p = (chunk @ x.T).to(acc).sub_(lse[start : start + rows, None]).exp_()  # softmax
                p[:, 0] = 0.0
                p.scatter_add_(1, t[:, None], minus_one.expand(len(t), 1))  # − one-hot(target)
                p = p.mul_(scale).to(u.dtype)
                grad_u[start : start + rows] = p @ x
                if p.dtype == acc:
                    grad_x.addmm_(p.T, chunk)
                else:  # the autocast dtype: its product, accumulated in fp32
                    grad_x += (p.T @ chunk).to(acc)
        return grad_u.to(user_dtype), grad_x.to(items_dtype), None, None


def sampling_log_q(item_count: torch.Tensor, smoothing: float = 1.0) -> torch.Tensor:
    """Log-probabilities of a frequency proposal, log((count + smoothing) / Σ), -inf for padding item 0.

    Smoothing keeps every item's probability positive: an item that can never be drawn would silently
    drop out of the estimated denominator.
    """
    weights = item_count.double() + smoothing
    weights[0] = 0.0
    return (weights / weights.sum()).log().float()


def sampled_softmax_loss(
    user: torch.Tensor,
    item_emb: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    log_q: torch.Tensor,
    num_samples: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Sampled softmax with logQ correction.

    user [N, d]; item_emb [num_items + 1, d]; targets [N]; log_q [num_items + 1] log-probabilities of the
    proposal (log_q[0] = -inf so padding is never drawn); ``num_samples`` negatives M, shared by all rows.
    """
    probs = log_q.exp()
    negatives = torch.multinomial(probs, num_samples, replacement=True, generator=generator)  # [M]
    user_n = F.normalize(user, dim=-1) / temperature
    pos = (user_n * F.normalize(item_emb[targets], dim=-1)).sum(-1, keepdim=True)  # [N, 1]
    neg = user_n @ F.normalize(item_emb[negatives], dim=-1).T  # [N, M]
    neg = neg - (log_q[negatives] + torch.log(torch.tensor(float(num_samples), device=neg.device)))
    neg = neg.masked_fill(negatives[None, :] == targets[:, None], float("-inf"))  # accidental hits
    logits = torch.cat([pos, neg], dim=1)
    return (torch.logsumexp(logits, dim=1) - pos.squeeze(1)).mean()
