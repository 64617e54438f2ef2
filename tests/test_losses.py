"""L_rec (Eq. 4): full softmax over cosine / temperature, and sampled softmax with logQ correction."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from autocdsr.objectives.losses import cosine_logits, full_softmax_loss, sampled_softmax_loss, sampling_log_q


def by_hand(user: torch.Tensor, items: torch.Tensor, targets: torch.Tensor, tau: float) -> float:
    """-log softmax of cosine / tau, items 1..N only, averaged over rows, with plain Python arithmetic."""

    def r(u, x):
        dot = sum(a * b for a, b in zip(u, x, strict=True))
        return dot / (math.sqrt(sum(a * a for a in u)) * math.sqrt(sum(b * b for b in x))) / tau

    total = 0.0
    for u, t in zip(user.tolist(), targets.tolist(), strict=True):
        logits = [r(u, x) for x in items.tolist()[1:]]
        total += -(logits[t - 1] - math.log(sum(math.exp(v) for v in logits)))
    return total / len(targets)


def test_full_softmax_matches_hand_computation():
    torch.manual_seed(0)
    user, items = torch.randn(4, 5), torch.randn(8, 5)
    targets = torch.tensor([1, 7, 3, 3])
    loss = full_softmax_loss(user, items, targets, temperature=0.2)
    assert loss.item() == pytest.approx(by_hand(user, items, targets, 0.2), rel=1e-5)


def test_padding_item_is_not_in_the_softmax():
    torch.manual_seed(1)
    user, items = torch.randn(3, 4), torch.randn(6, 4)
    targets = torch.tensor([2, 5, 1])
    before = full_softmax_loss(user, items, targets, 0.1)
    items[0] = user[0] * 10  # padding row perfectly aligned with a user: would dominate if it counted
    after = full_softmax_loss(user, items, targets, 0.1)
    torch.testing.assert_close(before, after)


def test_cosine_logits_ignore_vector_norms():
    torch.manual_seed(2)
    user, items = torch.randn(2, 3), torch.randn(4, 3)
    torch.testing.assert_close(cosine_logits(user * 7, items * 0.1, 0.5), cosine_logits(user, items, 0.5))
    assert cosine_logits(user, items, 0.5).abs().max() <= 2.0 + 1e-6


def test_sampled_softmax_matches_hand_computation_for_a_fixed_draw():
    torch.manual_seed(3)
    user, items = torch.randn(3, 4), torch.randn(7, 4)
    targets = torch.tensor([1, 4, 6])
    log_q = sampling_log_q(torch.tensor([0, 5, 1, 3, 9, 2, 4]))
    M, tau = 5, 0.3
    loss = sampled_softmax_loss(user, items, targets, tau, log_q, M, torch.Generator().manual_seed(9))
    negatives = torch.multinomial(
        log_q.exp(), M, replacement=True, generator=torch.Generator().manual_seed(9)
    )
    s = cosine_logits(user, items, tau)
    expected = 0.0
    for n, t in enumerate(targets.tolist()):
        terms = [math.exp(s[n, t])]
        terms += [math.exp(s[n, x] - math.log(M * math.exp(log_q[x]))) for x in negatives.tolist() if x != t]
        expected += -(s[n, t].item() - math.log(sum(terms)))
    assert loss.item() == pytest.approx(expected / 3, rel=1e-5)


@pytest.mark.parametrize("counts", [None, [0, 50, 1, 7, 200, 3, 12, 1, 30, 5, 90]])
def test_sampled_softmax_with_logq_approaches_full_softmax(counts):
    """With many samples the logQ-corrected estimate converges to Eq. 4, uniform or skewed proposal;
    without the correction a skewed proposal is visibly biased."""
    torch.manual_seed(4)
    user, items = torch.randn(6, 8), torch.randn(11, 8)
    targets = torch.tensor([1, 2, 3, 4, 9, 10])
    tau = 0.5
    log_q = sampling_log_q(torch.zeros(11) if counts is None else torch.tensor(counts, dtype=torch.float))
    full = full_softmax_loss(user, items, targets, tau).item()
    gen = torch.Generator().manual_seed(0)
    sampled = sampled_softmax_loss(user, items, targets, tau, log_q, 200_000, gen).item()
    assert sampled == pytest.approx(full, rel=5e-3)
    if counts is not None:  # the same draws corrected as if they were uniform: visibly biased
        assert abs(_uncorrected(user, items, targets, tau, log_q, 200_000) - full) > 0.05


def _uncorrected(user, items, targets, tau, log_q, M) -> float:
    """Sampled softmax from the skewed proposal with a uniform correction: what logQ fixes."""
    negatives = torch.multinomial(
        log_q.exp(), M, replacement=True, generator=torch.Generator().manual_seed(0)
    )
    s = cosine_logits(user, items, tau)
    pos = s.gather(1, targets[:, None])
    neg = s[:, negatives] - math.log(M / 10)
    neg = neg.masked_fill(negatives[None] == targets[:, None], float("-inf"))
    return (torch.logsumexp(torch.cat([pos, neg], 1), 1) - pos.squeeze(1)).mean().item()


def test_losses_are_differentiable_and_padding_is_never_sampled():
    torch.manual_seed(5)
    user = torch.randn(4, 3, requires_grad=True)
    items = torch.randn(9, 3, requires_grad=True)
    targets = torch.tensor([1, 2, 8, 8])
    log_q = sampling_log_q(torch.ones(9))
    assert log_q[0] == float("-inf")
    negatives = torch.multinomial(log_q.exp(), 10_000, replacement=True)
    assert (negatives != 0).all()
    loss = full_softmax_loss(user, items, targets, 0.1) + sampled_softmax_loss(
        user, items, targets, 0.1, log_q, 64
    )
    loss.backward()
    assert torch.isfinite(user.grad).all() and user.grad.abs().sum() > 0
    assert items.grad[0].abs().sum() == 0  # the padding row gets nothing


# ------------------------------------------------------------------------ chunked full softmax


def materialised(user: torch.Tensor, items: torch.Tensor, targets: torch.Tensor, tau: float) -> torch.Tensor:
    """Eq. 4 the direct way: the whole [rows, items] logit matrix, then cross-entropy."""
    logits = cosine_logits(user, items, tau)
    logits[:, 0] = float("-inf")
    return F.cross_entropy(logits, targets)


def loss_and_grads(fn, user, items, targets):
    u, x = user.clone().requires_grad_(), items.clone().requires_grad_()
    loss = fn(u, x, targets)
    loss.backward()
    return loss.detach(), u.grad, x.grad


@pytest.mark.parametrize("chunk_elements", [1, 7 * 11, 10**9])  # a row at a time, 7 rows (uneven), all
def test_chunked_full_softmax_equals_the_materialised_logits(chunk_elements):
    """Loss and both gradients equal the one-matrix computation whatever the chunking (float64, 1e-12)."""
    torch.manual_seed(6)
    user, items = torch.randn(23, 5, dtype=torch.float64), torch.randn(11, 5, dtype=torch.float64)
    targets = torch.randint(1, 11, (23,))
    targets[:3] = 10  # repeated targets: their item gradients add up
    got = loss_and_grads(
        lambda u, x, t: full_softmax_loss(u, x, t, 0.07, chunk_elements), user, items, targets
    )
    want = loss_and_grads(lambda u, x, t: materialised(u, x, t, 0.07), user, items, targets)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    assert got[2][0].abs().sum() == 0  # the padding row gets nothing


def test_chunked_full_softmax_gradcheck():
    torch.manual_seed(7)
    user = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    items = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([1, 5, 5, 2, 3])
    assert torch.autograd.gradcheck(lambda u, x: full_softmax_loss(u, x, targets, 0.3, 12), (user, items))


def test_chunked_full_softmax_backward_twice_with_retained_graph():
    """The Pareto solve step differentiates L_rec twice (shared parameters, then everything)."""
    torch.manual_seed(8)
    user, items = torch.randn(9, 4, requires_grad=True), torch.randn(7, 4, requires_grad=True)
    targets = torch.randint(1, 7, (9,))
    loss = full_softmax_loss(user, items, targets, 0.1, 8)
    (first,) = torch.autograd.grad(loss, [user], retain_graph=True)
    loss.backward()
    torch.testing.assert_close(user.grad, first)
    _, want_u, want_x = loss_and_grads(
        lambda u, x, t: materialised(u, x, t, 0.1), user.detach(), items.detach(), targets
    )
    torch.testing.assert_close(user.grad, want_u)
    torch.testing.assert_close(items.grad, want_x)


def test_chunked_full_softmax_without_rows_is_nan_with_zero_item_gradients():
    """As `F.cross_entropy`: a batch with no target rows has a NaN loss (the trainer's bad-batch check reads
    it) and leaves the item table's gradient finite (zero)."""
    user, items = torch.zeros(0, 4, requires_grad=True), torch.randn(5, 4, requires_grad=True)
    loss = full_softmax_loss(user, items, torch.zeros(0, dtype=torch.long), 0.1)
    assert math.isnan(loss.item())
    loss.backward()
    assert torch.equal(items.grad, torch.zeros_like(items))


def test_chunked_full_softmax_under_autocast_matches_autocast_reference():
    """Under bf16 autocast the products run in bf16 and the softmax in fp32, as autocast runs the direct
    computation: both agree to bf16 precision, and the gradients come back in the inputs' dtypes."""
    torch.manual_seed(9)
    user, items = torch.randn(40, 16), torch.randn(300, 16)
    targets = torch.randint(1, 300, (40,))
    with torch.autocast("cpu", torch.bfloat16):
        got = loss_and_grads(lambda u, x, t: full_softmax_loss(u, x, t, 0.05, 300 * 7), user, items, targets)
        want = loss_and_grads(lambda u, x, t: materialised(u, x, t, 0.05), user, items, targets)
    assert got[0].dtype == torch.float32 and got[1].dtype == got[2].dtype == torch.float32
    torch.testing.assert_close(got[0], want[0], rtol=1e-3, atol=1e-3)
    for g, w in zip(got[1:], want[1:], strict=True):
        torch.testing.assert_close(g, w, rtol=0.05, atol=0.02 * w.abs().max().item())


def sampled_materialised(user, items, targets, tau, log_q, negatives) -> torch.Tensor:
    """Sampled softmax with logQ correction the direct way, for given negatives: the whole [rows, M] matrix."""
    user_n = F.normalize(user, dim=-1) / tau
    pos = (user_n * F.normalize(items[targets], dim=-1)).sum(-1, keepdim=True)
    neg = user_n @ F.normalize(items[negatives], dim=-1).T - (log_q[negatives] + math.log(len(negatives)))
    neg = neg.masked_fill(negatives[None, :] == targets[:, None], float("-inf"))
    logits = torch.cat([pos, neg], dim=1)
    return (torch.logsumexp(logits, dim=1) - pos.squeeze(1)).mean()


@pytest.mark.parametrize("chunk_elements", [1, 40 * 5, 10**9])  # a row at a time, 5 rows (uneven), all
def test_chunked_sampled_softmax_equals_the_materialised_logits(chunk_elements):
    """Same draw (same generator), repeated negatives and accidental hits included: loss and gradients equal
    the one-matrix computation to 1e-12 in float64."""
    torch.manual_seed(10)
    user, items = torch.randn(17, 6, dtype=torch.float64), torch.randn(9, 6, dtype=torch.float64)
    targets = torch.randint(1, 9, (17,))
    log_q = sampling_log_q(torch.tensor([0, 40, 1, 3, 9, 2, 4, 20, 6])).double()
    negatives = torch.multinomial(
        log_q.exp(), 40, replacement=True, generator=torch.Generator().manual_seed(3)
    )
    assert (negatives[None, :] == targets[:, None]).any()  # accidental hits are exercised

    def chunked(u, x, t):
        gen = torch.Generator().manual_seed(3)
        return sampled_softmax_loss(u, x, t, 0.2, log_q, 40, gen, chunk_elements=chunk_elements)

    got = loss_and_grads(chunked, user, items, targets)
    want = loss_and_grads(
        lambda u, x, t: sampled_materialised(u, x, t, 0.2, log_q, negatives), user, items, targets
    )
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_chunked_sampled_softmax_gradcheck_and_no_rows():
    torch.manual_seed(11)
    user = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    items = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([1, 5, 5, 2])
    log_q = sampling_log_q(torch.ones(6)).double()

    def loss(u, x):
        return sampled_softmax_loss(u, x, targets, 0.3, log_q, 7, torch.Generator().manual_seed(1), 7 * 3)

    assert torch.autograd.gradcheck(loss, (user, items))
    empty = sampled_softmax_loss(torch.zeros(0, 3), torch.randn(6, 3), torch.zeros(0, dtype=torch.long), 0.3,
                                 log_q.float(), 7)  # fmt: skip
    assert math.isnan(empty.item())


def test_chunked_sampled_softmax_under_autocast_matches_autocast_reference():
    torch.manual_seed(12)
    user, items = torch.randn(40, 16), torch.randn(300, 16)
    targets = torch.randint(1, 300, (40,))
    log_q = sampling_log_q(torch.rand(300) * 10)
    negatives = torch.multinomial(
        log_q.exp(), 64, replacement=True, generator=torch.Generator().manual_seed(5)
    )
    with torch.autocast("cpu", torch.bfloat16):
        got = loss_and_grads(
            lambda u, x, t: sampled_softmax_loss(u, x, t, 0.05, log_q, 64, torch.Generator().manual_seed(5), 64 * 7),
            user, items, targets,
        )  # fmt: skip
        want = loss_and_grads(
            lambda u, x, t: sampled_materialised(u, x, t, 0.05, log_q, negatives), user, items, targets
        )
    assert got[0].dtype == torch.float32 and got[1].dtype == got[2].dtype == torch.float32
    torch.testing.assert_close(got[0], want[0], rtol=1e-3, atol=1e-3)
    for g, w in zip(got[1:], want[1:], strict=True):
        torch.testing.assert_close(g, w, rtol=0.05, atol=0.02 * w.abs().max().item())


@pytest.mark.parametrize("chunk_elements", [5, 10**9])
def test_sampled_softmax_row_whose_every_negative_is_its_target(chunk_elements):
    """A row all of whose drawn negatives are accidental hits has only the positive in its denominator:
    loss log(e^{s*}) − s* = 0 and no gradient, never NaN; the other rows are unaffected."""
    torch.manual_seed(13)
    user, items = torch.randn(3, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    counts = torch.tensor([0.0, 0.0, 7.0, 0.0, 0.0])  # the proposal draws item 2 only
    log_q = sampling_log_q(counts, smoothing=0.0).double()
    targets = torch.tensor([2, 2, 4])

    def loss(u, x, t):
        return sampled_softmax_loss(u, x, t, 0.5, log_q, 5, torch.Generator().manual_seed(0), chunk_elements)

    total, grad_user, _ = loss_and_grads(loss, user, items, targets)
    assert torch.isfinite(total) and torch.isfinite(grad_user).all()
    assert grad_user[:2].abs().max() == 0  # rows 0 and 1: every negative masked
    alone, *_ = loss_and_grads(loss, user[2:], items, targets[2:])
    torch.testing.assert_close(total, alone / 3)  # rows 0 and 1 add 0 to the sum
