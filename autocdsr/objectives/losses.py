"""The recommendation loss L_rec (Eq. 4): softmax over items of cosine(h*, Emb(x)) / temperature.

`full_softmax_loss` is Eq. 4 as written: every item is in the denominator, the padding item 0 never is.
`sampled_softmax_loss` is the opt-in alternative for item sets too large for a full softmax: one shared set
of negatives per batch drawn with replacement from a proposal Q, each corrected by -log(M·Q(x)) (logQ
correction), accidental hits of the target removed. The positive keeps its plain logit, which makes
e^{s*} + Σ_j e^{s_j} / (M·Q(x_j)) an unbiased estimate of the full denominator, so the loss tends to the
full softmax as M grows. Both return the mean over the target rows they are given.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cosine_logits(user: torch.Tensor, items: torch.Tensor, temperature: float) -> torch.Tensor:
    """r(x) of Eq. 4 for every (user row, item row) pair: cos(user, item) / temperature, [N, V]."""
    # dividing the [N, d] factor rather than the [N, V] product saves a pass over the logits
    return (F.normalize(user, dim=-1) / temperature) @ F.normalize(items, dim=-1).T


def full_softmax_loss(
    user: torch.Tensor, item_emb: torch.Tensor, targets: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Eq. 4: user [N, d], item_emb [num_items + 1, d] (row 0 = padding), targets [N] in 1..num_items."""
    logits = cosine_logits(user, item_emb, temperature)
    logits[:, 0] = float("-inf")  # padding is not an item
    return F.cross_entropy(logits, targets)


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
