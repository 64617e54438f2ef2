"""Preference-aware Pareto weights for the two AutoCDSR tasks (Section 4.3.1, Eq. 7-12).

The two tasks are L = (L_rec, L_cd-attn) with L_cd-attn = a_cd (Eq. 6-7). Every vector in Eq. 8-12 is a
combination c_rec·g_rec + c_cd·g_cd of the two task gradients, so a vector is a coefficient pair c ∈ R²,
its squared norm is cᵀGc and inner products are cᵀGc', with G the 2×2 Gram matrix of (g_rec, g_cd).
The solver therefore never sees a parameter-sized tensor: `solve` takes G (three dot products, computed by
the caller) and the two loss values, and works on at most K+2 points in the plane.

Pipeline of `solve`:
1. Loss normalisation. Raw losses differ 10-100× in scale (L_rec ≈ log #items, a_cd ∈ [0, 1]), and the
   angle of L decides the active set, so the problem is posed on L̃_i = L_i / r_i, with r_i a per-task
   reference (`LossReference`: mean of the first few positive values). Positive rescaling keeps the Pareto
   set, and it makes p_k compare *relative progress* of the two tasks. G is rescaled accordingly
   (∇L̃_i = g_i / r_i). Consequence: training starts at L̃ ≈ (1, 1), i.e. 45°, above the free band of
   step 2, so the first solves mostly push a_cd down until L̃_cd/L̃_rec falls into the band. Without
   normalisation L ≈ (10, 0.3) sits near p_0 and the constraint pushes the other way (a_cd *up*). The
   balancer's `normalisation="preference"` passes r_cd / tan θ_pref instead, so training starts on p_pref.
2. Active set S (Eq. 10) relative to the chosen preference vector p_1: S = {p_k : (p_k − p_1)ᵀL̃ ≥ 0}.
   p_1 itself always satisfies it with equality and has a zero constraint gradient (it would make the
   min-norm point trivially 0), so it is left out, as in ParetoMTL (the paper's ref. [28]).
   Geometrically: with φ the angle of L̃ and θ_k = kπ/2K, k ∈ S iff |θ_k − φ| ≤ |θ_1 − φ|; S is empty
   iff θ_1/2 < φ < (θ_1 + θ_2)/2 (K = 4: 11.25° < φ < 33.75°, i.e. 0.20 < L̃_cd/L̃_rec < 0.67).
3. Min-norm point in the convex hull of a set of vertices (coefficient pairs):
   - S empty: the two task gradients, closed form of Eq. 9 (MGDA).
   - S non-empty, `include_task_gradients=False` (the paper's Eq. 11, default): the constraint gradients
     ∇(p_kᵀL̃ − p_1ᵀL̃) = (p_k − p_1)·[∇L̃_rec, ∇L̃_cd], i.e. vertices p_k − p_1, k ∈ S.
   - S non-empty, `include_task_gradients=True` (ParetoMTL): the task gradients e_rec, e_cd as well. The
     min-norm point w of any hull satisfies vᵀGw ≥ ‖w‖² for every vertex v, so −w is then a descent
     direction for both losses *and* every active constraint. The price: a_cd can then never rise, not
     even when L_rec lags behind p_1 (S = {p_0}), which is the one case where the paper lets cross-domain
     attention grow ("only increase cross-domain attention scores when the recommendation task can be
     improved"). Measured side by side (docs/benchmarks.md, "Which min-norm problem"), ParetoMTL drove
     a_cd to 0.003 and lost test NDCG@10 against `cd`; Eq. 11 kept a_cd at 0.016 and matched `cd`, so
     Eq. 11 is the default.
   Two vertices: Eq. 9. More: `solver="exact"` (default) tries Eq. 9 on every vertex pair, which is exact
   in the plane (`min_norm_exact`); `solver="frank_wolfe"` runs the paper's Eq. 12 (`frank_wolfe`, with
   away steps by default). They give the same point; the exact one has no iteration cap or tolerance and
   is faster than Frank-Wolfe once that needs more than a few iterations, which it does on ill-conditioned
   G (strongly anti-correlated task gradients).
3a. Gradient scale (`gradient_normalisation`). The min-norm point of two vectors leans toward the shorter one:
   for orthogonal b_rec, b_cd each contributes to the update in proportion to the OTHER's norm. With
   "none" the basis is b_i = ∇L̃_i, so where ‖∇L̃_rec‖ ≫ ‖∇a_cd / r_cd‖ the update inside the free band is
   almost pure ∇a_cd (`ParetoResult.rec_share` shows it; on KuaiRand its median there was 0.5-0.7 over whole
   runs but often below 0.1 in the first 500 steps, docs/results.md). "l2" poses the problem on unit
   gradients b_i = ∇L̃_i/‖∇L̃_i‖, where the free-band point is always the bisector (each task half of the
   direction); "loss+" on
   b_i = ∇L̃_i/(L̃_i‖∇L̃_i‖), where each task's share is proportional to its remaining normalised loss
   (inside the free band, L̃_rec/L̃_cd ∈ (1.5, 5) for K = 4, so L_rec leads). The names are those of
   Sener & Koltun (2018, the paper's ref. [42]). The active set (step 2) does not depend on this; with
   the task gradients out of the hull a non-empty S gives a one-task step under every rule (step 4).
4. Mapping back to the losses. The min-norm point c̃ is a combination of ∇L̃; on raw gradients it is
   c_i = c̃_i / r_i. The weights (α1, α2) applied to the raw losses (Eq. 6) are c scaled to α1 + α2 = 1,
   the constraint of Eq. 8: only the direction of the MGDA point carries information (its norm shrinks to
   0 near Pareto-stationarity and would act as an uncontrolled learning-rate schedule), and the simplex
   scale keeps the update on the scale of the `cd` baseline and the logged weights comparable with the
   paper's Fig. 5. Constraint vertices p_k − p_1 have mixed signs (k > 1: (−, +); k = 0: (+, −)), so with
   them c can have one negative entry, i.e. gradient *ascent* on one loss. By default that entry is
   clipped to 0 before scaling (α ≥ 0; all weight then goes to the loss the active constraints want
   decreased, never ascent on the other); with `allow_negative_weights` the signed c is scaled to
   |α1| + |α2| = 1 (ParetoMTL's normalisation). With `include_task_gradients=False` a non-empty S always
   yields mixed signs, so clipping makes every such step a one-task step. With the task gradients in the
   set it happens when g_rec and g_cd agree (then the constraint can only move by trading one loss for
   the other): on random problems, 29% of solves with S non-empty, nearly all at cos(g_rec, g_cd) > 0.2.
   `apply_basis_weights=True` skips the division by r_i s_i and scales c̃ itself: the rule of the authors'
   public code, which with unit gradients puts a small, adaptive weight on the raw a_cd. Their whole
   setting in this project's terms (p_2 of K = 2 is the a_cd axis): normalisation=none, K=2,
   preference_index=2, gradient_normalisation=l2, include_task_gradients=true, allow_negative_weights=true,
   apply_basis_weights=true (docs/results.md).

Robustness: a vertex with (relatively) zero norm is dropped before solving. For a task gradient this
departs from textbook MGDA, which would return the zero vector and stall training whenever one loss is
locally flat (e.g. a_cd ≡ 0 on a batch without cross-domain pairs); dropping it gives a direction that
decreases the other loss and leaves the flat one unchanged to first order. If every vertex is zero the
weights fall back to (1, 0). Ties are broken toward the recommendation task (Eq. 9) and toward the lowest
vertex index (Eq. 12), so the result is a deterministic function of (G, L): identical inputs on every
DDP rank give identical weights.

Cost (pure Python, measured on this project's 2-core CI machine, where a bare Python call costs 0.5 µs):
median 38 µs per `solve` for K = 4 with the exact solver (p99 120 µs), 67 µs for K = 10; Frank-Wolfe
K = 4 median 74 µs, about 500-900 µs when it runs all 100 iterations.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

# A vertex whose squared norm is below this fraction of the largest one counts as the zero vector.
ZERO_NORM_RTOL = 1e-12
# Eq. 10 is an inclusive test (≥ 0); this relative slack keeps exact geometric ties (e.g. L̃ = (1, 1) is
# equidistant from p_1 and p_3 when K = 4) inclusive despite rounding.
ACTIVE_SET_RTOL = 1e-12

# "loss+" gradient scaling divides by L̃_i; below this (a_cd ≈ 0) it uses this value instead.
LOSS_PLUS_FLOOR = 1e-6

Case = Literal["eq9", "eq9_corner", "single_vertex", "frank_wolfe", "exact", "degenerate"]


@dataclass(frozen=True)
class ParetoConfig:
    """How the Pareto weights are solved (Section 4.3.1). Defaults: the paper's Eq. 11, K = 4."""

    K: int = 4  # number of Pareto sub-regions; preference vectors p_0..p_K (the paper does not give K)
    preference_index: int = 1  # the paper's p_1
    include_task_gradients: bool = False  # the paper's Eq. 11 (False) or ParetoMTL (True)
    max_iter: int = 100  # Frank-Wolfe iterations, Eq. 12 (App. A.3)
    tol: float = 1e-4  # Frank-Wolfe stops once the step η < tol
    away_steps: bool = True  # Frank-Wolfe with away steps (see `frank_wolfe`); False = plain Eq. 12
    solver: Literal["exact", "frank_wolfe"] = "exact"  # for 3+ vertices, see `min_norm_exact`
    allow_negative_weights: bool = False  # see module docstring, step 4
    # Scale of each task's gradient in the min-norm problem (module docstring, step 3a): "none" = ∇L̃_i as is,
    # "l2" = unit gradients ∇L̃_i/‖∇L̃_i‖, "loss+" = ∇L̃_i/(L̃_i‖∇L̃_i‖) (Sener & Koltun 2018's names).
    gradient_normalisation: Literal["none", "l2", "loss+"] = "none"
    # Step 4 (module docstring): False = realise the min-norm direction on the raw gradients (c̃_i / (r_i s_i));
    # True = put the min-norm coefficients c̃ of the scaled basis on the raw losses as they are, as the
    # authors' public code does (with l2 gradients: a weak a_cd term, docs/results.md).
    apply_basis_weights: bool = False

    def __post_init__(self) -> None:
        if self.K < 1:
            raise ValueError(f"ParetoConfig.K must be >= 1, got {self.K}")
        if not 0 <= self.preference_index <= self.K:
            raise ValueError(
                f"ParetoConfig.preference_index must be in [0, K={self.K}], got {self.preference_index}"
            )
        if self.max_iter < 1:
            raise ValueError(f"ParetoConfig.max_iter must be >= 1, got {self.max_iter}")
        if not self.tol >= 0:
            raise ValueError(f"ParetoConfig.tol must be >= 0, got {self.tol}")
        if self.gradient_normalisation not in ("none", "l2", "loss+"):
            raise ValueError(
                "ParetoConfig.gradient_normalisation must be 'none', 'l2' or 'loss+', "
                f"got {self.gradient_normalisation!r}"
            )
        if self.solver not in ("exact", "frank_wolfe"):
            raise ValueError(f"ParetoConfig.solver must be 'exact' or 'frank_wolfe', got {self.solver!r}")


@dataclass(frozen=True)
class ParetoResult:
    """Outcome of one solve, small enough to log every step."""

    alpha1: float  # weight on the raw L_rec (Eq. 6)
    alpha2: float  # weight on the raw L_cd-attn = a_cd (Eq. 6)
    coef_rec: float  # signed coefficient of the raw g_rec in the min-norm point (before scaling to α)
    coef_cd: float  # signed coefficient of the raw g_cd in the min-norm point
    normalised_weights: tuple[float, float]  # the same point as weights on (L̃_rec, L̃_cd), scaled like α
    active_set: tuple[int, ...]  # indices k of the p_k in S (Eq. 10)
    iterations: int  # Frank-Wolfe iterations (0 for the closed forms)
    converged: bool  # closed form, or Frank-Wolfe stopped on η < tol before max_iter
    min_norm_sq: float  # squared norm of the min-norm point in the solver's basis (b_i, docstring step 3a)
    normalised_losses: tuple[float, float]  # L̃ = L / r used for Eq. 10
    # |α1|‖g_rec‖ / (|α1|‖g_rec‖ + |α2|‖g_cd‖): how much of the update's length comes from L_rec. The weights
    # alone do not say it: with ‖g_rec‖ ≫ ‖g_cd‖, α1 = 0.01 can still be half the update.
    rec_share: float
    case: Case


@functools.cache
def preference_vectors(K: int) -> tuple[tuple[float, float], ...]:
    """p_k = (cos(kπ/2K), sin(kπ/2K)), k = 0..K: p_0 = (1, 0), p_K = (0, 1) (Section 4.3.1)."""
    if K < 1:
        raise ValueError(f"K must be >= 1, got {K}")
    vectors = [(math.cos(k * math.pi / (2 * K)), math.sin(k * math.pi / (2 * K))) for k in range(K + 1)]
    vectors[K] = (0.0, 1.0)  # cos(π/2) is 6e-17 in floating point
    return tuple(vectors)


def active_set(losses: Sequence[float], K: int, preference_index: int = 1) -> tuple[int, ...]:
    """Eq. 10: indices k ≠ preference_index with (p_k − p_pref)ᵀL ≥ 0, ascending.

    `losses` should already be normalised (see `LossReference`); only its direction matters.
    """
    p = preference_vectors(K)
    l_rec, l_cd = float(losses[0]), float(losses[1])
    px, py = p[preference_index]
    slack = ACTIVE_SET_RTOL * (abs(l_rec) + abs(l_cd))
    return tuple(
        k
        for k, (x, y) in enumerate(p)
        if k != preference_index and (x - px) * l_rec + (y - py) * l_cd >= -slack
    )


def free_band(K: int, preference_index: int = 1) -> tuple[float, float]:
    """The open interval of L̃_cd / L̃_rec where Eq. 10's active set is empty (step 2): (lo, hi).

    S is empty iff the angle φ of L̃ lies strictly between the bisectors of p_pref and its neighbours;
    p_0 has no lower neighbour (lo = 0) and p_K no upper one (hi = inf). K = 4, p_1: (0.199, 0.668).
    """
    if K < 1:
        raise ValueError(f"K must be >= 1, got {K}")
    if not 0 <= preference_index <= K:
        raise ValueError(f"preference_index must be in [0, K={K}], got {preference_index}")
    theta = [k * math.pi / (2 * K) for k in range(K + 1)]
    lo = (
        0.0
        if preference_index == 0
        else math.tan((theta[preference_index - 1] + theta[preference_index]) / 2)
    )
    hi = (
        math.inf
        if preference_index == K
        else math.tan((theta[preference_index] + theta[preference_index + 1]) / 2)
    )
    return lo, hi


def min_norm_segment(aa: float, ab: float, bb: float) -> tuple[float, Case]:
    """Eq. 9 for two vectors a, b given their Gram entries: γ minimising ‖γa + (1−γ)b‖², γ ∈ [0, 1].

    Corner cases as in the paper: if aᵀb ≥ ‖a‖², a is the min-norm point (γ = 1); else if aᵀb ≥ ‖b‖²,
    b is (γ = 0); the first test wins a tie (a = b), which favours L_rec when a = g_rec. Otherwise
    γ = bᵀ(b − a) / ‖b − a‖². The paper prints the denominator as ‖b − a‖ (a typo): setting the derivative
    of ‖γa + (1−γ)b‖² to zero gives the squared norm.
    """
    if ab >= aa:
        return 1.0, "eq9_corner"
    if ab >= bb:
        return 0.0, "eq9_corner"
    # Here aa > ab and bb > ab, so the denominator ‖a − b‖² = aa + bb − 2ab is strictly positive.
    return (bb - ab) / (aa + bb - 2.0 * ab), "eq9"


def frank_wolfe(
    gram: Sequence[Sequence[float]], max_iter: int, tol: float, away_steps: bool = True
) -> tuple[list[float], int, bool]:
    """Eq. 11-12: min ‖Σ_j β_j v_j‖² over the simplex, given the vertex Gram matrix M_ij = v_iᵀv_j.

    Starts from uniform β. Each iteration computes the Eq. 12 step toward the vertex least correlated with
    the current point ∇' (t = argmin_t (Mβ)_t, lowest index on ties):
    η = ∇'ᵀ(∇' − v_t) / ‖∇' − v_t‖², clipped to [0, 1] (squared norm, as in Eq. 9), and stops when η < tol
    (converged) or after max_iter iterations. Returns (β, iterations, converged).

    With `away_steps=False` every iteration takes that step, β := (1 − η)β + η e_t, exactly as Eq. 12.
    On random K = 4 problems this zigzags between the two ends of the optimal hull edge: η decays like
    1/iteration, the η < tol stop practically never fires, and at 100 iterations α is still off by up to
    2e-2. With `away_steps=True` (Wolfe's away step; Lacoste-Julien & Jaggi, 2015) an iteration may
    instead move weight *away* from the vertex most correlated with ∇' among those in use, when that
    promises more decrease (exact line search, capped so β stays ≥ 0); the iterate can then land exactly
    on the optimal edge, where η drops to 0: median 13 iterations. Both stay slow when G is ill-conditioned
    (cos(g_rec, g_cd) near ±1 makes the hull a sliver): on a mix with half such problems 30% of solves
    still hit 100 iterations. Hence `solve` defaults to `min_norm_exact`.
    """
    m = len(gram)
    beta = [1.0 / m] * m
    # Mβ: inner products of every vertex with the current point ∇'; cur = ‖∇'‖² = βᵀMβ.
    m_beta = [sum(row) / m for row in gram]
    cur = sum(m_beta) / m
    for it in range(1, max_iter + 1):
        t = min(range(m), key=m_beta.__getitem__)
        dot_t = m_beta[t]
        gap_fw = cur - dot_t  # Frank-Wolfe gap: how much v_t undercuts the current point
        denom = cur - 2.0 * dot_t + gram[t][t]  # ‖∇' − v_t‖²
        eta = min(1.0, gap_fw / denom) if gap_fw > 0.0 and denom > 0.0 else 0.0
        if eta < tol:
            return beta, it, True
        if away_steps:
            s = max((j for j in range(m) if beta[j] > 0.0), key=m_beta.__getitem__)
            dot_s = m_beta[s]
            gap_away = dot_s - cur
            if gap_away > gap_fw and beta[s] < 1.0:
                # Away step: β := (1 + γ)β − γ e_s, with γ ≤ β_s / (1 − β_s) so that β_s stays ≥ 0.
                denom_away = cur - 2.0 * dot_s + gram[s][s]  # ‖∇' − v_s‖²
                gamma_max = beta[s] / (1.0 - beta[s])
                gamma = min(gamma_max, gap_away / denom_away) if denom_away > 0.0 else gamma_max
                grow = 1.0 + gamma
                beta = [grow * b for b in beta]
                beta[s] = 0.0 if gamma == gamma_max else beta[s] - gamma
                row_s = gram[s]
                m_beta = [grow * mb - gamma * row_s[i] for i, mb in enumerate(m_beta)]
                cur = grow * grow * cur - 2.0 * gamma * grow * dot_s + gamma * gamma * gram[s][s]
                continue
        keep = 1.0 - eta
        beta = [keep * b for b in beta]
        beta[t] += eta
        row_t = gram[t]
        m_beta = [keep * mb + eta * row_t[i] for i, mb in enumerate(m_beta)]
        cur = keep * keep * cur + 2.0 * eta * keep * dot_t + eta * eta * gram[t][t]
    return beta, max_iter, False


def min_norm_exact(gram: Sequence[Sequence[float]]) -> list[float]:
    """Eq. 11 solved exactly: the best Eq. 9 segment over all vertex pairs. Returns β.

    Why this is exact here: all vertices are combinations of g_rec and g_cd, so they lie in a plane, where
    the min-norm point of a polygon is a vertex or lies on an edge unless the polygon contains the origin.
    It never does for the hulls `solve` builds when (g_rec, g_cd) are linearly independent: e_rec, e_cd
    and every p_k − p_1 of one active set lie strictly on one side of a line through 0 in coefficient space
    (S holds either only k > pref or only k < pref, whose p_k − p_1 share one sign pattern). When they are
    dependent all points lie on one line, where a segment between two of them is again exact. Cost:
    m(m−1)/2 closed forms, m ≤ K + 2; first pair wins ties. The result is checked against the optimality
    condition of the min-norm point w (v_iᵀw ≥ ‖w‖² for every vertex); for a general vertex set that
    fails only when the hull contains the origin, and Frank-Wolfe (which converges linearly there) is run.
    """
    m = len(gram)
    if m == 1:
        return [1.0]
    best_value, best = math.inf, (0, 1, 1.0)
    for i in range(m):
        for j in range(i + 1, m):
            gamma, _ = min_norm_segment(gram[i][i], gram[i][j], gram[j][j])
            value = (
                gamma * gamma * gram[i][i]
                + 2.0 * gamma * (1.0 - gamma) * gram[i][j]
                + (1.0 - gamma) ** 2 * gram[j][j]
            )
            if value < best_value:
                best_value, best = value, (i, j, gamma)
    i, j, gamma = best
    beta = [0.0] * m
    beta[i] += gamma
    beta[j] += 1.0 - gamma
    slack = 1e-9 * max(gram[v][v] for v in range(m))
    if any(gamma * gram[v][i] + (1.0 - gamma) * gram[v][j] < best_value - slack for v in range(m)):
        beta, _, _ = frank_wolfe(gram, max_iter=10_000, tol=0.0)
    return beta


def solve(
    gram: Sequence[Sequence[float]],
    losses: Sequence[float],
    config: ParetoConfig | None = None,
    scale: Sequence[float] = (1.0, 1.0),
) -> ParetoResult:
    """Preference-aware Pareto weights from the Gram matrix of (g_rec, g_cd) and the loss values.

    gram:   [[g_recᵀg_rec, g_recᵀg_cd], [g_cdᵀg_rec, g_cdᵀg_cd]] over the shared parameters.
    losses: (L_rec, L_cd-attn), raw values.
    scale:  per-task references r (`LossReference.scale`); the problem is solved on L̃ = L / r.
    """
    cfg = config or ParetoConfig()
    r_rec, r_cd = float(scale[0]), float(scale[1])
    if not (r_rec > 0.0 and r_cd > 0.0 and math.isfinite(r_rec) and math.isfinite(r_cd)):
        raise ValueError(f"loss scale must be positive and finite, got {tuple(scale)}")
    g = [[float(gram[0][0]), float(gram[0][1])], [float(gram[1][0]), float(gram[1][1])]]
    raw_losses = (float(losses[0]), float(losses[1]))
    if not all(math.isfinite(x) for row in g for x in row) or not all(map(math.isfinite, raw_losses)):
        raise ValueError(f"Pareto solver got non-finite input: gram={g}, losses={raw_losses}")
    norm_losses = (raw_losses[0] / r_rec, raw_losses[1] / r_cd)
    # The min-norm problem's basis: b_i = ∇L̃_i / s_i = g_i / (r_i s_i), s_i from `gradient_normalisation`
    # (step 3a); G̃_ij = G_ij / (r_i s_i r_j s_j). The symmetric average absorbs rounding asymmetry.
    s_rec, s_cd = _gradient_scales(g, (r_rec, r_cd), norm_losses, cfg.gradient_normalisation)
    q_rec, q_cd = r_rec * s_rec, r_cd * s_cd
    off = 0.5 * (g[0][1] + g[1][0]) / (q_rec * q_cd)
    gn = [[g[0][0] / (q_rec * q_rec), off], [off, g[1][1] / (q_cd * q_cd)]]

    active = active_set(norm_losses, cfg.K, cfg.preference_index)
    vertices: list[tuple[float, float]] = []
    if not active or cfg.include_task_gradients:
        vertices += [(1.0, 0.0), (0.0, 1.0)]
    p = preference_vectors(cfg.K)
    p_pref = p[cfg.preference_index]
    vertices += [(p[k][0] - p_pref[0], p[k][1] - p_pref[1]) for k in active]

    # Vertex Gram matrix M_ij = v_iᵀ G̃ v_j from G̃v_j, computed once per vertex.
    g_v = [(gn[0][0] * x + gn[0][1] * y, gn[1][0] * x + gn[1][1] * y) for x, y in vertices]
    norms = [v[0] * gv[0] + v[1] * gv[1] for v, gv in zip(vertices, g_v, strict=True)]
    largest = max(norms)
    kept = [i for i, n in enumerate(norms) if n > ZERO_NORM_RTOL * largest]
    vgram = [[vertices[i][0] * g_v[j][0] + vertices[i][1] * g_v[j][1] for j in kept] for i in kept]

    iterations, converged = 0, True
    case: Case
    if not kept:
        beta, case = [], "degenerate"
    elif len(kept) == 1:
        beta, case = [1.0], "single_vertex"
    elif len(kept) == 2:
        gamma, case = min_norm_segment(vgram[0][0], vgram[0][1], vgram[1][1])
        beta = [gamma, 1.0 - gamma]
    elif cfg.solver == "exact":
        beta, case = min_norm_exact(vgram), "exact"
    else:
        beta, iterations, converged = frank_wolfe(vgram, cfg.max_iter, cfg.tol, cfg.away_steps)
        case = "frank_wolfe"
    coef = (
        sum(b * vertices[i][0] for b, i in zip(beta, kept, strict=True)),
        sum(b * vertices[i][1] for b, i in zip(beta, kept, strict=True)),
    )
    min_norm_sq = max(
        coef[0] * (gn[0][0] * coef[0] + gn[0][1] * coef[1])
        + coef[1] * (gn[1][0] * coef[0] + gn[1][1] * coef[1]),
        0.0,
    )

    # Back to raw gradients: c̃_rec b_rec + c̃_cd b_cd = (c̃_rec / (r_rec s_rec)) g_rec + (c̃_cd / (r_cd s_cd)) g_cd.
    # apply_basis_weights: c̃ itself on the raw losses, which is not that direction unless r_i s_i are equal.
    c_rec, c_cd = coef if cfg.apply_basis_weights else (coef[0] / q_rec, coef[1] / q_cd)
    alpha1, alpha2 = _to_weights(c_rec, c_cd, cfg.allow_negative_weights)
    part_rec = abs(alpha1) * math.sqrt(max(g[0][0], 0.0))
    part_cd = abs(alpha2) * math.sqrt(max(g[1][1], 0.0))
    rec_share = part_rec / (part_rec + part_cd) if part_rec + part_cd > 0.0 else alpha1
    return ParetoResult(
        alpha1=alpha1,
        alpha2=alpha2,
        coef_rec=c_rec,
        coef_cd=c_cd,
        normalised_weights=_to_weights(coef[0] / s_rec, coef[1] / s_cd, cfg.allow_negative_weights),
        active_set=active,
        iterations=iterations,
        converged=converged,
        min_norm_sq=min_norm_sq,
        normalised_losses=norm_losses,
        rec_share=rec_share,
        case=case,
    )


def _gradient_scales(
    g: list[list[float]], r: tuple[float, float], norm_losses: tuple[float, float], rule: str
) -> tuple[float, float]:
    """s_i of step 3a: 1 ("none"), ‖∇L̃_i‖ ("l2") or L̃_i‖∇L̃_i‖ ("loss+").

    A task whose gradient is (relatively) zero keeps s_i = 1, so the zero-vertex rule still sees a zero vector.
    "loss+" floors L̃_i at `LOSS_PLUS_FLOOR` (a_cd is exactly 0 on a batch without cross-domain pairs). A scale
    that would over- or underflow the solver's arithmetic falls back to 1.
    """
    if rule == "none":
        return 1.0, 1.0
    norms = [math.sqrt(max(g[i][i], 0.0)) / r[i] for i in range(2)]
    largest = max(norms)
    scales = []
    for i in range(2):
        s = norms[i]
        if rule == "loss+":
            s *= max(norm_losses[i], LOSS_PLUS_FLOOR)
        q_sq = (r[i] * s) ** 2  # the solver divides by it: it must neither underflow to 0 nor overflow
        usable = norms[i] > math.sqrt(ZERO_NORM_RTOL) * largest and math.isfinite(s)
        usable = usable and q_sq > 0.0 and math.isfinite(1.0 / q_sq)
        scales.append(s if usable else 1.0)
    return scales[0], scales[1]


def _to_weights(c_rec: float, c_cd: float, allow_negative: bool) -> tuple[float, float]:
    """Scale the min-norm coefficients to the weights of Eq. 6 (module docstring, step 4)."""
    if not allow_negative:
        c_rec, c_cd = max(c_rec, 0.0), max(c_cd, 0.0)
    total = abs(c_rec) + abs(c_cd)
    if not total > 0.0:
        return 1.0, 0.0
    return c_rec / total, c_cd / total


@dataclass
class LossReference:
    """Per-task loss references r = (r_rec, r_cd) for the normalisation L̃_i = L_i / r_i.

    Rule: r_i is the mean of the first `steps` strictly positive values of loss i passed to `update`
    (the trainer passes the cross-rank mean at each solve step, so r is identical on every rank), then
    frozen. Before loss i has shown a positive value, r_i = 1 (raw). Why the first values, not a running
    average: a running reference would pin L̃ near (1, 1) forever and erase the progress ratio the
    preference vectors are meant to compare. Why only positive values: a_cd is exactly 0 on batches
    without cross-domain pairs, and a near-zero reference would blow L̃_cd up for the rest of training.
    `steps = 0` disables normalisation (r = (1, 1)).
    """

    steps: int = 10
    sums: list[float] = field(default_factory=lambda: [0.0, 0.0])
    counts: list[int] = field(default_factory=lambda: [0, 0])

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError(f"LossReference.steps must be >= 0, got {self.steps}")

    def update(self, losses: Sequence[float]) -> None:
        for i in range(2):
            value = float(losses[i])
            if self.counts[i] < self.steps and value > 0.0 and math.isfinite(value):
                self.sums[i] += value
                self.counts[i] += 1

    def restart(self, i: int) -> None:
        """Loss ``i`` now measures something else: take its reference again from the next values."""
        self.sums[i], self.counts[i] = 0.0, 0

    @property
    def scale(self) -> tuple[float, float]:
        r_rec, r_cd = (self.sums[i] / self.counts[i] if self.counts[i] else 1.0 for i in range(2))
        return r_rec, r_cd

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "sums": list(self.sums), "counts": list(self.counts)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        self.sums = [float(x) for x in state["sums"]]
        self.counts = [int(x) for x in state["counts"]]
