"""LossBalancer: the update it writes into .grad, on one process and across two DDP ranks (gloo)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from autocdsr.objectives.balancer import BalancerConfig, LossBalancer
from autocdsr.objectives.pareto import LossReference, ParetoConfig, preference_vectors, solve
from tests.conftest import free_tcp_port, gloo_group

# The first solve of a run sees L̃ = (1, 1) (normalisation by the first losses): S = {p_2, p_3}, where the
# default (the paper's Eq. 11) always gives (α1, α2) = (0, 1). Tests that need both weights non-zero use the
# ParetoMTL hull, whose min-norm point mixes the two tasks on these problems.
MIXED_WEIGHTS = ParetoConfig(include_task_gradients=True)

N_ITEMS, DIM, LENGTH = 13, 6, 5


class Toy(nn.Module):
    """Embedding + one attention-like layer: a scalar L_rec and a differentiable a_cd-like scalar."""

    def __init__(self) -> None:
        super().__init__()
        self.item_embedding = nn.Embedding(N_ITEMS, DIM)
        self.query = nn.Linear(DIM, DIM)
        self.out = nn.Linear(DIM, DIM)

    def forward(
        self, items: torch.Tensor, domains: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.item_embedding(items)
        attention = torch.softmax(self.query(h) @ h.transpose(1, 2) / math.sqrt(DIM), dim=-1)
        cross = (domains[:, :, None] != domains[:, None, :]).to(h.dtype)
        a_cd = (attention * cross).sum(-1).mean()
        user = self.out(attention @ h)[:, -1]
        loss_rec = F.cross_entropy(user @ self.item_embedding.weight.T, targets)
        return loss_rec, a_cd


def make_model(seed: int = 0) -> Toy:
    torch.manual_seed(seed)
    return Toy().double()


def make_batch(seed: int, batch: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    items = torch.randint(0, N_ITEMS, (batch, LENGTH), generator=g)
    return items, items % 2, torch.randint(0, N_ITEMS, (batch,), generator=g)


def shared_of(model: nn.Module) -> list[torch.Tensor]:
    return [p for name, p in model.named_parameters() if not name.startswith("item_embedding")]


def task_grads(model: nn.Module, batch) -> tuple[list[torch.Tensor], list[torch.Tensor], float, float]:
    """∇L_rec and ∇a_cd for every parameter, each from its own forward: the reference computation."""
    params = list(model.parameters())
    loss_rec, _ = model(*batch)
    g_rec = torch.autograd.grad(loss_rec, params)
    _, a_cd = model(*batch)
    g_cd = torch.autograd.grad(a_cd, params, materialize_grads=True)  # `out` does not touch a_cd
    return list(g_rec), list(g_cd), loss_rec.item(), a_cd.item()


def expected_weights(
    model: nn.Module, g_rec, g_cd, losses, reference: LossReference, cfg: ParetoConfig, cd_tilt: float = 1.0
):
    """(α1, α2) from the Gram matrix of the shared (non-embedding) parts, computed independently; the a_cd
    reference divided by ``cd_tilt`` (tan θ_pref for normalisation='preference')."""
    shared_ids = {id(p) for p in shared_of(model)}
    keep = [i for i, p in enumerate(model.parameters()) if id(p) in shared_ids]
    a = torch.stack([torch.cat([g[i].reshape(-1) for i in keep]) for g in (g_rec, g_cd)])
    gram = (a @ a.T).tolist()
    reference.update(losses)
    r_rec, r_cd = reference.scale
    return solve(gram, losses, cfg, (r_rec, r_cd / cd_tilt))


def run_step(balancer: LossBalancer, model: nn.Module, batch, step: int):
    loss_rec, a_cd = model(*batch)
    return balancer.backward(loss_rec, a_cd, shared_of(model), list(model.parameters()), step)


def grads_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("include_task_gradients", [True, False])
def test_solve_step_gradient_is_alpha_combination(include_task_gradients):
    cfg = BalancerConfig(
        method="autocdsr", pareto=ParetoConfig(include_task_gradients=include_task_gradients)
    )
    model, batch = make_model(), make_batch(1)
    g_rec, g_cd, l_rec, l_cd = task_grads(model, batch)
    expected = expected_weights(model, g_rec, g_cd, (l_rec, l_cd), LossReference(steps=10), cfg.pareto)

    info = run_step(LossBalancer(cfg), model, batch, step=0)

    assert info.solved and info.pareto is not None
    assert (info.alpha1, info.alpha2) == pytest.approx((expected.alpha1, expected.alpha2), abs=1e-12)
    assert info.pareto.active_set == expected.active_set
    assert (info.loss_rec, info.a_cd) == pytest.approx((l_rec, l_cd))
    for p, gr, gc in zip(model.parameters(), g_rec, g_cd, strict=True):
        torch.testing.assert_close(p.grad, info.alpha1 * gr + info.alpha2 * gc, rtol=1e-10, atol=1e-12)
    # The embedding table gets the same combination (documented choice), and it is not trivially zero.
    assert model.item_embedding.weight.grad.abs().sum() > 0


def test_weights_are_not_trivial_on_this_problem():
    """Guard for the test above: both tasks get weight at some step, so the combination is really checked.

    On the ParetoMTL hull: under the default (Eq. 11) a first solve is always (0, 1) (`MIXED_WEIGHTS`), and the
    combination code the test checks is the same for both hulls.
    """
    cfg = BalancerConfig(method="autocdsr", pareto=MIXED_WEIGHTS)
    seen = []
    for seed in range(6):
        model = make_model(seed)
        info = run_step(LossBalancer(cfg), model, make_batch(seed), step=0)
        seen.append((info.alpha1, info.alpha2))
    assert any(0.0 < a1 < 1.0 for a1, _ in seen), seen


def test_stale_grad_is_never_read():
    cfg = BalancerConfig(method="autocdsr", update_every=2)
    results = []
    for garbage in (False, True):
        model, balancer = make_model(), LossBalancer(cfg)
        per_step = []
        for step in range(3):  # solve, reuse, solve
            if garbage:
                for p in model.parameters():
                    p.grad = torch.randn_like(p) * 1e3
            info = run_step(balancer, model, make_batch(10 + step), step)
            per_step.append(((info.alpha1, info.alpha2), grads_of(model)))
            with torch.no_grad():  # move the model so that later steps see new gradients
                for p in model.parameters():
                    p -= 0.1 * p.grad
        results.append(per_step)
    for (w_clean, g_clean), (w_garbage, g_garbage) in zip(*results, strict=True):
        assert w_clean == w_garbage
        for a, b in zip(g_clean, g_garbage, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_update_every_reuses_weights_with_one_backward():
    cfg = BalancerConfig(method="autocdsr", update_every=3, reuse="weights")
    model, balancer = make_model(), LossBalancer(cfg)
    passes = []

    # Count backward passes through the embedding lookup output, which both losses go through.
    def count_passes(_module, _inputs, out):
        out.register_hook(lambda _grad: passes.append(1))

    model.item_embedding.register_forward_hook(count_passes)
    infos = []
    for step in range(5):
        batch = make_batch(20 + step)
        g_rec, g_cd, _, _ = task_grads(model, batch)
        passes.clear()
        info = run_step(balancer, model, batch, step)
        infos.append((info, len(passes)))
        for p, gr, gc in zip(model.parameters(), g_rec, g_cd, strict=True):
            torch.testing.assert_close(p.grad, info.alpha1 * gr + info.alpha2 * gc, rtol=1e-10, atol=1e-12)
    assert [i.solved for i, _ in infos] == [True, False, False, True, False]
    assert [n for _, n in infos] == [2, 1, 1, 2, 1]  # backward passes: 2 on solve steps, 1 otherwise
    assert (infos[1][0].alpha1, infos[1][0].alpha2) == (infos[0][0].alpha1, infos[0][0].alpha2)
    assert (infos[2][0].alpha1, infos[2][0].alpha2) == (infos[0][0].alpha1, infos[0][0].alpha2)
    assert (infos[4][0].alpha1, infos[4][0].alpha2) == (infos[3][0].alpha1, infos[3][0].alpha2)
    assert all(math.isfinite(i.a_cd) and i.a_cd > 0 for i, _ in infos)  # a_cd reported every step
    assert {"alpha1", "alpha2", "a_cd", "loss_rec", "pareto/iterations"} <= infos[0][0].as_metrics().keys()
    assert "pareto/iterations" not in infos[1][0].as_metrics()


@pytest.mark.parametrize("reuse", ["weights", "gram"])
def test_start_after_trains_on_l_rec_alone_then_solves_with_fresh_references(reuse):
    cfg = BalancerConfig(method="autocdsr", update_every=3, start_after=4, reuse=reuse)
    model, balancer = make_model(), LossBalancer(cfg)
    infos = []
    for step in range(1, 8):
        batch = make_batch(40 + step)
        g_rec, _, _, _ = task_grads(model, batch)
        info = run_step(balancer, model, batch, step)
        infos.append(info)
        if step <= 4:  # plain L_rec: exactly its gradient, nothing from a_cd
            for p, gr in zip(model.parameters(), g_rec, strict=True):
                torch.testing.assert_close(p.grad, gr, rtol=1e-10, atol=1e-12)
    assert [i.solved for i in infos] == [False] * 4 + [True, True, False]  # first solve at 5, then 6 % 3
    assert all((i.alpha1, i.alpha2) == (1.0, 0.0) for i in infos[:4])
    assert math.isfinite(infos[0].a_cd)  # a_cd is still reported before solving starts
    # the loss references come from the solves after the start (step 5 on), not from steps 1-4; "gram" also
    # solves (from the kept Gram matrix) at step 7, so its losses join the references too
    n = 2 if reuse == "weights" else 3
    assert balancer.reference.state_dict()["counts"] == [n, n]
    # the held-out gate changed what a_cd counts: its reference is taken again, L_rec's goes on (10 solves)
    r_rec = balancer.reference.scale[0]
    balancer.restart_cd_reference()
    assert balancer.reference.state_dict()["counts"] == [n, 0] and balancer.reference.scale == (r_rec, 1.0)
    run_step(balancer, model, make_batch(60), 9)  # a solve step (9 % 3 == 0)
    assert balancer.reference.state_dict()["counts"] == [n + 1, 1]
    with pytest.raises(ValueError, match="start_after"):
        BalancerConfig(method="autocdsr", start_after=-1)


def test_start_after_warmup_is_the_lr_warmup_of_the_training_config():
    from autocdsr.config import ConfigError, load_train_config

    cfg = load_train_config(
        None, ["method=cd+autocdsr", "autocdsr.start_after=warmup", "train.warmup_steps=37"]
    )
    assert cfg.autocdsr.start_after == "warmup" and cfg.balancer.start_after == 37
    balancer = LossBalancer(cfg.balancer)
    assert not balancer.is_solve_step(37) and balancer.is_solve_step(38)
    assert load_train_config(None, ["method=cd+autocdsr", "autocdsr.start_after=5"]).balancer.start_after == 5
    with pytest.raises(ConfigError, match="never solve"):  # a run that would silently be `cd`
        load_train_config(None, ["method=cd+autocdsr", "autocdsr.start_after=warmup", "train.max_steps=900"])
    with pytest.raises(ValueError, match="resolved"):  # the balancer alone does not know the warm-up
        LossBalancer(BalancerConfig(method="autocdsr", start_after="warmup"))
    with pytest.raises(ValueError, match="start_after"):
        BalancerConfig(method="autocdsr", start_after="later")  # type: ignore[arg-type]


def test_fixed_and_cd_methods():
    batch = make_batch(3)
    model = make_model()
    g_rec, g_cd, _, l_cd = task_grads(model, batch)

    info = run_step(LossBalancer(BalancerConfig(method="fixed", fixed_weight=0.3)), model, batch, step=0)
    assert (info.alpha1, info.alpha2, info.solved) == (1.0, 0.3, False)
    for p, gr, gc in zip(model.parameters(), g_rec, g_cd, strict=True):
        torch.testing.assert_close(p.grad, gr + 0.3 * gc, rtol=1e-10, atol=1e-12)

    info = run_step(LossBalancer(BalancerConfig(method="cd")), model, batch, step=0)
    assert (info.alpha1, info.alpha2) == (1.0, 0.0)
    assert info.a_cd == pytest.approx(l_cd)  # still reported for logging
    for p, gr in zip(model.parameters(), g_rec, strict=True):
        torch.testing.assert_close(p.grad, gr, rtol=1e-10, atol=1e-12)


def test_non_finite_solve_step_keeps_weights_and_exposes_nan():
    cfg = BalancerConfig(method="autocdsr", update_every=1)
    model, balancer = make_model(), LossBalancer(cfg)
    first = run_step(balancer, model, make_batch(1), step=0)
    loss_rec, a_cd = model(*make_batch(2))
    info = balancer.backward(loss_rec * math.nan, a_cd, shared_of(model), list(model.parameters()), step=1)
    assert not info.solved and info.pareto is None
    assert (info.alpha1, info.alpha2) == (first.alpha1, first.alpha2) == balancer.weights
    assert math.isnan(info.loss_rec)
    assert not all(torch.isfinite(p.grad).all() for p in model.parameters())  # the trainer's check sees it


def test_reuse_gram_solves_every_step_from_the_last_gram_matrix():
    """reuse="gram": between two solve steps the weights are Eq. 9-12 on the last solve's Gram matrix and this
    step's losses (which also join the loss references), with one backward pass; "weights" holds them."""
    cfg = BalancerConfig(method="autocdsr", update_every=3, reuse="gram", normalisation="preference")
    x, y = preference_vectors(cfg.pareto.K)[cfg.pareto.preference_index]
    model, balancer = make_model(), LossBalancer(cfg)
    held = LossBalancer(dataclasses.replace(cfg, reuse="weights"))
    held_model = make_model()
    passes = []

    def count_passes(_module, _inputs, out):  # backward passes through the lookup, which both losses reach
        out.register_hook(lambda _grad: passes.append(1))

    model.item_embedding.register_forward_hook(count_passes)
    reference, last = LossReference(steps=cfg.normalisation_steps), None
    infos, held_infos = [], []
    for step in range(6):
        batch = make_batch(20 + step)
        g_rec, g_cd, l_rec, l_cd = task_grads(model, batch)
        if step % 3 == 0:
            last = (g_rec, g_cd)  # a solve step: the Gram matrix comes from this step's gradients
        expected = expected_weights(model, *last, (l_rec, l_cd), reference, cfg.pareto, cd_tilt=y / x)
        passes.clear()
        info = run_step(balancer, model, batch, step)
        held_info = run_step(held, held_model, batch, step)
        infos.append(info)
        assert len(passes) == (2 if step % 3 == 0 else 1)
        assert info.solved == (step % 3 == 0) and info.pareto is not None
        assert (info.alpha1, info.alpha2) == pytest.approx((expected.alpha1, expected.alpha2), abs=1e-12)
        assert info.pareto.active_set == expected.active_set
        for p, gr, gc in zip(model.parameters(), g_rec, g_cd, strict=True):
            torch.testing.assert_close(p.grad, info.alpha1 * gr + info.alpha2 * gc, rtol=1e-10, atol=1e-12)
        held_infos.append(held_info)
        if step % 3:  # "weights" holds its last solve's weights
            solved = held_infos[step - step % 3]
            assert held_info.pareto is None and (held_info.alpha1, held_info.alpha2) == (
                solved.alpha1,
                solved.alpha2,
            )
        with torch.no_grad():  # the same update for both, so that they see the same losses
            for p, q in zip(model.parameters(), held_model.parameters(), strict=True):
                p -= 0.5 * p.grad
                q.copy_(p)
    # Guard: the losses moved the active set between solve steps, so re-solving really changed the weights.
    assert infos[1].pareto.active_set != infos[0].pareto.active_set
    assert (infos[1].alpha1, infos[1].alpha2) != (infos[0].alpha1, infos[0].alpha2)
    assert balancer.reference.state_dict()["counts"] == [6, 6]  # every step's losses, from the first solve
    assert "pareto/normalised_alpha2" in infos[1].as_metrics()

    # Resume: the kept Gram matrix travels with the state, so the next reuse step solves the same problem.
    resumed = LossBalancer(cfg)
    resumed.load_state_dict(balancer.state_dict())
    twin = make_model()
    twin.load_state_dict(model.state_dict())
    a, b = run_step(balancer, model, make_batch(40), 7), run_step(resumed, twin, make_batch(40), 7)
    assert not a.solved and (a.alpha1, a.alpha2) == (b.alpha1, b.alpha2)
    # A checkpoint from before `reuse` (no "gram"): weights are held until the next solve step.
    old = {k: v for k, v in balancer.state_dict().items() if k != "gram"}
    resumed = LossBalancer(cfg)
    resumed.load_state_dict(old)
    info = run_step(resumed, twin, make_batch(41), 7)
    assert info.pareto is None and (info.alpha1, info.alpha2) == balancer.weights
    # The gate's restart of a_cd's reference drops the Gram matrix of the old a_cd.
    balancer.restart_cd_reference()
    assert run_step(balancer, model, make_batch(42), 8).pareto is None
    with pytest.raises(ValueError, match="reuse"):
        BalancerConfig(method="autocdsr", reuse="alpha")  # type: ignore[arg-type]


def test_state_dict_resumes_weights_and_schedule():
    cfg = BalancerConfig(method="autocdsr", update_every=4)
    model, balancer = make_model(), LossBalancer(cfg)
    first = run_step(balancer, model, make_batch(5), step=0)
    resumed = LossBalancer(cfg)
    assert resumed.is_solve_step(2)  # no weights yet: the first call always solves
    resumed.load_state_dict(balancer.state_dict())
    assert not resumed.is_solve_step(2) and resumed.is_solve_step(4)
    assert resumed.weights == (first.alpha1, first.alpha2)
    assert resumed.reference.scale == balancer.reference.scale


class NoisyLinear(nn.Module):
    """L_rec = 2 + θ·(μ + ξ) with fresh noise ξ per forward (tr Σ = 20‖μ‖²), a_cd = 0.8 + θ·c (noise-free),
    at θ = 0: the losses sit inside p_1's band (a_cd / L_rec = 0.4), where Eq. 9 is plain MGDA."""

    def __init__(self, dim: int = 4000, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.theta = nn.Parameter(torch.zeros(dim, dtype=torch.float64))
        self.mu = torch.randn(dim, generator=g, dtype=torch.float64) / dim**0.5  # ‖μ‖ ≈ 1
        c = torch.randn(dim, generator=g, dtype=torch.float64)
        c -= (c @ self.mu) / (self.mu @ self.mu) * self.mu  # orthogonal to μ ...
        self.c = c * (self.mu.norm() / c.norm())  # ... and as long: the noise-free answer is α2 = 0.5
        self.noise = torch.Generator().manual_seed(seed + 1)
        self.sigma = (20.0 / dim) ** 0.5 * float(self.mu.norm())

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        xi = torch.randn(self.theta.shape, generator=self.noise, dtype=torch.float64) * self.sigma
        return 2.0 + self.theta @ (self.mu + xi), 0.8 + self.theta @ self.c


def run_noisy(balancer: LossBalancer, model: NoisyLinear, steps: range) -> list:
    infos = []
    for step in steps:
        loss_rec, a_cd = model()
        infos.append(balancer.backward(loss_rec, a_cd, [model.theta], [model.theta], step))
    return infos


def test_noise_correction_recovers_the_weights_of_the_expected_gradients():
    cfg = BalancerConfig(method="autocdsr", update_every=1, normalisation="none")
    model = NoisyLinear()
    true = solve(
        [
            [float(model.mu @ model.mu), float(model.mu @ model.c)],
            [float(model.c @ model.mu), float(model.c @ model.c)],
        ],
        (2.0, 0.8),
        cfg.pareto,
    )
    assert true.active_set == () and true.alpha2 == pytest.approx(0.5, abs=1e-6)  # in the band: plain MGDA

    plain = run_noisy(LossBalancer(cfg), model, range(40))
    # The paper's rule on minibatch gradients: ‖g_rec‖² ≈ 21‖μ‖², so a_cd gets α2 ≈ 21/22.
    assert min(i.alpha2 for i in plain[5:]) > 0.9 and plain[-1].noise_share is None

    balancer = LossBalancer(dataclasses.replace(cfg, noise_correction=True))
    corrected = run_noisy(balancer, model, range(40))
    assert corrected[0].noise_share is None and corrected[0].alpha2 > 0.9  # nothing to estimate from yet
    late = corrected[20:]
    assert all(abs(i.alpha2 - 0.5) < 0.12 for i in late), [round(i.alpha2, 3) for i in late]
    assert all(i.noise_share[0] == pytest.approx(20 / 21, abs=0.03) for i in late)
    assert all(i.noise_share[1] < 1e-12 for i in late)  # a_cd's gradient does not change: no noise
    metrics = late[-1].as_metrics()
    assert metrics["pareto/noise_share_rec"] == late[-1].noise_share[0]
    # The update is still α1·g_rec + α2·g_cd of this batch's gradients (the correction only moves α).
    model.noise.manual_seed(999)
    loss_rec, a_cd = model()
    info = balancer.backward(loss_rec, a_cd, [model.theta], [model.theta], 40)
    model.noise.manual_seed(999)
    xi = torch.randn(model.theta.shape, generator=model.noise, dtype=torch.float64) * model.sigma
    torch.testing.assert_close(model.theta.grad, info.alpha1 * (model.mu + xi) + info.alpha2 * model.c)


def test_noise_correction_state_resumes_exactly():
    cfg = BalancerConfig(method="autocdsr", update_every=2, normalisation="none", noise_correction=True)
    straight, model_a = LossBalancer(cfg), NoisyLinear(dim=500, seed=3)
    first = run_noisy(straight, model_a, range(8))
    resumed = LossBalancer(cfg)
    resumed.load_state_dict(straight.state_dict())
    model_b = NoisyLinear(dim=500, seed=3)
    model_b.noise.set_state(model_a.noise.get_state())
    after_a, after_b = run_noisy(straight, model_a, range(8, 14)), run_noisy(resumed, model_b, range(8, 14))
    assert first[-2].noise_share is not None
    assert [(i.alpha1, i.alpha2, i.noise_share) for i in after_a] == [
        (i.alpha1, i.alpha2, i.noise_share) for i in after_b
    ]
    with pytest.raises(ValueError, match="noise_decay"):
        BalancerConfig(method="autocdsr", noise_correction=True, noise_decay=1.0)


@pytest.mark.parametrize("preference_index", [1, 2, 3])
def test_preference_normalisation_starts_on_the_preference_vector(preference_index):
    """normalisation='preference': the first solve sees L̃ along p_pref, so Eq. 10's set is empty (MGDA of the
    two tasks, both weights free), where 'initial' sees (1, 1); later solves use r_cd / tan θ_pref."""
    pareto = ParetoConfig(preference_index=preference_index)
    cfg = BalancerConfig(method="autocdsr", normalisation="preference", update_every=1, pareto=pareto)
    model, balancer = make_model(), LossBalancer(cfg)
    theta = preference_index * math.pi / 8
    reference = LossReference(steps=cfg.normalisation_steps)
    for step in range(3):
        batch = make_batch(60 + step)
        g_rec, g_cd, l_rec, l_cd = task_grads(model, batch)
        info = run_step(balancer, model, batch, step)
        if step == 0:
            l_tilde = info.pareto.normalised_losses
            assert l_tilde[1] / l_tilde[0] == pytest.approx(math.tan(theta), rel=1e-12)
            assert info.pareto.active_set == () and info.pareto.case.startswith("eq9")
        # every solve: the solver's answer for references (r_rec, r_cd / tan θ_pref), computed independently
        expected = expected_weights(model, g_rec, g_cd, (l_rec, l_cd), reference, pareto, math.tan(theta))
        assert (info.alpha1, info.alpha2) == pytest.approx((expected.alpha1, expected.alpha2), abs=1e-10)
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.05 * p.grad
    for index in (0, 4):  # on an axis there is no direction to start on
        with pytest.raises(ValueError, match="strictly between the axes"):
            BalancerConfig(normalisation="preference", pareto=ParetoConfig(preference_index=index))


def test_bad_parameter_sets_are_errors():
    model = make_model()
    loss_rec, a_cd = model(*make_batch(0))
    balancer = LossBalancer(BalancerConfig(method="autocdsr"))
    with pytest.raises(ValueError, match="shared_params"):
        balancer.backward(loss_rec, a_cd, shared_of(model), [model.item_embedding.weight], step=0)
    with pytest.raises(ValueError, match="needs a_cd"):
        balancer.backward(loss_rec, None, shared_of(model), list(model.parameters()), step=0)


# ----------------------------------------------------------------------------------------------- DDP


def _ddp_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    with gloo_group(rank, world_size, port):
        model = make_model()  # same seed: identical initial weights on both ranks
        ddp = nn.parallel.DistributedDataParallel(model)
        cfg = BalancerConfig(method="autocdsr", update_every=2, reuse="weights", pareto=MIXED_WEIGHTS)
        balancer = LossBalancer(cfg)
        records = []
        for step in range(3):  # solve (no_sync + own all-reduce), reuse (DDP's all-reduce), solve
            batch = make_batch(100 * step + rank)  # different local batch on every rank
            with balancer.sync_context(ddp, step):
                loss_rec, a_cd = ddp(*batch)
                info = balancer.backward(loss_rec, a_cd, shared_of(model), list(model.parameters()), step)
            records.append(
                {"alpha": (info.alpha1, info.alpha2), "solved": info.solved, "grads": grads_of(model)}
            )
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.1 * p.grad
        # The noise correction (its estimate comes from the rank-averaged gradients): same weights everywhere.
        model = make_model(1)
        ddp = nn.parallel.DistributedDataParallel(model)
        cfg = BalancerConfig(method="autocdsr", update_every=1, pareto=MIXED_WEIGHTS, noise_correction=True)
        balancer = LossBalancer(cfg)
        for step in range(4):
            with balancer.sync_context(ddp, step):
                loss_rec, a_cd = ddp(*make_batch(100 * step + rank))
                info = balancer.backward(loss_rec, a_cd, shared_of(model), list(model.parameters()), step)
            records.append({"noisy": (info.alpha1, info.alpha2, info.noise_share), "grads": grads_of(model)})
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.1 * p.grad
        # reuse="gram": reuse steps solve from the losses' mean over ranks, so the weights stay identical.
        model = make_model(2)
        ddp = nn.parallel.DistributedDataParallel(model)
        cfg = BalancerConfig(method="autocdsr", update_every=3, reuse="gram", normalisation="preference")
        balancer = LossBalancer(cfg)
        for step in range(4):
            with balancer.sync_context(ddp, step):
                loss_rec, a_cd = ddp(*make_batch(300 + 100 * step + rank))
                info = balancer.backward(loss_rec, a_cd, shared_of(model), list(model.parameters()), step)
            assert info.pareto is not None
            records.append(
                {"gram": (info.alpha1, info.alpha2, info.pareto.normalised_losses), "grads": grads_of(model)}
            )
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.5 * p.grad
        torch.save(records, Path(out_dir) / f"rank{rank}.pt")


def test_ddp_ranks_get_identical_weights_and_gradients(tmp_path):
    world_size = 2
    mp.spawn(_ddp_worker, args=(world_size, free_tcp_port(), str(tmp_path)), nprocs=world_size, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world_size)]

    # Reference on one process: the mean over ranks of each task gradient, as DDP averages.
    cfg = BalancerConfig(method="autocdsr", update_every=2, reuse="weights", pareto=MIXED_WEIGHTS)
    model, reference = make_model(), LossReference(steps=cfg.normalisation_steps)
    alpha = None
    for step in range(3):
        per_rank = [task_grads(model, make_batch(100 * step + r)) for r in range(world_size)]
        g_rec = [sum(g) / world_size for g in zip(*(pr[0] for pr in per_rank), strict=True)]
        g_cd = [sum(g) / world_size for g in zip(*(pr[1] for pr in per_rank), strict=True)]
        if step % 2 == 0:
            losses = (sum(pr[2] for pr in per_rank) / world_size, sum(pr[3] for pr in per_rank) / world_size)
            solved = expected_weights(model, g_rec, g_cd, losses, reference, cfg.pareto)
            alpha = (solved.alpha1, solved.alpha2)
        expected = [alpha[0] * gr + alpha[1] * gc for gr, gc in zip(g_rec, g_cd, strict=True)]

        r0, r1 = ranks[0][step], ranks[1][step]
        assert r0["solved"] == r1["solved"] == (step % 2 == 0)
        assert r0["alpha"] == r1["alpha"]  # bitwise identical weights on both ranks
        assert r0["alpha"] == pytest.approx(alpha, abs=1e-12)
        for a, b, e in zip(r0["grads"], r1["grads"], expected, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)  # identical final gradients
            torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-12)
        with torch.no_grad():
            for p, g in zip(model.parameters(), r0["grads"], strict=True):
                p -= 0.1 * g
    assert ranks[0][0]["alpha"] != ranks[0][2]["alpha"]  # the second solve really re-solved
    noisy = [[r["noisy"] for r in ranks[k][3:7]] for k in range(world_size)]
    assert noisy[0] == noisy[1] and noisy[0][0][2] is None and all(n[2] is not None for n in noisy[0][1:])
    gram = [[r["gram"] for r in ranks[k][7:]] for k in range(world_size)]
    assert gram[0] == gram[1]  # same losses (cross-rank mean) and weights on both ranks, every step
    assert len({g[2] for g in gram[0]}) == 4  # each reuse step solved on its own losses
    for a, b in zip(ranks[0][3:], ranks[1][3:], strict=True):
        for ga, gb in zip(a["grads"], b["grads"], strict=True):
            torch.testing.assert_close(ga, gb, rtol=0, atol=0)
