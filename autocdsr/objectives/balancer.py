"""The per-step backward of every method: `cd`, `fixed` (L_rec + w·a_cd) and `autocdsr` (Eq. 6-12).

`LossBalancer.backward` turns this step's two losses into gradients in `.grad` for the optimizer.
`autocdsr` (also used by AutoCDSR⁺, whose a_cd is Eq. 13) computes the two tasks' gradients and their Gram
matrix every `update_every` steps ("solve steps") and reuses that solve in between:

solve step (2 backward passes, no read of `.grad`):
  1. g_rec = ∂L_rec/∂θ and g_cd = ∂a_cd/∂θ for ALL parameters with `torch.autograd.grad` (one pass each;
     the first keeps the graph for the second). Clean state by construction: nothing left in `.grad` by an
     earlier backward can leak into the solver (the authors' code read a stale `.grad`).
  2. The SHARED (non-embedding) parts of g_rec and g_cd, and the two loss values, go into one flat buffer,
     all-reduced (mean over ranks) when torch.distributed is initialised. Every rank then holds the same
     global gradients, so the Gram matrix, the active set and (α1, α2) are bitwise identical everywhere.
  3. G = [[g_rec·g_rec, g_rec·g_cd], [g_cd·g_rec, g_cd·g_cd]] (three dot products) → `pareto.solve`.
     With `noise_correction`, G is first replaced by an estimate of the expected gradients' Gram matrix
     (`NoiseEstimate`: two more dot products against the previous solve's gradients).
  4. `.grad` := α1 g_rec + α2 g_cd for every parameter: the shared part from the already averaged buffer,
     the rest (embedding tables, anything not in `shared_params`) combined locally, then averaged over
     ranks in one all-reduce, exactly as DDP would average it.
other steps (1 backward pass): (α1 L_rec + α2 a_cd).backward(); under DDP the model's own gradient
  synchronisation averages it. With `reuse="gram"` (the default) the weights are first solved again (step 3)
  from the last solve's Gram matrix and this step's losses (their mean over ranks): a solve per step at the
  cost of a reuse step; `reuse="weights"` holds the last solve's weights. Why not hold them (docs/results.md,
  "How often to solve"): held weights overshoot. A solve inside p_1's band gives a_cd most of the weight, and
  holding it for N steps drives L̃_cd/L̃_rec far below the band, where the clipped solve gives L_rec alone and
  nothing raises a_cd again; solved every step, the weights switch back to L_rec alone as soon as the ratio
  leaves the band.

What the embedding table receives: α1 ∇L_rec + α2 ∇a_cd, with the same weights as every other parameter.
The paper leaves the table out of the Gram matrix only to save compute (App. A.2); the update stays the
gradient of one scalarised objective (Eq. 6), solve steps and reuse steps then apply the same rule, and the
item embeddings feeding the attention keys and queries also learn to lower a_cd. Giving the table ∇L_rec
alone would make solve and reuse steps disagree and change the objective silently.

Trainer contract, per step (the order matters):
    optimizer.zero_grad(set_to_none=True)             # optional: backward() overwrites .grad anyway
    with balancer.sync_context(model, step):           # DDP: no_sync() on solve steps, nothing otherwise
        loss_rec, a_cd = <forward of `model` on this rank's batch>
        info = balancer.backward(loss_rec, a_cd, shared_params, all_params, step)
    optimizer.step(); scheduler.step()
    log info.as_metrics()                              # α1, α2, a_cd every step (paper's Fig. 5)
- `all_params`: every trainable parameter; `shared_params`: the subset the Gram matrix is built on (all
  but the embedding tables). Both in the same order on every rank (the model's own order is).
- Under DDP the model MUST be wrapped in `DistributedDataParallel` (Ray Train's `prepare_model` does):
  reuse steps rely on its averaging. The forward and backward of solve steps should run inside
  `sync_context` (DDP's `no_sync`): the balancer averages those gradients itself, and without it DDP
  prepares a reduction that `autograd.grad` never completes (torch 2.13 tolerates that, checked with two
  gloo ranks, but it is outside DDP's documented use).
- `backward()` owns `.grad` of `all_params`: it sets it, never accumulates into or reads it (gradient
  accumulation over micro-batches is therefore not supported).
- `step` must be the same on every rank (the global optimizer step); the solve schedule depends on it.
- A non-finite loss or gradient on any rank during a solve step: no solve on any rank, the previous
  weights are kept, and the (non-finite) update is written so the trainer's NaN check sees it.
- `state_dict()` / `load_state_dict()` carry the weights and the loss references across a resume.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn

from autocdsr.objectives.gate import GateConfig
from autocdsr.objectives.pareto import LossReference, ParetoConfig, ParetoResult, preference_vectors, solve

Method = Literal["cd", "autocdsr", "fixed"]


@dataclass(frozen=True)
class BalancerConfig:
    """How L_rec and a_cd are combined into one update (Section 4.3)."""

    method: Method = "cd"  # cd: L_rec only; fixed: L_rec + fixed_weight·a_cd (Fig. 4); autocdsr: Pareto
    fixed_weight: float = 0.1  # w of the `fixed` method
    # `autocdsr`: re-solve the Gram matrix of (g_rec, g_cd) (two backward passes) every N steps. 10: step time
    # ~1.05x of `cd` (docs/benchmarks.md); with the default `reuse`, as good as solving every step on KuaiRand
    # SASRec and the generated data (docs/results.md, "How often to solve").
    update_every: int = 10
    # `autocdsr`: what the steps between two solves keep from the last one. "gram" (default): its Gram matrix
    # of (g_rec, g_cd); Eq. 9-12 are solved again at every step with that step's losses (cross-rank mean), so
    # the active set (Eq. 10), which depends on the losses alone, follows them every step, while the gradients'
    # geometry is refreshed every `update_every` steps. No extra backward pass: the per-step cost is a 2x2
    # solve (and, under DDP, an all-reduce of two numbers). "weights": its (α1, α2), held as they are (the
    # default until 2026-12-07; it collapses a_cd on KuaiRand SASRec, docs/results.md).
    reuse: Literal["weights", "gram"] = "gram"
    # `autocdsr`: the first N steps train on L_rec alone (weights (1, 0), no solve), e.g. during the LR warm-up;
    # the loss references of "initial" normalisation are then taken from the solves after it. 0 = from step 1.
    # "warmup": N = the LR warm-up's steps; `autocdsr.config.TrainConfig.balancer` resolves it to a number.
    start_after: int | Literal["warmup"] = 0
    # Loss normalisation before Eq. 10 (LossReference): "initial" L̃_i = L_i / r_i, r_i = mean of the first
    # `normalisation_steps` solves, so training starts at L̃ = (1, 1) (45°, above p_1's band for K = 4);
    # "preference" also divides r_cd by tan θ_pref, so it starts ON the chosen preference vector (inside its
    # band) and p_pref then asks for the two losses to fall in proportion; "none": raw losses.
    normalisation: Literal["initial", "preference", "none"] = "initial"
    # solves whose (positive) losses define the reference (with reuse="gram", the first steps from the first solve)
    normalisation_steps: int = 10
    # Gram matrix of the expected gradients instead of this batch's (see `NoiseEstimate`): each task's squared
    # gradient norm minus its sampling-noise variance, estimated from consecutive solves. Off = the paper's
    # Eq. 9-11 on minibatch gradients, where L_rec's noise makes its gradient look several times longer.
    noise_correction: bool = False
    noise_decay: float = 0.9  # EMA decay, per solve step, of the noise-variance and Gram estimates
    pareto: ParetoConfig = field(default_factory=ParetoConfig)
    # which domains' query rows a_cd counts, chosen on held-out targets (`autocdsr.objectives.gate`)
    gate: GateConfig = field(default_factory=GateConfig)

    def __post_init__(self) -> None:
        if self.method not in ("cd", "autocdsr", "fixed"):
            raise ValueError(
                f"BalancerConfig.method must be 'cd', 'autocdsr' or 'fixed', got {self.method!r}"
            )
        if self.start_after != "warmup" and (not isinstance(self.start_after, int) or self.start_after < 0):
            raise ValueError(f"BalancerConfig.start_after must be >= 0 or 'warmup', got {self.start_after!r}")
        if self.update_every < 1:
            raise ValueError(f"BalancerConfig.update_every must be >= 1, got {self.update_every}")
        if self.reuse not in ("weights", "gram"):
            raise ValueError(f"BalancerConfig.reuse must be 'weights' or 'gram', got {self.reuse!r}")
        if self.normalisation not in ("initial", "preference", "none"):
            raise ValueError(
                "BalancerConfig.normalisation must be 'initial', 'preference' or 'none', "
                f"got {self.normalisation!r}"
            )
        if self.normalisation == "preference" and not 0 < self.pareto.preference_index < self.pareto.K:
            raise ValueError(
                "BalancerConfig.normalisation='preference' needs a preference vector strictly between the axes "
                f"(0 < preference_index < K = {self.pareto.K}), got preference_index={self.pareto.preference_index}"
            )
        if self.normalisation_steps < 1:
            raise ValueError(
                f"BalancerConfig.normalisation_steps must be >= 1, got {self.normalisation_steps}"
            )
        if not math.isfinite(self.fixed_weight):
            raise ValueError(f"BalancerConfig.fixed_weight must be finite, got {self.fixed_weight}")
        if not 0.0 <= self.noise_decay < 1.0:
            raise ValueError(f"BalancerConfig.noise_decay must be in [0, 1), got {self.noise_decay}")


@dataclass(frozen=True)
class BalanceInfo:
    """What one `backward` did, for logging."""

    step: int
    alpha1: float  # weight applied to L_rec this step
    alpha2: float  # weight applied to a_cd this step
    loss_rec: float  # this rank's L_rec
    a_cd: float  # this rank's a_cd (nan when the method's forward did not compute it)
    solved: bool  # True when (α1, α2) were re-solved from new gradients (False on a non-finite solve step)
    pareto: ParetoResult | None = None  # the solve, on solve steps and (reuse="gram") on every step after one
    # `noise_correction`: the estimated noise share of each task's squared gradient norm, (rec, cd)
    noise_share: tuple[float, float] | None = None

    def as_metrics(self) -> dict[str, float]:
        metrics = {"alpha1": self.alpha1, "alpha2": self.alpha2, "loss_rec": self.loss_rec, "a_cd": self.a_cd}
        if self.noise_share is not None:
            metrics |= {
                "pareto/noise_share_rec": self.noise_share[0],
                "pareto/noise_share_cd": self.noise_share[1],
            }
        if self.pareto is not None:
            metrics |= {
                "pareto/iterations": float(self.pareto.iterations),
                "pareto/active_set_size": float(len(self.pareto.active_set)),
                "pareto/min_norm_sq": self.pareto.min_norm_sq,
                "pareto/normalised_alpha1": self.pareto.normalised_weights[0],
                "pareto/normalised_alpha2": self.pareto.normalised_weights[1],
                "pareto/normalised_loss_rec": self.pareto.normalised_losses[0],
                "pareto/normalised_a_cd": self.pareto.normalised_losses[1],
                "pareto/rec_share": self.pareto.rec_share,
            }
        return metrics


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _mean_over_ranks(buffer: torch.Tensor, world_size: int) -> torch.Tensor:
    """In-place mean over ranks, the average DDP applies to gradients."""
    if world_size > 1:
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
        buffer.div_(world_size)
    return buffer


def _assign_grads(params: Sequence[torch.Tensor], flat: torch.Tensor) -> None:
    """Set p.grad from consecutive slices of `flat` (views when the dtype matches)."""
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).to(p.dtype)
        offset += n


def _ema(old: Sequence[float], new: Sequence[float], decay: float) -> tuple[float, ...]:
    return tuple(decay * o + (1.0 - decay) * x for o, x in zip(old, new, strict=True))


class NoiseEstimate:
    """Sampling-noise variance of the two (rank-averaged) minibatch gradients, for `noise_correction`.

    Eq. 9-11 need the Gram matrix of the *expected* gradients; a minibatch gradient g = μ + ξ has E‖g‖² = ‖μ‖² +
    tr Σ, and with a sampled-softmax L_rec the noise term dominates: on KuaiRand (BERT4Rec, batch 64, 4,096
    negatives) 95-99.5% of ‖g_rec‖² is noise, 0.2-0.5% of ‖g_cd‖² (`bench/gradient_noise.py`, docs/results.md).
    The min-norm point leans toward the shorter vector, so the noisy g_rec hands a_cd most of the weight (Eq. 9
    at initialisation: 0.84 of the normalised weight on one batch, 0.03 on the expected gradients). Measured
    there, the correction does not stop AutoCDSR's early collapse of a_cd (the first solves sit above p_1's
    band) and its estimate is coarse where the signal is 1-5% of ‖g‖². Consecutive solves see independent
    batches, so E‖g_t − g_s‖²/2 = tr Σ + ‖μ_t − μ_s‖²/2: the halved squared change since the previous solve
    estimates tr Σ (slightly high by the true gradient's drift over `update_every` steps). One batch's ‖ξ‖²
    still fluctuates around tr Σ by more than ‖μ‖² when the noise dominates, so the Gram entries are averaged
    over solves too: both with the same EMA (`decay` per solve, ~2/(1 − decay) solves). The corrected diagonal
    is EMA(‖g‖²) − EMA(tr Σ), floored at `FLOOR`·EMA(‖g‖²); the off-diagonal needs no noise correction (the
    tasks' noise is uncorrelated to first order: a_cd's gradient is almost noise-free) but is clipped to keep
    the matrix positive semi-definite. The first solve has no previous gradient and is left uncorrected. Every
    rank holds the same averaged gradients, hence the same estimate.
    """

    FLOOR = 1e-3

    def __init__(self, decay: float) -> None:
        self.decay = decay
        self.previous: torch.Tensor | None = None  # [g_rec | g_cd] of the last solve (shared parameters)
        self.variance: tuple[float, float] | None = None  # EMA of (tr Σ_rec, tr Σ_cd)
        self.gram: tuple[float, float, float] | None = None  # EMA of (g_rec·g_rec, g_rec·g_cd, g_cd·g_cd)

    def change(self, current: torch.Tensor, n: int) -> torch.Tensor | None:
        """[‖Δg_rec‖²/2, ‖Δg_cd‖²/2] since the last solve (a device tensor, not synced) and remember
        `current` (the [g_rec | g_cd] buffer of length 2n); None at the first solve."""
        previous, self.previous = self.previous, current.detach().clone()
        if previous is None or previous.numel() != current.numel():
            return None
        diff = current - previous.to(current.device, current.dtype)
        return torch.stack([diff[:n] @ diff[:n], diff[n:] @ diff[n:]]) * 0.5

    def correct(
        self, rr: float, rc: float, cc: float, change: Sequence[float] | None
    ) -> tuple[tuple[float, float, float], tuple[float, float] | None]:
        """Fold this solve's Gram entries and gradient change into the averages; the corrected
        (rr, rc, cc) and the estimated noise shares of the squared norms."""
        d = self.decay
        if change is not None:
            new = (float(change[0]), float(change[1]))
            self.variance = new if self.variance is None else _ema(self.variance, new, d)  # type: ignore[assignment]
        if self.variance is None:
            return (rr, rc, cc), None
        self.gram = (rr, rc, cc) if self.gram is None else _ema(self.gram, (rr, rc, cc), d)  # type: ignore[assignment]
        (g_rr, g_rc, g_cc), (v_rec, v_cd) = self.gram, self.variance
        rr_c, cc_c = max(g_rr - v_rec, self.FLOOR * g_rr), max(g_cc - v_cd, self.FLOOR * g_cc)
        bound = math.sqrt(rr_c * cc_c)
        rc_c = min(max(g_rc, -bound), bound)
        shares = (min(v_rec / g_rr, 1.0) if g_rr > 0 else 0.0, min(v_cd / g_cc, 1.0) if g_cc > 0 else 0.0)
        return (rr_c, rc_c, cc_c), shares

    def state_dict(self) -> dict[str, Any]:
        previous = None if self.previous is None else self.previous.detach().cpu()
        return {
            "previous": previous,
            "variance": None if self.variance is None else list(self.variance),
            "gram": None if self.gram is None else list(self.gram),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.previous = state.get("previous")
        variance = state.get("variance")
        self.variance = None if variance is None else (float(variance[0]), float(variance[1]))
        gram = state.get("gram")
        self.gram = None if gram is None else (float(gram[0]), float(gram[1]), float(gram[2]))


class LossBalancer:
    """Writes this step's gradient of α1·L_rec + α2·a_cd into `.grad`; see the module docstring."""

    def __init__(self, config: BalancerConfig) -> None:
        if config.start_after == "warmup":
            raise ValueError(
                "LossBalancer: start_after='warmup' must first be resolved to a step count "
                "(TrainConfig.balancer uses train.warmup_steps)"
            )
        self.config = config
        self._start_after = int(config.start_after)
        steps = config.normalisation_steps if config.normalisation != "none" else 0
        self.reference = LossReference(steps=steps)
        # "preference": L̃_cd = a_cd / (r_cd / tan θ_pref), so that L̃ at the reference points along p_pref.
        self._cd_tilt = 1.0
        if config.normalisation == "preference":
            x, y = preference_vectors(config.pareto.K)[config.pareto.preference_index]
            self._cd_tilt = y / x
        self._alpha: tuple[float, float] | None = None  # last solved weights (`autocdsr`)
        self._gram: tuple[float, float, float] | None = None  # last solve's (rr, rc, cc), reuse="gram"
        self.noise = NoiseEstimate(config.noise_decay) if config.noise_correction else None
        self._noise_share: tuple[float, float] | None = None  # of the last solve

    @property
    def weights(self) -> tuple[float, float]:
        """(α1, α2) the next reuse step would apply."""
        if self.config.method == "cd":
            return 1.0, 0.0
        if self.config.method == "fixed":
            return 1.0, self.config.fixed_weight
        return self._alpha if self._alpha is not None else (1.0, 0.0)

    def is_solve_step(self, step: int) -> bool:
        """True when `backward(step=step)` re-solves the weights (the first call always does)."""
        if self.config.method != "autocdsr" or 0 < step <= self._start_after:
            return False
        return self._alpha is None or step % self.config.update_every == 0

    def sync_context(self, model: nn.Module, step: int) -> contextlib.AbstractContextManager[Any]:
        """DDP's `no_sync()` on solve steps (the balancer reduces those gradients itself), else a no-op."""
        if self.is_solve_step(step) and isinstance(model, nn.parallel.DistributedDataParallel):
            return model.no_sync()
        return contextlib.nullcontext()

    def backward(
        self,
        loss_rec: torch.Tensor,
        a_cd: torch.Tensor | None,
        shared_params: Iterable[torch.Tensor],
        all_params: Iterable[torch.Tensor],
        step: int,
    ) -> BalanceInfo:
        """Set `.grad` of `all_params` to this step's update and return what was applied.

        loss_rec: scalar L_rec of this rank's batch (Eq. 4). a_cd: scalar L_cd-attn = a_cd (Eq. 5 / 13),
        differentiable; may be None only for `cd`. shared_params ⊆ all_params: see the module docstring.
        """
        method = self.config.method
        if a_cd is None and method != "cd":
            raise ValueError(f"LossBalancer.backward: method {method!r} needs a_cd, got None")
        params = [p for p in all_params if p.requires_grad]
        for p in params:
            p.grad = None
        a_cd_local = a_cd.detach() if a_cd is not None else torch.full_like(loss_rec, math.nan)
        solve_step = self.is_solve_step(step)
        resolve = (
            not solve_step and self.config.reuse == "gram" and self._gram is not None and a_cd is not None
        )
        # One host sync for the logged values and, when re-solving from the kept Gram matrix, the losses'
        # mean over ranks (every rank then solves the same problem, as on solve steps).
        dtype = torch.promote_types(loss_rec.dtype, torch.float32)
        values = torch.stack([loss_rec.detach().to(dtype), a_cd_local.to(dtype)])
        world = _world_size()
        if resolve and world > 1:
            values = torch.cat([values, _mean_over_ranks(values.clone(), world)])
        numbers = values.tolist()
        loss_value, a_cd_value = numbers[:2]

        result = None
        self._noise_share = None
        if solve_step:
            assert a_cd is not None
            result = self._solve_step(loss_rec, a_cd, shared_params, params)
            if result is not None:
                self._alpha = (result.alpha1, result.alpha2)
            alpha1, alpha2 = self.weights
        else:
            if resolve:
                assert self._gram is not None
                mean_losses = numbers[2:] or numbers[:2]
                if all(map(math.isfinite, mean_losses)):  # else every rank keeps the last weights
                    result = self._solve_weights(self._gram, (mean_losses[0], mean_losses[1]))
                    self._alpha = (result.alpha1, result.alpha2)
            alpha1, alpha2 = self.weights
            plain = a_cd is None or method == "cd" or (alpha1, alpha2) == (1.0, 0.0)
            total = loss_rec if plain else alpha1 * loss_rec + alpha2 * a_cd
            total.backward()
        return BalanceInfo(
            step=step,
            alpha1=alpha1,
            alpha2=alpha2,
            loss_rec=loss_value,
            a_cd=a_cd_value,
            solved=solve_step and result is not None,
            pareto=result,
            noise_share=self._noise_share,
        )

    def _solve_step(
        self,
        loss_rec: torch.Tensor,
        a_cd: torch.Tensor,
        shared_params: Iterable[torch.Tensor],
        params: list[torch.Tensor],
    ) -> ParetoResult | None:
        shared = [p for p in shared_params if p.requires_grad]
        if not shared:
            raise ValueError(
                "LossBalancer: `shared_params` has no trainable parameter to build the Gram matrix on"
            )
        param_ids = {id(p) for p in params}
        if any(id(p) not in param_ids for p in shared):
            raise ValueError("LossBalancer: every tensor of `shared_params` must also be in `all_params`")
        shared_ids = {id(p) for p in shared}
        others = [p for p in params if id(p) not in shared_ids]
        inputs = shared + others

        # Step 1: the two backward passes, on clean state (never `.grad`).
        g_rec = torch.autograd.grad(loss_rec, inputs, retain_graph=a_cd.requires_grad, materialize_grads=True)
        if a_cd.requires_grad:
            g_cd = torch.autograd.grad(a_cd, inputs, materialize_grads=True)
        else:  # a_cd is a constant (e.g. no attention in the graph): its gradient is zero
            g_cd = tuple(torch.zeros_like(p) for p in inputs)

        # Step 2: [g_rec_shared | g_cd_shared | L_rec, a_cd], averaged over ranks in one collective.
        world = _world_size()
        dtype = torch.promote_types(shared[0].dtype, torch.float32)
        n_shared = sum(p.numel() for p in shared)
        k = len(shared)
        flat = torch.cat(
            [g.reshape(-1).to(dtype) for g in (*g_rec[:k], *g_cd[:k])]
            + [torch.stack([loss_rec.detach().to(dtype), a_cd.detach().to(dtype)])]
        )
        _mean_over_ranks(flat, world)
        g_rec_shared, g_cd_shared = flat[:n_shared], flat[n_shared : 2 * n_shared]

        # Step 3: Gram matrix (three dot products, one host sync) and the Pareto weights (Eq. 8-12).
        # Autocast would run the dot products in bf16 (3 significant digits); the Gram matrix needs fp32.
        with torch.autocast(flat.device.type, enabled=False):
            dots = torch.stack(
                [g_rec_shared @ g_rec_shared, g_rec_shared @ g_cd_shared, g_cd_shared @ g_cd_shared]
            )
            change = None if self.noise is None else self.noise.change(flat[: 2 * n_shared], n_shared)
        values = torch.cat([dots, flat[2 * n_shared :]] + ([] if change is None else [change])).tolist()
        rr, rc, cc, mean_loss_rec, mean_a_cd = values[:5]
        if all(map(math.isfinite, values[:5])):
            if self.noise is not None:  # a change against a non-finite previous solve is no estimate
                change_values = values[5:] if all(map(math.isfinite, values[5:])) else []
                (rr, rc, cc), self._noise_share = self.noise.correct(rr, rc, cc, change_values or None)
            self._gram = (rr, rc, cc)
            result = self._solve_weights(self._gram, (mean_loss_rec, mean_a_cd))
            alpha1, alpha2 = result.alpha1, result.alpha2
        else:
            # A non-finite loss or gradient on any rank reaches every rank through the all-reduce: all keep
            # their previous weights and write the (non-finite) update, for the trainer's NaN policy to see.
            result = None
            alpha1, alpha2 = self.weights

        # Step 4: .grad = α1 g_rec + α2 g_cd; shared part already averaged, the rest averaged here.
        _assign_grads(shared, g_rec_shared.mul(alpha1).add_(g_cd_shared, alpha=alpha2))
        if others:
            combined = [r.mul(alpha1).add_(c, alpha=alpha2) for r, c in zip(g_rec[k:], g_cd[k:], strict=True)]
            if world > 1:
                _assign_grads(others, _mean_over_ranks(torch.cat([g.reshape(-1) for g in combined]), world))
            else:
                for p, g in zip(others, combined, strict=True):
                    p.grad = g
        return result

    def _solve_weights(self, gram: tuple[float, float, float], losses: tuple[float, float]) -> ParetoResult:
        """Eq. 8-12 on the Gram matrix (rr, rc, cc) of the shared gradients and the (cross-rank mean) losses,
        which first join the loss references."""
        self.reference.update(losses)
        r_rec, r_cd = self.reference.scale
        rr, rc, cc = gram
        return solve([[rr, rc], [rc, cc]], losses, self.config.pareto, (r_rec, r_cd / self._cd_tilt))

    def restart_cd_reference(self) -> None:
        """a_cd now measures something else (the gate changed its query weights): its loss reference is taken
        again from the next solves, the noise estimate skips the change across the switch, and (reuse="gram")
        the kept Gram matrix, which holds the old a_cd's gradient, waits for the next solve step."""
        self.reference.restart(1)
        self._gram = None
        if self.noise is not None:
            self.noise.previous = None

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "alpha": self._alpha,
            "reference": self.reference.state_dict(),
            "gram": None if self._gram is None else list(self._gram),
        }
        if self.noise is not None:
            state["noise"] = self.noise.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        alpha = state["alpha"]
        self._alpha = None if alpha is None else (float(alpha[0]), float(alpha[1]))
        gram = state.get("gram")  # absent in checkpoints written before `reuse`
        self._gram = None if gram is None else (float(gram[0]), float(gram[1]), float(gram[2]))
        self.reference.load_state_dict(state["reference"])
        if self.noise is not None and state.get("noise") is not None:
            self.noise.load_state_dict(state["noise"])
