"""The recommendation loss L_rec (Eq. 4): softmax over items of cosine(h*, Emb(x)) / temperature.

`full_softmax_loss` is Eq. 4 as written: every item is in the denominator, the padding item 0 never is.
It never holds the [rows, items] logits at once: the rows go through in chunks of about
``chunk_elements`` logits (forward: each chunk's log-sum-exp; backward: the chunk's logits again, then
softmax minus one-hot times the items and the users). Memory is O(chunk · items) instead of O(rows · items),
and on a CPU it is faster too: at 25,600 rows × 7,101 items (SASRec 128 × 200) forward and backward take
about a quarter of the time of materialising the logits (`bench/loss.py`, docs/benchmarks.md). The price is
one more [rows × items × d] matrix product in the backward pass. Every chunk of a pass writes into one
buffer (`_Chunks`): a fresh large tensor per chunk would fault its pages in again on a CPU.
`sampled_softmax_loss` is the opt-in alternative for item sets too large for a full softmax: one shared set
of negatives per batch drawn with replacement from a proposal Q, each corrected by -log(M·Q(x)) (logQ
correction), accidental hits of the target removed. The positive keeps its plain logit, which makes
e^{s*} + Σ_j e^{s_j} / (M·Q(x_j)) an unbiased estimate of the full denominator, so the loss tends to the
full softmax as M grows; its [rows, M] logits go through in chunks the same way. Both return the mean over
the target rows they are given.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


def cosine_logits(user: torch.Tensor, items: torch.Tensor, temperature: float) -> torch.Tensor:
    """r(x) of Eq. 4 for every (user row, item row) pair: cos(user, item) / temperature, [N, V]."""
    # dividing the [N, d] factor rather than the [N, V] product saves a pass over the logits
    return (F.normalize(user, dim=-1) / temperature) @ F.normalize(items, dim=-1).T


# Logits per chunk: 16 MiB of fp32 on a CPU (measured fastest from 7k to 100k items, docs/benchmarks.md);
# on an accelerator large chunks only bound memory (1 GiB of fp32), fewer launches matter more.
CPU_CHUNK_ELEMENTS = 2**22
ACCELERATOR_CHUNK_ELEMENTS = 2**28


def _rows_per_chunk(device: torch.device, candidates: int, chunk_elements: int | None) -> int:
    if chunk_elements is None:
        chunk_elements = CPU_CHUNK_ELEMENTS if device.type == "cpu" else ACCELERATOR_CHUNK_ELEMENTS
    return max(1, chunk_elements // max(candidates, 1))


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
    rows = _rows_per_chunk(user.device, len(item_emb), chunk_elements)
    # dividing the [N, d] factor rather than the [N, V] product saves a pass over the logits
    return _ChunkedSoftmaxLoss.apply(
        F.normalize(user, dim=-1) / temperature, F.normalize(item_emb, dim=-1), targets, rows
    )


class _ChunkedSoftmaxLoss(torch.autograd.Function):
    """mean_i [log(Σ_j e^{s_ij}) − s_i*], ``rows`` rows of logits s_ij = u_i · c_j (+ bias_j) at a time.

    Full softmax (``pos`` None): the candidates are the items by index, the target's logit s_i* is the
    one in its column, column 0 (padding) is left out. Sampled (``pos`` given): s_i* = ``pos``_i (computed
    by the caller, differentiated through the returned gradient) is added to the denominator, and
    candidates equal to the row's target (accidental hits, ``cand_ids``) are left out. ``user`` is already
    scaled by 1 / temperature. Under autocast the products run in the autocast dtype and the softmax in
    fp32, as autocast runs ``matmul`` + ``cross_entropy``."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        user: torch.Tensor,
        cands: torch.Tensor,
        targets: torch.Tensor,
        rows: int,
        bias: torch.Tensor | None = None,
        cand_ids: torch.Tensor | None = None,
        pos: torch.Tensor | None = None,
    ) -> torch.Tensor:
        device = user.device.type
        mm_dtype = (
            torch.get_autocast_dtype(device)
            if torch.is_autocast_enabled(device)
            else torch.promote_types(user.dtype, cands.dtype)
        )
        acc = torch.promote_types(mm_dtype, torch.float32)  # the softmax's dtype
        with torch.autocast(device, enabled=False):
            u, c = user.to(mm_dtype), cands.to(mm_dtype)
            bias_acc = None if bias is None else bias.to(acc)
            lse = torch.empty(len(u), dtype=acc, device=user.device)
            target = torch.empty_like(lse) if pos is None else pos.detach().to(acc)
            chunks = _Chunks(min(rows, len(u)), c, acc)
            for start in range(0, len(u), rows):
                logits = chunks.logits(
                    u[start : start + rows], targets[start : start + rows], bias_acc, cand_ids
                )
                if pos is None:  # the target's logit from the same product as the denominator's
                    target[start : start + rows] = logits.gather(
                        1, targets[start : start + rows, None]
                    ).squeeze(1)
                    logits[:, 0] = float("-inf")  # padding is not an item
                    lse[start : start + rows] = _logsumexp_(logits)
                else:  # the positive joins the denominator
                    lse[start : start + rows] = torch.logaddexp(
                        _logsumexp_(logits), target[start : start + rows]
                    )
            loss = (lse - target).sum() / len(u)  # 0 / 0 = NaN without rows
        ctx.save_for_backward(u, c, targets, lse, bias_acc, cand_ids, target if pos is not None else None)
        ctx.rows = rows
        ctx.dtypes = (user.dtype, cands.dtype, None if pos is None else pos.dtype)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        u, c, targets, lse, bias_acc, cand_ids, pos = ctx.saved_tensors
        rows, (user_dtype, cands_dtype, pos_dtype) = ctx.rows, ctx.dtypes
        acc = lse.dtype
        scale = grad.to(acc) / len(u)
        grad_u = torch.empty_like(u)
        grad_c = torch.zeros(c.shape, dtype=acc, device=c.device)
        with torch.autocast(u.device.type, enabled=False):
            chunks = _Chunks(min(rows, len(u)), c, acc)
            for start in range(0, len(u), rows):
                chunk, t = u[start : start + rows], targets[start : start + rows]
                p = chunks.logits(chunk, t, bias_acc, cand_ids)
                p = p.sub_(lse[start : start + rows, None]).exp_()  # softmax over the candidates
                if pos is None:
                    p[:, 0] = 0.0
                    p.scatter_add_(1, t[:, None], p.new_full((len(t), 1), -1.0))  # − one-hot(target)
                p = p.mul_(scale)
                if chunks.product is not None:  # back to the product's dtype, in place of its buffer
                    p = chunks.product[: len(p)].copy_(p)
                torch.mm(p, c, out=grad_u[start : start + rows])
                if p.dtype == acc:
                    grad_c.addmm_(p.T, chunk)
                else:  # the autocast dtype: its product, accumulated in fp32
                    grad_c += (p.T @ chunk).to(acc)
        grad_pos = None
        if pos is not None:  # d/ds* of log(e^{s*} + Σ) − s* = softmax(s*) − 1
            grad_pos = ((pos - lse).exp() - 1.0).mul_(scale).to(pos_dtype)
        return grad_u.to(user_dtype), grad_c.to(cands_dtype), None, None, None, None, grad_pos


def _logsumexp_(logits: torch.Tensor) -> torch.Tensor:
    """``torch.logsumexp(logits, dim=1)`` computed in place (``logits`` is overwritten): no [rows, candidates]
    temporaries. A row of -inf only (every candidate masked) gives -inf, as ``torch.logsumexp`` does."""
    top = logits.amax(dim=1, keepdim=True)
    top.masked_fill_(top == float("-inf"), 0.0)  # exp(-inf - 0) = 0, and log(0) = -inf
    return logits.sub_(top).exp_().sum(dim=1).log_().add_(top.squeeze(1))


class _Chunks:
    """What every chunk of one pass (forward or backward) shares: the candidates transposed, [d, candidates]
    (a contiguous right factor multiplies faster), and one [rows, candidates] logits buffer.

    A fresh 16 MiB tensor per chunk costs more than its matrix product on a CPU: the allocator hands large
    blocks back to the OS and every chunk faults its pages in again (docs/benchmarks.md, `bench/loss.py`).
    ``product`` holds the matrix product where it runs in another dtype than the softmax (autocast)."""

    def __init__(self, rows: int, cands: torch.Tensor, acc: torch.dtype) -> None:
        self.c_t = cands.T.contiguous()
        shape = (rows, len(cands))
        self.buffer = torch.empty(shape, dtype=acc, device=cands.device)
        self.product = (
            None if cands.dtype == acc else torch.empty(shape, dtype=cands.dtype, device=cands.device)
        )

    def logits(
        self, u: torch.Tensor, t: torch.Tensor, bias: torch.Tensor | None, cand_ids: torch.Tensor | None
    ) -> torch.Tensor:
        """One chunk's [rows, candidates] logits in the softmax dtype: u · c (+ bias), accidental hits −inf.

        The result is a view of the pass's buffer: the next chunk's overwrites it."""
        n = len(u)
        if self.product is None:
            logits = torch.mm(u, self.c_t, out=self.buffer[:n])
        else:
            logits = self.buffer[:n].copy_(torch.mm(u, self.c_t, out=self.product[:n]))
        if bias is not None:
            logits += bias
        if cand_ids is not None:
            logits.masked_fill_(cand_ids[None, :] == t[:, None], float("-inf"))
        return logits


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
    chunk_elements: int | None = None,
) -> torch.Tensor:
    """Sampled softmax with logQ correction.

    user [N, d]; item_emb [num_items + 1, d]; targets [N]; log_q [num_items + 1] log-probabilities of the
    proposal (log_q[0] = -inf so padding is never drawn); ``num_samples`` negatives M, shared by all rows;
    ``chunk_elements`` as in `full_softmax_loss`.
    """
    probs = log_q.exp()
    negatives = torch.multinomial(probs, num_samples, replacement=True, generator=generator)  # [M]
    user_n = F.normalize(user, dim=-1) / temperature
    pos = (user_n * F.normalize(item_emb[targets], dim=-1)).sum(-1)  # [N]
    correction = -(log_q[negatives] + math.log(num_samples))  # -log(M·Q(x)) per negative
    rows = _rows_per_chunk(user.device, num_samples, chunk_elements)
    cands = F.normalize(item_emb[negatives], dim=-1)
    return _ChunkedSoftmaxLoss.apply(user_n, cands, targets, rows, correction, negatives, pos)
