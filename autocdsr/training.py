"""What one training worker does: ordinary PyTorch plus a small `WorkerContext` for the distributed edges.

`autocdsr.train` runs `train_worker` inside Ray Train (the context wraps `ray.train.report`,
`get_checkpoint`, `prepare_model` and the dataset shard); tests run it directly with `LocalContext`.

Per step (LossBalancer's contract): forward -> L_rec and a_cd -> balancer.backward (writes .grad: L_rec
only for `cd`/`single`, L_rec + w·a_cd for `cd+fixed`, Pareto-weighted for AutoCDSR/AutoCDSR⁺) ->
non-finite check -> clip -> AdamW step -> LR schedule step (warm-up then cosine, by steps).
Every `eval_every` steps: distributed validation (exact, see evaluation.py), early stopping on validation
NDCG@10 with patience, and a checkpoint holding the current and the best state. At the end the best
state is restored and evaluated once on test.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import random
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from autocdsr import evaluation
from autocdsr.config import TrainConfig
from autocdsr.data.shards import DatasetInfo
from autocdsr.models import build_model
from autocdsr.objectives.balancer import LossBalancer

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "state.pt"


class NonFiniteError(RuntimeError):
    """The loss or the gradients became NaN/Inf; the message names the step and the batch."""


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
    """Single process, no Ray: for tests and debugging."""

    batches: Callable[[int], Iterable[dict[str, torch.Tensor]]]
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    last_checkpoint: str | None = None
    reports: list[dict[str, float]] | None = None

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
            self.last_checkpoint = keep

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


def _cycle(ctx: WorkerContext, state: TrainState) -> Iterator[dict[str, torch.Tensor]]:
    while True:
        n = 0
        for batch in ctx.train_batches(state.epoch):
            n += 1
            yield batch
        if n == 0:
            raise RuntimeError(
                "the training split yielded no batch: is train.batch_size larger than the data?"
            )
        state.epoch += 1


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
        cfg.model_config(vocab.num_items, vocab.num_domains), vocab.item_domain, vocab.item_count
    )
    model = model.to(ctx.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(cfg.train.warmup_steps, cfg.train.max_steps)
    )
    balancer = LossBalancer(cfg.balancer)
    state = TrainState()
    best_weights: dict[str, torch.Tensor] | None = None

    resume_dir = ctx.checkpoint_dir()
    if resume_dir is not None:
        saved = torch.load(os.path.join(resume_dir, CHECKPOINT_FILE), map_location="cpu", weights_only=True)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        balancer.load_state_dict(saved["balancer"])
        state = TrainState(**saved["state"])
        best_weights = saved["best_model"]
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
    batches = _cycle(ctx, state)
    last_val: dict[str, float] = {}
    window = _ProgressWindow(state.step)

    while state.step < cfg.train.max_steps:
        batch = {k: v.to(ctx.device, non_blocking=True) for k, v in next(batches).items()}
        step = state.step + 1
        ddp_model.train()
        optimizer.zero_grad(set_to_none=True)
        with (
            balancer.sync_context(ddp_model, step),
            torch.autocast(ctx.device.type, torch.bfloat16, enabled=autocast),
        ):
            out = ddp_model(batch)
            info_b = balancer.backward(out.loss_rec, out.a_cd, shared, params, step)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip or float("inf"))
        if not (math.isfinite(info_b.loss_rec) and torch.isfinite(grad_norm)):
            where = f"step {step} (epoch {state.epoch}, rank {ctx.rank}): loss_rec={info_b.loss_rec}, grad_norm={grad_norm.item()}"
            if cfg.train.nan_policy == "stop" or state.skipped_batches >= cfg.train.max_skipped_batches:
                raise NonFiniteError(f"non-finite loss or gradients at {where}; stopping (train.nan_policy)")
            log.warning("skipping batch with non-finite loss or gradients at %s", where)
            state.skipped_batches += 1
            optimizer.zero_grad(set_to_none=True)
            state.step = step
            continue
        optimizer.step()
        scheduler.step()
        state.step = step
        window.add(info_b.loss_rec, info_b.a_cd)
        if log_metrics is not None:
            metrics = {f"train/{k}": v for k, v in info_b.as_metrics().items()}
            metrics["train/lr"] = scheduler.get_last_lr()[0]
            metrics["train/grad_norm"] = float(grad_norm)
            log_metrics(metrics, step)

        if step % cfg.train.eval_every == 0 or step == cfg.train.max_steps:
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
            _save_and_report(ctx, model, optimizer, scheduler, balancer, state, best_weights, last_val)
            if stop:
                log.info(
                    "early stop at step %d: best val NDCG@10 %.4f at step %d",
                    step,
                    state.best_metric,
                    state.best_step,
                )
                break

    if best_weights is not None:
        _unwrap(ddp_model).load_state_dict(best_weights)
    test = evaluation.evaluate_split(
        _unwrap(ddp_model), info, "test", cfg.eval, ctx.rank, ctx.world_size, ctx.device,
        cfg.data.max_len, restrict_domain=restrict_domain,
    )  # fmt: skip
    final = {**test, "best_step": float(state.best_step), "val/best_ndcg_10": state.best_metric}
    final["stopped_step"] = float(state.step)
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
            },
            os.path.join(tmp, CHECKPOINT_FILE),
        )
        ctx.report(reported, tmp)


def load_best_state(checkpoint_dir: str) -> dict[str, torch.Tensor]:
    """The best model weights kept in a training checkpoint (what gets logged and registered)."""
    saved = torch.load(os.path.join(checkpoint_dir, CHECKPOINT_FILE), map_location="cpu", weights_only=True)
    return saved["best_model"] if saved["best_model"] is not None else saved["model"]
