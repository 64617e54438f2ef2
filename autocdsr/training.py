"""What one training worker does: ordinary PyTorch plus a small `WorkerContext` for the distributed edges.

`autocdsr.train` runs `train_worker` inside Ray Train (the context wraps `ray.train.report`,
`get_checkpoint`, `prepare_model` and the dataset shard); tests run it directly with `LocalContext`.

Per step (LossBalancer's contract): forward -> L_rec and a_cd -> balancer.backward (writes .grad: L_rec
only for `cd`/`single`, L_rec + w·a_cd for `cd+fixed`, Pareto-weighted for AutoCDSR/AutoCDSR⁺) ->
non-finite check -> clip -> AdamW step -> LR schedule step (warm-up then cosine, by steps).
Every `eval_every` steps: distributed validation (exact, see evaluation.py), early stopping on validation
NDCG@10 with patience, and a checkpoint holding the current and the best state. At the end the best
state is restored and evaluated once on test.

Faults (docs/reliability.md):
- Non-finite loss or gradients on any rank (the ranks agree through one tiny all-reduce per step):
  `train.nan_policy=stop` raises `NonFiniteError` naming the step, the pass, the batch's place in the pass,
  its shape and target count, and the rank(s); `skip` drops the batch (no optimizer, scheduler or
  balancer-weight update), counts it in `train/skipped_batches`, and raises once more than
  `train.max_skipped_batches` were dropped. Weights are also checked before every checkpoint.
- The data folder is compared with the fingerprint taken when the job started (`DatasetInfo.files`) at
  every pass start (the first one before any step) and before every evaluation; a change raises
  `DataChangedError` on every rank.
- Resume: a checkpoint also holds the RNG state and how many batches of the current pass were consumed;
  a resumed pass skips those, so a single-process resume (`LocalContext`, deterministic batches) continues
  bit-exactly where the interrupted run was.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from autocdsr import evaluation
from autocdsr.config import TrainConfig
from autocdsr.data import shards
from autocdsr.data.shards import DataChangedError, DatasetInfo
from autocdsr.models import build_model
from autocdsr.objectives.balancer import LossBalancer
from autocdsr.objectives.gate import HeldoutGate

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "state.pt"


class NonFiniteError(RuntimeError):
    """The loss, the gradients or the weights became NaN/Inf; the message names the step and the batch."""


class WorkerContext(Protocol):
    rank: int
    world_size: int
    device: torch.device

    def prepare(self, model: nn.Module) -> nn.Module: ...

    def train_batches(self, epoch: int) -> Iterable[dict[str, torch.Tensor]]: ...

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None) -> None: ...

    def checkpoint_dir(self) -> str | None: ...


@dataclass
class LocalContext:
    """Single process, no Ray: for tests, debugging and `local_fit` (bench/reproduce.py's CPU runs).

    Each reported checkpoint is moved into a fresh temporary folder (``last_checkpoint``) and the previous
    one this context made is deleted after it, so a run holds one checkpoint on disk, not one per report
    (on KuaiRand 460 MB each). A ``last_checkpoint`` passed in (a resume) belongs to the caller and stays.
    """

    batches: Callable[[int], Iterable[dict[str, torch.Tensor]]]
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    last_checkpoint: str | None = None
    reports: list[dict[str, float]] | None = None
    _made: str | None = field(default=None, init=False, repr=False)  # the folder this context created

    def prepare(self, model: nn.Module) -> nn.Module:
        return model.to(self.device)

    def train_batches(self, epoch: int) -> Iterable[dict[str, torch.Tensor]]:
        return self.batches(epoch)

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        if self.reports is not None:
            self.reports.append(dict(metrics))
        if checkpoint_dir is not None:
            keep = tempfile.mkdtemp(prefix="autocdsr-ckpt-")
            os.replace(os.path.join(checkpoint_dir, CHECKPOINT_FILE), os.path.join(keep, CHECKPOINT_FILE))
            previous, self.last_checkpoint, self._made = self._made, keep, keep
            if previous is not None and os.path.isdir(previous):  # the new one is complete: drop the old
                shutil.rmtree(previous, ignore_errors=True)

    def checkpoint_dir(self) -> str | None:
        return self.last_checkpoint


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lr_lambda(warmup: int, total: int) -> Callable[[int], float]:
    """Linear warm-up to the base LR over `warmup` steps, then cosine decay to 0 at `total`."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in _unwrap(model).state_dict().items()}


@dataclass
class TrainState:
    """Loop counters; plain numbers so checkpoints load with torch.load(weights_only=True)."""

    step: int = 0
    epoch: int = 0
    best_metric: float = -1.0
    best_step: int = 0
    skipped_batches: int = 0
    pass_batches: int = 0  # batches of pass `epoch` consumed (trained on or skipped)


def _distributed(ctx: WorkerContext) -> bool:
    return ctx.world_size > 1 and dist.is_available() and dist.is_initialized()


def _gather(ctx: WorkerContext, value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order (a collective: every rank must call it)."""
    if not _distributed(ctx):
        return [value]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, value)
    return out


def _any_rank(ctx: WorkerContext, flag: bool) -> bool:
    """True when ``flag`` is set on any rank (a collective: one small all-reduce)."""
    if not _distributed(ctx):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def _verify_data(ctx: WorkerContext, info: DatasetInfo, when: str) -> None:
    """Compare the data folder with the job's fingerprint on every rank; all ranks raise if any rank saw a
    change (so none is left waiting in a collective)."""
    if info.files is None:
        return
    try:
        shards.verify_unchanged(info)
        problem = None
    except DataChangedError as e:
        problem = str(e)
    problems = [(r, p) for r, p in enumerate(_gather(ctx, problem)) if p is not None]
    if problems:
        rank, text = problems[0]
        raise DataChangedError(f"{when} (rank {rank}): {text}")


def _cycle(
    ctx: WorkerContext, state: TrainState, info: DatasetInfo
) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """(index in the pass, batch), pass after pass. A resumed pass first skips the batches the interrupted
    run consumed (`state.pass_batches`), reading them so that seeded per-pass randomness stays aligned."""
    while True:
        _verify_data(ctx, info, f"data check at the start of pass {state.epoch}")
        n = 0
        for batch in ctx.train_batches(state.epoch):
            n += 1
            if n <= state.pass_batches:
                continue
            state.pass_batches = n
            yield n - 1, batch
        if n == 0:
            raise RuntimeError(
                "the training split yielded no batch: is train.batch_size larger than the data?"
            )
        state.epoch += 1
        state.pass_batches = 0


def _heldout_gate(cfg: TrainConfig, info: DatasetInfo, ctx: WorkerContext) -> HeldoutGate | None:
    """The held-out gate with this rank's share of the `valid` split (at most gate.max_sequences)."""
    gate = cfg.autocdsr.gate
    if not cfg.gate_active:
        return None
    items: list[np.ndarray] = []
    domains: list[np.ndarray] = []
    for batch in shards.iter_eval_rows(
        info, "valid", ctx.rank, ctx.world_size, 4096, ("item_idx", "domain_idx")
    ):
        items += shards.list_arrays(batch.column("item_idx"))
        domains += shards.list_arrays(batch.column("domain_idx"))
        if len(items) >= gate.max_sequences:
            break
    n = min(len(items), gate.max_sequences)
    return HeldoutGate(
        gate,
        int(cfg.balancer.start_after),
        cfg.data.max_len,
        cfg.seed,
        ctx.rank,
        items[:n],
        domains[:n],
        info.vocab.num_domains,
    )


def _describe_batch(batch: dict[str, torch.Tensor], index: int, state: TrainState, num_targets: int) -> str:
    shape = "x".join(str(d) for d in batch["item_idx"].shape)
    return f"pass {state.epoch}, batch {index} of the pass ({shape} items, {num_targets} target positions)"


def _non_finite_parameters(model: nn.Module) -> list[str]:
    return [name for name, p in _unwrap(model).named_parameters() if not torch.isfinite(p).all()]


def train_worker(
    cfg: TrainConfig,
    info: DatasetInfo,
    ctx: WorkerContext,
    log_metrics: Callable[[dict[str, float], int], None] | None = None,
    restrict_domain: int | None = None,
) -> dict[str, float]:
    """Train, early-stop, restore the best state, evaluate on test. Returns the final metrics (all ranks)."""
    seed_everything(cfg.seed * 1000 + ctx.rank)
    vocab = info.vocab
    model = build_model(
        cfg.model_config(vocab.num_items, vocab.num_domains, vocab.domains),
        vocab.item_domain,
        vocab.item_count,
    )
    model = model.to(ctx.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(cfg.train.warmup_steps, cfg.train.max_steps)
    )
    balancer = LossBalancer(cfg.balancer)
    gate = _heldout_gate(cfg, info, ctx)
    state = TrainState()
    best_weights: dict[str, torch.Tensor] | None = None

    resume_dir = ctx.checkpoint_dir()
    if resume_dir is not None:
        saved = torch.load(os.path.join(resume_dir, CHECKPOINT_FILE), map_location="cpu", weights_only=True)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        balancer.load_state_dict(saved["balancer"])
        if gate is not None and saved.get("gate") is not None:
            gate.load_state_dict(saved["gate"], model)
        state = TrainState(**saved["state"])
        best_weights = saved["best_model"]
        if ctx.rank == 0 and saved.get("rng") is not None:
            torch.set_rng_state(saved["rng"])  # dropout continues as in the interrupted run
        else:  # other ranks: a fresh stream per (seed, rank, step), never a copy of rank 0's
            torch.manual_seed(cfg.seed * 1000 + ctx.rank + 7_919 * state.step)
        log.info(
            "rank %d resumed from step %d (best %.4f at %d)",
            ctx.rank,
            state.step,
            state.best_metric,
            state.best_step,
        )

    ddp_model = ctx.prepare(model)
    shared = list(_unwrap(ddp_model).shared_parameters())
    params = [p for p in _unwrap(ddp_model).parameters() if p.requires_grad]
    autocast = cfg.train.mixed_precision and ctx.device.type == "cuda"
    batches = _cycle(ctx, state, info)  # checks the data at each pass start: the first before any step
    last_val: dict[str, float] = {}
    window = _ProgressWindow(state.step)
    deadline = None if cfg.train.max_minutes is None else time.monotonic() + 60.0 * cfg.train.max_minutes

    while state.step < cfg.train.max_steps:
        index, raw = next(batches)
        # tensors to the device; an AutoCDSR⁺ packing plan (models.ib.LayoutPlan) stays on the host
        batch = {k: v.to(ctx.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in raw.items()}
        step = state.step + 1
        if gate is not None and gate.due(step):
            result, changed = gate.run(_unwrap(ddp_model), shared, step)
            if changed:  # a_cd measures something else from now on
                balancer.restart_cd_reference()
            if log_metrics is not None:
                log_metrics(result.as_metrics(vocab.domains), step)
            if ctx.rank == 0:
                log.info(
                    "step %d: held-out gate u = (%s), query weights (%s)",
                    step,
                    ", ".join(
                        f"{d} {u:+.3g}" + ("" if result.se is None else f" ± {result.se[q]:.2g}")
                        for q, (d, u) in enumerate(zip(vocab.domains, result.u, strict=True))
                    ),
                    ", ".join(f"{d} {w:g}" for d, w in zip(vocab.domains, result.weights, strict=True)),
                )
        ddp_model.train()
        optimizer.zero_grad(set_to_none=True)
        with balancer.sync_context(ddp_model, step):
            with torch.autocast(ctx.device.type, torch.bfloat16, enabled=autocast):
                out = ddp_model(batch)
            # backward outside autocast (PyTorch's advice): its ops follow the forward's dtypes anyway
            info_b = balancer.backward(out.loss_rec, out.a_cd, shared, params, step)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip or float("inf"))
        # the last step: max_steps, or train.max_minutes spent on any rank (every rank agrees)
        last = step == cfg.train.max_steps or (
            deadline is not None and _any_rank(ctx, time.monotonic() >= deadline)
        )
        finite = math.isfinite(info_b.loss_rec) and bool(torch.isfinite(grad_norm))
        if _any_rank(ctx, not finite):  # every rank takes the same branch, as DDP needs
            local = (
                None
                if finite
                else f"rank {ctx.rank}: loss_rec={info_b.loss_rec}, grad_norm={float(grad_norm)}, "
                + _describe_batch(raw, index, state, out.num_targets)
            )
            where = f"step {step}: " + "; ".join(d for d in _gather(ctx, local) if d is not None)
            if cfg.train.nan_policy == "stop":
                raise NonFiniteError(
                    f"non-finite loss or gradients at {where}. Stopping (train.nan_policy=stop; "
                    "train.nan_policy=skip drops such batches)"
                )
            if state.skipped_batches >= cfg.train.max_skipped_batches:
                raise NonFiniteError(
                    f"non-finite loss or gradients at {where}. Stopping: {state.skipped_batches} batches "
                    f"were skipped already (train.max_skipped_batches={cfg.train.max_skipped_batches})"
                )
            state.skipped_batches += 1
            if ctx.rank == 0:
                log.warning(
                    "skipped batch %d/%d with non-finite loss or gradients at %s",
                    state.skipped_batches, cfg.train.max_skipped_batches, where,
                )  # fmt: skip
            if log_metrics is not None:
                log_metrics({"train/skipped_batches": float(state.skipped_batches)}, step)
            optimizer.zero_grad(set_to_none=True)
            state.step = step
            if step % cfg.train.eval_every != 0 and not last:
                continue
            # an evaluation step: evaluate and checkpoint the (unchanged) weights as usual
        else:
            optimizer.step()
            scheduler.step()
            state.step = step
            window.add(info_b.loss_rec, info_b.a_cd)
            if log_metrics is not None:
                metrics = {f"train/{k}": v for k, v in info_b.as_metrics().items()}
                metrics["train/lr"] = scheduler.get_last_lr()[0]
                metrics["train/grad_norm"] = float(grad_norm)
                log_metrics(metrics, step)

        if step % cfg.train.eval_every == 0 or last:
            bad = _non_finite_parameters(ddp_model)
            if bad:  # finite gradients can still overflow the weights (e.g. an absurd learning rate)
                raise NonFiniteError(
                    f"non-finite weights after step {step} (pass {state.epoch}): {', '.join(bad[:5])}"
                    f"{' ...' if len(bad) > 5 else ''}; stopping before they reach a checkpoint "
                    "(lower train.lr or set train.grad_clip)"
                )
            _verify_data(ctx, info, f"data check before the evaluation at step {step}")
            last_val = evaluation.evaluate_split(
                _unwrap(ddp_model), info, "valid", cfg.eval, ctx.rank, ctx.world_size, ctx.device,
                cfg.data.max_len, max_sequences=cfg.eval.max_val_sequences, restrict_domain=restrict_domain,
            )  # fmt: skip
            score = last_val["val/ndcg_10/all"]
            if score > state.best_metric:
                state.best_metric, state.best_step = score, step
                best_weights = _cpu_state(ddp_model)
            if log_metrics is not None:
                log_metrics({**last_val, "val/best_ndcg_10": state.best_metric}, step)
            if ctx.rank == 0:
                log.info("%s", window.line(step, cfg.train.max_steps, balancer.weights, score, state))
            stop = step - state.best_step >= cfg.train.patience
            _save_and_report(ctx, model, optimizer, scheduler, balancer, state, best_weights, last_val, gate)
            if stop:
                log.info(
                    "early stop at step %d: best val NDCG@10 %.4f at step %d",
                    step,
                    state.best_metric,
                    state.best_step,
                )
                break
            if last and step < cfg.train.max_steps:
                log.info("stopping at step %d: train.max_minutes=%g spent", step, cfg.train.max_minutes)
                break

    if best_weights is not None:
        _unwrap(ddp_model).load_state_dict(best_weights)
    _verify_data(ctx, info, "data check before the test evaluation")
    test = evaluation.evaluate_split(
        _unwrap(ddp_model), info, "test", cfg.eval, ctx.rank, ctx.world_size, ctx.device,
        cfg.data.max_len, restrict_domain=restrict_domain,
    )  # fmt: skip
    final = {**test, "best_step": float(state.best_step), "val/best_ndcg_10": state.best_metric}
    final["stopped_step"] = float(state.step)
    final["train/skipped_batches"] = float(state.skipped_batches)
    if log_metrics is not None:
        log_metrics(final, state.step)
    return final


class _ProgressWindow:
    """Means since the last progress line, for one readable line per evaluation on rank 0."""

    def __init__(self, step: int) -> None:
        self.reset(step)

    def reset(self, step: int) -> None:
        self.start_step, self.started = step, time.monotonic()
        self.loss, self.a_cd, self.n = 0.0, 0.0, 0

    def add(self, loss_rec: float, a_cd: float) -> None:
        self.loss += loss_rec
        self.a_cd += a_cd if math.isfinite(a_cd) else 0.0
        self.n += 1

    def line(
        self, step: int, max_steps: int, alpha: tuple[float, float], score: float, state: TrainState
    ) -> str:
        elapsed = time.monotonic() - self.started
        n = max(self.n, 1)
        text = (
            f"step {step}/{max_steps}: loss_rec {self.loss / n:.4f}, a_cd {self.a_cd / n:.4f}, "
            f"alpha ({alpha[0]:.3f}, {alpha[1]:.3f}), val NDCG@10 {score:.4f} "
            f"(best {state.best_metric:.4f} at {state.best_step}), "
            f"{(step - self.start_step) / max(elapsed, 1e-9):.2f} steps/s incl. evaluation"
        )
        self.reset(step)
        return text


def _save_and_report(
    ctx: WorkerContext,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    balancer: LossBalancer,
    state: TrainState,
    best_weights: dict[str, torch.Tensor] | None,
    metrics: dict[str, float],
    gate: HeldoutGate | None = None,
) -> None:
    """Every rank calls report the same number of times; only rank 0 hands over a checkpoint."""
    reported = {**metrics, "step": float(state.step), "best_step": float(state.best_step)}
    if ctx.rank != 0:
        ctx.report(reported, None)
        return
    with tempfile.TemporaryDirectory(prefix="autocdsr-ckpt-") as tmp:
        torch.save(
            {
                "model": _unwrap(model).state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "balancer": balancer.state_dict(),
                "state": dataclasses.asdict(state),
                "best_model": best_weights,
                "rng": torch.get_rng_state(),  # rank 0's dropout stream, for an exact resume
                "gate": None if gate is None else gate.state_dict(),
            },
            os.path.join(tmp, CHECKPOINT_FILE),
        )
        ctx.report(reported, tmp)


def local_fit(
    cfg: TrainConfig,
    info: DatasetInfo,
    run_id: str | None,
    uri: str,
    restrict_domain: int | None = None,
    name_suffix: str = "",
    metric_prefix: str = "",
    *,
    context: Callable[[DatasetInfo, TrainConfig, int | None], LocalContext] | None = None,
    on_step: Callable[[int], None] | None = None,
    keep_in: str | Path | None = None,
) -> tuple[dict[str, float], str | None]:
    """`autocdsr.train.fit` (same signature) in this process, for `train.run(..., fit_fn=...)`: the loop
    every Ray worker runs, logging to MLflow run ``run_id`` as rank 0 does. Returns (final metrics, the last
    checkpoint folder).

    ``context(info, cfg, restrict_domain)`` makes the `LocalContext` (default: the in-memory train split,
    `single`: of ``restrict_domain``); ``on_step(step)`` runs after every logged training step (e.g. to
    change files mid-run); with ``keep_in`` the last checkpoint is moved to ``keep_in/<run name><suffix>/``
    (replacing an older one) instead of staying in a temporary folder.
    """
    from autocdsr import tracking
    from autocdsr.data.memory import in_memory_batches

    if context is None:
        ctx = LocalContext(in_memory_batches(info, cfg, restrict_domain))
    else:
        ctx = context(info, cfg, restrict_domain)
    mlog = tracking.MetricLogger(uri, run_id, cfg.train.log_every) if run_id else None
    step_log = mlog.step_logger(metric_prefix) if mlog is not None else None

    def log_metrics(metrics: dict[str, float], step: int) -> None:
        if step_log is not None:
            step_log(metrics, step)
        if on_step is not None and any(k.startswith("train/") for k in metrics):
            on_step(step)

    try:
        final = train_worker(cfg, info, ctx, log_metrics=log_metrics, restrict_domain=restrict_domain)
    finally:
        if mlog is not None:
            mlog.flush()
    if keep_in is None or ctx.last_checkpoint is None:
        return final, ctx.last_checkpoint
    keep = Path(keep_in) / f"{cfg.run_name}{name_suffix}"
    if keep.exists():
        shutil.rmtree(keep)
    keep.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(ctx.last_checkpoint, keep)
    return final, str(keep)


def load_best_state(checkpoint_dir: str) -> dict[str, torch.Tensor]:
    """The best model weights kept in a training checkpoint (what gets logged and registered)."""
    saved = torch.load(os.path.join(checkpoint_dir, CHECKPOINT_FILE), map_location="cpu", weights_only=True)
    return saved["best_model"] if saved["best_model"] is not None else saved["model"]


def load_best_model(cfg: TrainConfig, info: DatasetInfo, checkpoint_dir: str) -> torch.nn.Module:
    """The model ``cfg`` describes with the best weights of a training checkpoint, on the CPU, in eval mode."""
    vocab = info.vocab
    model = build_model(
        cfg.model_config(vocab.num_items, vocab.num_domains, vocab.domains),
        vocab.item_domain,
        vocab.item_count,
    )
    model.load_state_dict(load_best_state(checkpoint_dir))
    return model.eval()
