"""The Pareto solver (Eq. 8-12) against explicit vectors and a brute-force QP."""

from __future__ import annotations

import dataclasses
import math
import time

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize

from autocdsr.objectives.pareto import (
    LossReference,
    ParetoConfig,
    active_set,
    frank_wolfe,
    free_band,
    min_norm_exact,
    min_norm_segment,
    preference_vectors,
    solve,
)


def gram(g_rec: np.ndarray, g_cd: np.ndarray) -> list[list[float]]:
    a = np.stack([g_rec, g_cd])
    return (a @ a.T).tolist()


def losses_at(angle_deg: float) -> tuple[float, float]:
    """A loss vector pointing at `angle_deg` (0° = all L_rec, 90° = all a_cd)."""
    return math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))


def vertex_vectors(
    g_rec: np.ndarray, g_cd: np.ndarray, active: tuple[int, ...], cfg: ParetoConfig
) -> np.ndarray:
    """The hull's vertices as explicit vectors: task gradients and/or ∇(p_k − p_pref)ᵀL (Eq. 11)."""
    p = np.array(preference_vectors(cfg.K))
    rows = []
    if not active or cfg.include_task_gradients:
        rows += [g_rec, g_cd]
    rows += [
        (p[k, 0] - p[cfg.preference_index, 0]) * g_rec + (p[k, 1] - p[cfg.preference_index, 1]) * g_cd
        for k in active
    ]
    return np.array(rows)


def brute_force_min_norm(vertices: np.ndarray) -> tuple[np.ndarray, float]:
    """min ‖βᵀV‖² over the simplex with a general-purpose QP solver (SLSQP), best of several starts."""
    m = len(vertices)
    unit = vertices / np.sqrt(np.max(np.sum(vertices**2, axis=1)))  # objective O(1) for the tolerances
    best = None
    for start in [np.full(m, 1.0 / m), *np.eye(m)]:
        res = minimize(
            lambda b: float(np.sum((b @ unit) ** 2)),
            start,
            jac=lambda b: 2.0 * unit @ (b @ unit),
            bounds=[(0.0, 1.0)] * m,
            constraints=[{"type": "eq", "fun": lambda b: b.sum() - 1.0, "jac": lambda b: np.ones(m)}],
            method="SLSQP",
            options={"ftol": 1e-13, "maxiter": 1000},
        )
        if best is None or res.fun < best.fun:
            best = res
    point = np.clip(best.x, 0.0, None) / np.clip(best.x, 0.0, None).sum() @ vertices
    return point, float(point @ point)


# ---------------------------------------------------------------------------------------------- Eq. 10


def test_preference_vectors_are_unit_and_span_the_quadrant():
    p = np.array(preference_vectors(4))
    assert p.shape == (5, 2)
    np.testing.assert_allclose(np.linalg.norm(p, axis=1), 1.0)
    assert tuple(p[0]) == (1.0, 0.0) and tuple(p[-1]) == (0.0, 1.0)
    np.testing.assert_allclose(p[1], [math.cos(math.pi / 8), math.sin(math.pi / 8)])
    with pytest.raises(ValueError, match="K must be"):
        preference_vectors(0)


@pytest.mark.parametrize(
    ("angle", "expected"),
    [
        (45.0, (2, 3)),  # normalised losses equal: p_2 aligned, p_3 exactly as far as p_1 (tie counts, ≥)
        (22.5, ()),  # L̃ on p_1: nothing aligns better
        (30.0, ()),  # inside the free band (11.25°, 33.75°)
        (35.0, (2,)),
        (80.0, (2, 3, 4)),
        (5.0, (0,)),
        (0.0, (0,)),
    ],
)
def test_active_set_known_angles(angle, expected):
    assert active_set(losses_at(angle), K=4, preference_index=1) == expected


@settings(max_examples=200, deadline=None)
@given(
    l_rec=st.floats(0.0, 100.0),
    l_cd=st.floats(0.0, 100.0),
    K=st.integers(1, 12),
    data=st.data(),
)
def test_active_set_matches_eq10(l_rec, l_cd, K, data):
    pref = data.draw(st.integers(0, K))
    p = np.array([(math.cos(k * math.pi / (2 * K)), math.sin(k * math.pi / (2 * K))) for k in range(K + 1)])
    margin = (p - p[pref]) @ np.array([l_rec, l_cd])
    got = set(active_set((l_rec, l_cd), K, pref))
    assert pref not in got  # its constraint is identically zero
    for k in range(K + 1):
        if k != pref and abs(margin[k]) > 1e-9 * (l_rec + l_cd + 1e-300):
            assert (k in got) == (margin[k] > 0), (k, margin[k])


def test_free_band_k4_p1_is_the_documented_band():
    lo, hi = free_band(4, 1)
    assert lo == pytest.approx(math.tan(math.radians(11.25))) and hi == pytest.approx(
        math.tan(math.radians(33.75))
    )
    assert free_band(4, 0)[0] == 0.0 and free_band(4, 4)[1] == math.inf
    with pytest.raises(ValueError, match="preference_index"):
        free_band(4, 5)
    with pytest.raises(ValueError, match="K must be >= 1"):
        free_band(0, 0)


@settings(max_examples=300, deadline=None)
@given(ratio=st.floats(0.0, 50.0), K=st.integers(1, 12), data=st.data())
def test_free_band_is_where_the_active_set_is_empty(ratio, K, data):
    pref = data.draw(st.integers(0, K))
    lo, hi = free_band(K, pref)
    assume(min(abs(ratio - lo), abs(ratio - hi)) > 1e-9)  # the boundaries themselves are rounding-dependent
    inside = ratio < hi and (pref == 0 or ratio > lo)
    assert (active_set((1.0, ratio), K, pref) == ()) == inside


AUTHORS_RULE = ParetoConfig(K=2, preference_index=2, gradient_normalisation="l2", include_task_gradients=True,
                            allow_negative_weights=True, apply_basis_weights=True)  # fmt: skip


@pytest.mark.parametrize(("cosine", "ratio"), [(-0.5, 4 / 5), (0.0, 1 / 2), (0.3, 4 / 17), (0.6, -1 / 7)])
@pytest.mark.parametrize(("norm_rec", "norm_cd"), [(50.0, 0.2), (1.0, 1.0), (0.01, 3.0)])
def test_authors_rule_is_a_weak_adaptive_a_cd_weight(cosine, ratio, norm_rec, norm_cd):
    """The rule of the authors' public code on raw losses (L_rec ≫ a_cd): the weight on a_cd relative to L_rec
    depends only on the angle between the gradients (0.8 / 0.5 / 0.24 / −0.14, the figures docs/results.md
    got with scipy), not on their lengths; the default maps the same point back to a different weight."""
    gram = [[norm_rec**2, cosine * norm_rec * norm_cd], [cosine * norm_rec * norm_cd, norm_cd**2]]
    result = solve(gram, (15.0, 0.3), AUTHORS_RULE)
    assert result.active_set == (0, 1)  # both other constraints, always (raw L points almost along L_rec)
    assert result.alpha2 / result.alpha1 == pytest.approx(ratio, rel=1e-9)
    assert abs(result.alpha1) + abs(result.alpha2) == pytest.approx(1.0)
    exact = solve(gram, (15.0, 0.3), dataclasses.replace(AUTHORS_RULE, apply_basis_weights=False))
    # realised exactly on the raw gradients the same direction weighs a_cd by ratio · ‖g_rec‖ / ‖g_cd‖
    assert exact.alpha2 / exact.alpha1 == pytest.approx(ratio * norm_rec / norm_cd, rel=1e-6, abs=1e-9)


# ----------------------------------------------------------------------------------------------- Eq. 9


def test_eq9_interior_closed_form():
    g_rec, g_cd = np.array([1.0, 0.0, 0.5]), np.array([-0.2, 1.0, 0.0])
    G = gram(g_rec, g_cd)
    gamma, case = min_norm_segment(G[0][0], G[0][1], G[1][1])
    assert case == "eq9"
    diff = g_cd - g_rec
    assert gamma == pytest.approx(g_cd @ diff / (diff @ diff))  # Eq. 9 with the squared norm
    point = gamma * g_rec + (1 - gamma) * g_cd
    assert point @ (g_rec - g_cd) == pytest.approx(0.0, abs=1e-12)  # perpendicular to the hull
    # Through `solve`, with L on p_1 so that S is empty and Eq. 9 is the answer.
    result = solve(G, losses_at(22.5))
    assert result.active_set == () and result.case == "eq9"
    assert (result.alpha1, result.alpha2) == pytest.approx((gamma, 1 - gamma))


def test_eq9_corner_rec():
    # g_rec short and along g_cd: g_recᵀg_cd ≥ ‖g_rec‖², the min-norm point is g_rec itself.
    g_rec, g_cd = np.array([0.5, 0.1]), np.array([2.0, 0.3])
    G = gram(g_rec, g_cd)
    assert G[0][1] >= G[0][0]
    assert min_norm_segment(G[0][0], G[0][1], G[1][1]) == (1.0, "eq9_corner")
    result = solve(G, losses_at(22.5))
    assert (result.alpha1, result.alpha2) == (1.0, 0.0)
    assert result.min_norm_sq == pytest.approx(g_rec @ g_rec)


def test_eq9_corner_cd():
    g_rec, g_cd = np.array([3.0, -1.0]), np.array([0.4, 0.0])
    G = gram(g_rec, g_cd)
    assert G[0][1] >= G[1][1]
    assert min_norm_segment(G[0][0], G[0][1], G[1][1]) == (0.0, "eq9_corner")
    result = solve(G, losses_at(22.5))
    assert (result.alpha1, result.alpha2) == (0.0, 1.0)
    assert result.min_norm_sq == pytest.approx(g_cd @ g_cd)


# --------------------------------------------------------------------------------- Eq. 11 brute force


@pytest.mark.parametrize("include_task_gradients", [True, False])
@pytest.mark.parametrize("solver", ["exact", "frank_wolfe"])
def test_min_norm_point_matches_brute_force_qp(include_task_gradients, solver):
    rng = np.random.default_rng(7)
    cfg = ParetoConfig(include_task_gradients=include_task_gradients, solver=solver, max_iter=5000, tol=1e-10)
    cases_seen = set()
    for trial in range(60):
        g_rec = rng.normal(size=7) * rng.lognormal()
        g_cd = rng.normal(size=7) * rng.lognormal()
        if trial % 3 == 0:  # strongly (anti-)correlated gradients: ill-conditioned G
            if solver == "frank_wolfe":
                continue  # Frank-Wolfe needs thousands of iterations there (see `frank_wolfe`)
            g_cd = g_cd * 0.2 + rng.normal() * g_rec
        losses = (rng.lognormal(1.0), rng.lognormal(-1.5))
        scale = (rng.lognormal(1.0), rng.lognormal(-1.5))
        result = solve(gram(g_rec, g_cd), losses, cfg, scale=scale)
        cases_seen.add(result.case)
        # The problem lives on normalised losses: vertices are built from ∇L̃_i = g_i / r_i.
        vertices = vertex_vectors(g_rec / scale[0], g_cd / scale[1], result.active_set, cfg)
        point, objective = brute_force_min_norm(vertices)
        ours = result.coef_rec * g_rec + result.coef_cd * g_cd
        size = np.max(np.sum(vertices**2, axis=1))
        assert result.min_norm_sq == pytest.approx(ours @ ours, rel=1e-9, abs=1e-12 * size)
        assert result.min_norm_sq <= objective + 1e-9 * size  # never worse than the QP solver
        assert result.min_norm_sq == pytest.approx(objective, rel=1e-5, abs=1e-9 * size)
        np.testing.assert_allclose(ours, point, atol=1e-4 * math.sqrt(size))
        assert result.alpha1 >= 0 and result.alpha2 >= 0
        assert result.alpha1 + result.alpha2 == pytest.approx(1.0)
    assert {"eq9", "eq9_corner"} & cases_seen  # both S-empty and S-non-empty problems were drawn
    assert {"exact", "frank_wolfe", "single_vertex"} & cases_seen


def test_weights_map_back_to_raw_losses():
    """α is the min-norm point on raw gradients, scaled to the simplex (the weights of Eq. 6)."""
    g_rec, g_cd = np.array([1.0, 0.2, -0.3]), np.array([-0.1, 0.05, 0.02])
    cfg = ParetoConfig(include_task_gradients=True)  # a hull whose min-norm point has two positive entries
    result = solve(gram(g_rec, g_cd), (8.0, 0.3), cfg, scale=(8.0, 0.4))
    assert result.active_set == (2,)  # L̃ = (1, 0.75) points at 36.9°
    # The same problem posed explicitly on ∇L̃ = g / r: c̃ on ∇L̃ is c·r on g.
    explicit = solve(gram(g_rec / 8.0, g_cd / 0.4), (1.0, 0.75), cfg)
    assert (result.coef_rec * 8.0, result.coef_cd * 0.4) == pytest.approx(
        (explicit.coef_rec, explicit.coef_cd)
    )
    total = result.coef_rec + result.coef_cd
    assert result.coef_rec > 0 and result.coef_cd > 0
    assert (result.alpha1, result.alpha2) == pytest.approx((result.coef_rec / total, result.coef_cd / total))
    assert result.normalised_losses == pytest.approx((1.0, 0.75))
    assert result.normalised_weights == pytest.approx((explicit.alpha1, explicit.alpha2))


def test_paper_variant_gives_one_task_steps_and_signed_option():
    # L̃ tilted to a_cd (S = {2, 3, 4}); constraint-only hull: vertices p_k − p_1 = (−, +).
    g_rec, g_cd = np.array([1.0, 0.3]), np.array([0.2, 1.0])
    cfg = ParetoConfig(include_task_gradients=False)
    clipped = solve(gram(g_rec, g_cd), losses_at(80.0), cfg)
    assert clipped.active_set == (2, 3, 4)
    assert clipped.coef_rec < 0 < clipped.coef_cd
    assert (clipped.alpha1, clipped.alpha2) == (0.0, 1.0)
    signed = solve(
        gram(g_rec, g_cd),
        losses_at(80.0),
        ParetoConfig(include_task_gradients=False, allow_negative_weights=True),
    )
    assert signed.alpha1 < 0 < signed.alpha2
    assert abs(signed.alpha1) + abs(signed.alpha2) == pytest.approx(1.0)
    assert signed.alpha1 / signed.alpha2 == pytest.approx(clipped.coef_rec / clipped.coef_cd)


def test_default_leaves_a_cd_free_when_the_recommendation_loss_lags():
    # L̃ below p_1's band (S = {p_0}: L_rec has progressed less than p_1 asks). The paper lets cross-domain
    # attention grow here, so the default (Eq. 11) puts no weight on a_cd whatever the gradients; the
    # ParetoMTL hull keeps descending a_cd for most of them, which is why it is not the default.
    rng = np.random.default_rng(3)
    pushed_down = 0
    for _ in range(200):
        g_rec, g_cd = rng.normal(size=8) * rng.lognormal(), rng.normal(size=8) * rng.lognormal()
        default = solve(gram(g_rec, g_cd), losses_at(5.0))
        assert default.active_set == (0,)
        assert (default.alpha1, default.alpha2) == (1.0, 0.0)
        mtl = solve(gram(g_rec, g_cd), losses_at(5.0), ParetoConfig(include_task_gradients=True))
        pushed_down += mtl.alpha2 > 0.0
    assert pushed_down > 100


# --------------------------------------------------------------------------------- Eq. 12 Frank-Wolfe


def _vertex_gram(seed: int, m: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(m, 2))
    x[:, 0] = np.abs(x[:, 0]) + 0.5  # one side of a line through 0, as every hull `solve` builds
    return x @ x.T


def test_frank_wolfe_converges_and_stops_early():
    for seed in range(20):
        M = _vertex_gram(seed, 5)
        exact = np.array(min_norm_exact(M.tolist()))
        beta, iterations, converged = frank_wolfe(M.tolist(), max_iter=100, tol=1e-6)
        beta = np.array(beta)
        assert converged and iterations < 100, (seed, iterations)
        assert beta.min() >= 0 and beta.sum() == pytest.approx(1.0)
        assert beta @ M @ beta == pytest.approx(exact @ M @ exact, rel=1e-6, abs=1e-12)


def test_exact_solver_handles_a_hull_around_the_origin():
    x = np.array([[1.0, 0.0], [-1.0, 1.0], [-1.0, -1.0], [2.0, 2.0]])  # the origin is inside
    M = x @ x.T
    beta = np.array(min_norm_exact(M.tolist()))
    assert beta.min() >= 0 and beta.sum() == pytest.approx(1.0)
    assert beta @ M @ beta == pytest.approx(0.0, abs=1e-8)


def test_frank_wolfe_respects_max_iter_and_tol():
    M = _vertex_gram(3, 5).tolist()
    beta, iterations, converged = frank_wolfe(M, max_iter=1, tol=0.0)
    assert (iterations, converged) == (1, False)
    assert sum(beta) == pytest.approx(1.0)
    # A tolerance above the first step stops at once, from uniform weights.
    _, iterations, converged = frank_wolfe(M, max_iter=100, tol=1.0 + 1e-9)
    assert (iterations, converged) == (1, True)


def test_plain_eq12_zigzags_but_approaches_the_optimum():
    """Without away steps (the paper's literal Eq. 12) the iterate creeps toward the optimum."""
    M = _vertex_gram(5, 6)
    best = np.array(min_norm_exact(M.tolist()))
    errors = []
    for max_iter in (10, 100, 1000):
        beta, _, _ = frank_wolfe(M.tolist(), max_iter=max_iter, tol=0.0, away_steps=False)
        beta = np.array(beta)
        errors.append(beta @ M @ beta - best @ M @ best)
    assert all(e >= -1e-12 for e in errors)
    assert errors[2] <= errors[1] <= errors[0]
    assert errors[2] < 1e-3 * (best @ M @ best)


# ------------------------------------------------------------------------------ degenerate gradients


@pytest.mark.parametrize("include_task_gradients", [True, False])
@pytest.mark.parametrize("solver", ["exact", "frank_wolfe"])
@pytest.mark.parametrize("angle", [0.0, 5.0, 22.5, 30.0, 45.0, 80.0, 90.0])
@pytest.mark.parametrize("rule", ["none", "l2", "loss+"])
def test_zero_and_parallel_gradients_give_finite_deterministic_weights(
    include_task_gradients, solver, angle, rule
):
    cfg = ParetoConfig(
        include_task_gradients=include_task_gradients, solver=solver, gradient_normalisation=rule
    )
    g = np.array([1.0, -2.0, 0.5])
    problems = {
        "cd_zero": (g, 0 * g),
        "rec_zero": (0 * g, g),
        "both_zero": (0 * g, 0 * g),
        "parallel_equal": (g, g),
        "parallel_longer_cd": (g, 3 * g),
        "antiparallel": (g, -3 * g),
    }
    for name, (g_rec, g_cd) in problems.items():
        result = solve(gram(g_rec, g_cd), losses_at(angle), cfg)
        values = (result.alpha1, result.alpha2, result.coef_rec, result.coef_cd, result.min_norm_sq)
        assert all(math.isfinite(v) for v in values), (name, result)
        assert result.alpha1 >= 0 and result.alpha2 >= 0 and result.alpha1 + result.alpha2 == pytest.approx(1)
        assert solve(gram(g_rec, g_cd), losses_at(angle), cfg) == result  # deterministic


@pytest.mark.parametrize("solver", ["exact", "frank_wolfe"])
def test_zero_and_parallel_gradients_tie_rules(solver):
    cfg = ParetoConfig(solver=solver)
    g = np.array([1.0, -2.0, 0.5])
    s_empty = losses_at(22.5)  # S = ∅: plain Eq. 8/9 on the two task gradients
    # A flat loss is dropped rather than returned as the zero min-norm point (module docstring).
    assert solve(gram(g, 0 * g), s_empty, cfg).alpha1 == 1.0
    assert solve(gram(0 * g, g), s_empty, cfg).alpha2 == 1.0
    both_zero = solve(gram(0 * g, 0 * g), s_empty, cfg)
    assert (both_zero.alpha1, both_zero.alpha2, both_zero.case) == (1.0, 0.0, "degenerate")
    assert solve(gram(g, g), s_empty, cfg).alpha1 == 1.0  # tie → the recommendation task
    assert solve(gram(g, 3 * g), s_empty, cfg).alpha1 == 1.0  # the shorter of two parallel gradients
    assert solve(gram(3 * g, g), s_empty, cfg).alpha2 == 1.0
    anti = solve(gram(g, -3 * g), s_empty, cfg)
    assert (anti.alpha1, anti.alpha2) == pytest.approx((0.75, 0.25))  # 0.75·g − 0.25·3g = 0
    assert anti.min_norm_sq == pytest.approx(0.0, abs=1e-12)


@settings(max_examples=300, deadline=None)
@given(
    entries=st.lists(st.floats(-1e3, 1e3), min_size=6, max_size=6),
    rank=st.integers(0, 2),
    l_rec=st.floats(0.0, 50.0),
    l_cd=st.floats(0.0, 1.0),
    include_task_gradients=st.booleans(),
    rule=st.sampled_from(["none", "l2", "loss+"]),
)
def test_any_psd_gram_gives_valid_weights(entries, rank, l_rec, l_cd, include_task_gradients, rule):
    a = np.array(entries).reshape(2, 3)
    if rank < 2:
        a[1] = a[0] * entries[5] / 1e3 if rank == 1 else 0.0
    cfg = ParetoConfig(include_task_gradients=include_task_gradients, gradient_normalisation=rule)
    result = solve(gram(a[0], a[1]), (l_rec, l_cd), cfg)
    assert math.isfinite(result.alpha1) and math.isfinite(result.alpha2)
    assert result.alpha1 >= 0 and result.alpha2 >= 0 and result.alpha1 + result.alpha2 == pytest.approx(1.0)


def test_non_finite_input_is_an_error():
    with pytest.raises(ValueError, match="non-finite"):
        solve([[math.nan, 0.0], [0.0, 1.0]], (1.0, 1.0))
    with pytest.raises(ValueError, match="scale"):
        solve([[1.0, 0.0], [0.0, 1.0]], (1.0, 1.0), scale=(0.0, 1.0))
    with pytest.raises(ValueError, match="preference_index"):
        ParetoConfig(K=2, preference_index=3)


# --------------------------------------------------------------------------------- loss normalisation


def test_loss_reference_uses_first_positive_values_then_freezes():
    ref = LossReference(steps=3)
    assert ref.scale == (1.0, 1.0)
    for losses in [(10.0, 0.0), (8.0, 0.4), (6.0, 0.2), (1.0, 0.3), (0.5, 5.0)]:
        ref.update(losses)
    assert ref.scale == pytest.approx((8.0, 0.3))  # a_cd = 0 skipped; values after the third ignored
    clone = LossReference(steps=1)
    clone.load_state_dict(ref.state_dict())
    assert clone.scale == ref.scale
    off = LossReference(steps=0)
    off.update((10.0, 0.5))
    assert off.scale == (1.0, 1.0)


def test_normalisation_is_what_makes_raw_scales_comparable():
    """Raw (L_rec ≈ 9, a_cd ≈ 0.4) sits near p_0; normalised by the first values it sits on the diagonal."""
    assert active_set((9.0, 0.4), K=4) == (0,)
    ref = LossReference(steps=1)
    ref.update((9.0, 0.4))
    normalised = (9.0 / ref.scale[0], 0.4 / ref.scale[1])
    assert active_set(normalised, K=4) == (2, 3)


# ------------------------------------------------------------------------ gradient scale (docstring 3a)


def _contributions(result, g_rec: np.ndarray, g_cd: np.ndarray) -> tuple[float, float]:
    """How long each task's part of the update c_rec·g_rec + c_cd·g_cd is."""
    return result.coef_rec * float(np.linalg.norm(g_rec)), result.coef_cd * float(np.linalg.norm(g_cd))


def test_without_gradient_scaling_the_longer_gradient_gets_the_smaller_share():
    # Orthogonal gradients, ‖g_rec‖ = 10·‖g_cd‖, inside p_1's band: the min-norm point is 10:1 toward a_cd.
    g_rec, g_cd = np.array([10.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])
    result = solve(gram(g_rec, g_cd), losses_at(22.5))
    assert result.active_set == ()
    rec, cd = _contributions(result, g_rec, g_cd)
    assert cd / rec == pytest.approx(10.0)
    assert result.rec_share == pytest.approx(1.0 / 11.0)
    assert result.alpha1 == pytest.approx(1.0 / 101.0)  # what the weights alone show


@pytest.mark.parametrize("seed", range(20))
def test_l2_scaling_splits_the_update_evenly_whatever_the_gradient_norms(seed):
    rng = np.random.default_rng(seed)
    g_rec, g_cd = rng.normal(size=6) * rng.lognormal(sigma=2.0), rng.normal(size=6) * rng.lognormal(sigma=2.0)
    cfg = ParetoConfig(gradient_normalisation="l2")
    result = solve(gram(g_rec, g_cd), (15.3, 0.09), cfg, scale=(17.0, 0.3))  # L̃ = (0.9, 0.3): in the band
    assert result.active_set == ()
    rec, cd = _contributions(result, g_rec, g_cd)
    assert rec == pytest.approx(cd, rel=1e-9)
    assert result.rec_share == pytest.approx(0.5)
    # the same problem posed explicitly on unit gradients with no scaling
    u_rec, u_cd = g_rec / np.linalg.norm(g_rec), g_cd / np.linalg.norm(g_cd)
    explicit = solve(gram(u_rec, u_cd), result.normalised_losses)
    assert (rec, cd) == pytest.approx((explicit.coef_rec, explicit.coef_cd), rel=1e-9)


def test_loss_plus_scaling_gives_each_task_a_share_in_proportion_to_its_remaining_loss():
    g_rec, g_cd = np.array([10.0, 0.0]), np.array([0.0, 0.01])  # orthogonal, 1000× apart
    for l_rec, l_cd in [(0.9, 0.3), (0.8, 0.5), (1.0, 0.25)]:
        result = solve(gram(g_rec, g_cd), (l_rec, l_cd), ParetoConfig(gradient_normalisation="loss+"))
        assert result.active_set == ()
        rec, cd = _contributions(result, g_rec, g_cd)
        assert rec / cd == pytest.approx(l_rec / l_cd)


@pytest.mark.parametrize("rule", ["l2", "loss+"])
@pytest.mark.parametrize("angle", [5.0, 30.0, 45.0, 80.0])
def test_gradient_scaling_leaves_the_active_set_and_one_task_steps_alone(rule, angle):
    g_rec, g_cd = np.array([3.0, 1.0, -0.5]), np.array([0.02, -0.01, 0.03])
    plain = solve(gram(g_rec, g_cd), losses_at(angle))
    scaled = solve(gram(g_rec, g_cd), losses_at(angle), ParetoConfig(gradient_normalisation=rule))
    assert scaled.active_set == plain.active_set
    if plain.active_set:  # constraint vertices only: clipping leaves one task, the same one
        assert (scaled.alpha1, scaled.alpha2) == (plain.alpha1, plain.alpha2)


@pytest.mark.parametrize("rule", ["l2", "loss+"])
def test_gradient_scales_that_would_underflow_fall_back_instead_of_dividing_by_zero(rule):
    # ‖g‖² = 1e-320 is representable (subnormal); with a_cd = 0, loss+ multiplies it by the floor², which is 0.0.
    for losses in [(0.9, 0.0), (0.9, 0.3)]:
        result = solve([[1e-320, 0.0], [0.0, 1e-320]], losses, ParetoConfig(gradient_normalisation=rule))
        assert math.isfinite(result.alpha1) and result.alpha1 + result.alpha2 == pytest.approx(1.0)


def test_unknown_gradient_normalisation_is_an_error():
    with pytest.raises(ValueError, match="gradient_normalisation"):
        ParetoConfig(gradient_normalisation="l1")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ cost


def test_solver_runs_well_under_a_millisecond():
    rng = np.random.default_rng(0)
    problems = []
    for _ in range(200):
        a = rng.normal(size=(2, 5))
        problems.append(((a @ a.T).tolist(), tuple(rng.lognormal(size=2))))
    cfg = ParetoConfig()
    start = time.perf_counter()
    for G, losses in problems:
        solve(G, losses, cfg)
    mean_s = (time.perf_counter() - start) / len(problems)
    assert mean_s < 1e-3, f"{mean_s * 1e6:.0f} µs per solve"
