"""`python -m autocdsr.train --data OUT [--config conf/train/NAME.yaml] [key=value ...]`

Trains SASRec / BERT4Rec with `single`, `cd`, `cd+autocdsr`, `cd+autocdsr_plus` or `cd+fixed` on the
shards of `jobs/build_sequences.py`, with Ray Train (DDP over `train.num_workers` workers, CPU or GPU),
streaming the training split with Ray Data, and tracks everything in one MLflow run.

The same command runs on a laptop (it starts a local Ray) and on a cluster:
    ray job submit --address http://HEAD:8265 --working-dir . -- python -m autocdsr.train --data s3://... ...
(inside a Ray job `ray.init()` joins the job's cluster; `RAY_ADDRESS` does the same from a shell).
On a cluster, `train.storage_path` and the MLflow tracking URI must be shared storage / a server.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
import ray.train
import torch
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from autocdsr import evaluation, tracking
from autocdsr.config import METHODS, TrainConfig, load_train_config
from autocdsr.configtools import ConfigError, flatten
from autocdsr.data.loader import SequenceCollate, copies_per_pass, train_dataset, training_domain_table
from autocdsr.data.shards import DatasetError, DatasetInfo, open_dataset
from autocdsr.training import train_worker

log = logging.getLogger("autocdsr.train")


# ----------------------------------------------------------------------------- worker side
class RayContext:
    """The WorkerContext of autocdsr.training, backed by Ray Train."""

    def __init__(self, cfg: TrainConfig, info: DatasetInfo, restrict_domain: int | None) -> None:
        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.device = ray.train.torch.get_device() if cfg.train.use_gpu else torch.device("cpu")
        self._cfg = cfg
        self._shard = ray.train.get_dataset_shard("train")
        self._collate = SequenceCollate(
            cfg,
            restrict_domain,
            info.vocab.num_items + 1,  # ModelConfig.mask_token: BERT4Rec's [MASK] follows the last item
            seed=cfg.seed * 7919 + self.rank,
            domain_table=training_domain_table(cfg, info),
        )

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.world_size == 1:
            return model.to(self.device)
        return ray.train.torch.prepare_model(
            model, parallel_strategy_kwargs={"find_unused_parameters": False}
        )

    def train_batches(self, epoch: int):
        self._collate.epoch = epoch
        return self._shard.iter_torch_batches(
            batch_size=self._cfg.train.batch_size,
            collate_fn=self._collate,
            drop_last=True,  # every rank runs the same number of steps
            local_shuffle_buffer_size=self._cfg.train.shuffle_buffer,
            local_shuffle_seed=self._cfg.seed * 100_003 + epoch * 101 + self.rank,
            device=self.device,
        )

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        ckpt = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=ckpt)

    def checkpoint_dir(self) -> str | None:
        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return None
        # Checkpoints live on local disk or a mounted shared path in this project's supported setups;
        # as_directory() would download a remote one.
        return ckpt.path if os.path.isdir(ckpt.path) else ckpt.to_directory()


def worker_entry(loop_config: dict[str, Any]) -> dict[str, float]:
    """Ray Train's train_loop_per_worker."""
    # Ray has configured the worker's root logger already (basicConfig would do nothing): give this
    # package's INFO messages (resume, early stop) their own handler so they reach the driver's output.
    pkg = logging.getLogger("autocdsr")
    pkg.setLevel(logging.INFO)
    if not pkg.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        pkg.addHandler(handler)
        pkg.propagate = False
    quiet_ray_train_reports()
    cfg: TrainConfig = loop_config["config"]
    info: DatasetInfo = open_dataset(loop_config["data"])
    ctx = RayContext(cfg, info, loop_config["restrict_domain"])
    logger = None
    if ctx.rank == 0 and loop_config.get("run_id"):
        mlog = tracking.MetricLogger(loop_config["tracking_uri"], loop_config["run_id"], cfg.train.log_every)
        # Provenance: which copy of the code the training workers ran (on a cluster: the job's uploaded
        # working_dir or the image's installed package; a stale install shadowing the new code shows here).
        mlog.client.set_tag(loop_config["run_id"], "code.worker_path", str(Path(__file__).resolve().parent))
        logger = mlog.step_logger(loop_config.get("metric_prefix", ""))

    monitor = None
    if ctx.rank == 0 and loop_config.get("run_id") and cfg.mlflow.system_metrics:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        # CPU/GPU/memory of rank 0's node, logged into the same run (resume_logging: after a restart too).
        monitor = SystemMetricsMonitor(
            loop_config["run_id"],
            sampling_interval=5,
            resume_logging=True,
            tracking_uri=loop_config["tracking_uri"],
        )
        monitor.start()
    try:
        final = train_worker(
            cfg, info, ctx, log_metrics=logger, restrict_domain=loop_config["restrict_domain"]
        )
    finally:
        if monitor is not None:
            monitor.finish()
    if logger is not None:
        mlog.flush()
    return final


def quiet_ray_train_reports() -> None:
    """Ray Train V2 logs every `ray.train.report` at INFO with the whole metrics dict (tens of lines per
    evaluation, per worker) from a logger named after its source file. The metrics are in MLflow and this
    package logs progress itself, so keep only its warnings."""
    try:
        from ray.train.v2._internal.execution import context as v2_context
    except ImportError:  # another Ray version: nothing to quiet
        return
    logging.getLogger(v2_context.__file__).setLevel(logging.WARNING)


# ----------------------------------------------------------------------------- driver side
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m autocdsr.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Overrides (key=value, dotted keys), e.g.: model.backbone=sasrec|bert4rec "
        f"method={'|'.join(METHODS)} data.max_len=N train.max_steps=N train.eval_every=N train.batch_size=N "
        "train.num_workers=N eval.num_negatives=N|all mlflow.experiment=NAME registry.name=NAME seed=N. "
        "`--show-config` prints every key with its value; docs/configuration.md explains each.",
    )
    p.add_argument("--data", required=True, help="OUT folder of jobs/build_sequences.py (local path or URI)")
    p.add_argument("--config", help="YAML training config (see conf/train/)")
    p.add_argument(
        "--resume", action="store_true", help="continue the run named by mlflow.run_name from its checkpoint"
    )
    p.add_argument("--show-config", action="store_true", help="print the resolved config and exit")
    p.add_argument(
        "--ray-address", default=None, help="Ray cluster address (default: $RAY_ADDRESS or a local Ray)"
    )
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    return p.parse_args(argv)


def init_ray(cfg: TrainConfig, address: str | None) -> None:
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    env = {
        "env_vars": {
            "PYTHONPATH": os.pathsep.join(filter(None, [str(Path.cwd()), os.environ.get("PYTHONPATH")]))
        }
    }
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=True)
        return
    # A local Ray: reserve more logical CPUs than the workers take so Ray Data's read tasks can run
    # (with exactly as many CPUs as workers, the data pipeline never gets one and training hangs).
    need = cfg.train.num_workers * cfg.train.cpus_per_worker
    ray.init(num_cpus=max(int(need) + 4, os.cpu_count() or 2), runtime_env=env, include_dashboard=False)


def ray_run_name(cfg: TrainConfig, run_id: str | None) -> str:
    """The Ray Train run (folder under train.storage_path) that belongs to MLflow run ``run_id``."""
    return f"{cfg.run_name}-{run_id[:12]}" if run_id else cfg.run_name


def fit(
    cfg: TrainConfig,
    info: DatasetInfo,
    run_id: str | None,
    uri: str,
    restrict_domain: int | None = None,
    name_suffix: str = "",
    metric_prefix: str = "",
) -> tuple[dict[str, float], str | None]:
    """One TorchTrainer run; returns (final metrics of rank 0, path of the last checkpoint)."""
    storage = cfg.train.storage_path or str(Path("ray_results").resolve())
    rows = info.split_rows("train")
    copies = copies_per_pass(rows, cfg.train.batch_size, cfg.train.num_workers)
    if copies > 1:
        log.info("train split is small (%d rows): each data pass yields %d shuffled copies", rows, copies)
    trainer = TorchTrainer(
        worker_entry,
        train_loop_config={
            "config": cfg,
            "data": info.root,
            "run_id": run_id,
            "tracking_uri": uri,
            "restrict_domain": restrict_domain,
            "metric_prefix": metric_prefix,
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.train.num_workers,
            use_gpu=cfg.train.use_gpu,
            resources_per_worker={
                "CPU": cfg.train.cpus_per_worker,
                **({"GPU": 1} if cfg.train.use_gpu else {}),
            },
        ),
        run_config=RunConfig(
            # One Ray Train run per MLflow run: `--resume` finds the MLflow run, hence this name, and Ray Train
            # restores its latest registered checkpoint; a fresh run never picks up an older run's state.
            name=ray_run_name(cfg, run_id) + name_suffix,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
        datasets={"train": train_dataset(info, copies, cfg.seed)},
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )
    result = trainer.fit()
    ckpt = result.checkpoint.path if result.checkpoint is not None else None
    return dict(result.return_value or {}), ckpt


Fit = Callable[..., tuple[dict[str, float], str | None]]


def run(
    cfg: TrainConfig,
    data: str,
    resume: bool = False,
    ray_address: str | None = None,
    fit_fn: Fit | None = None,
) -> dict[str, Any]:
    """Train, evaluate, log and register; returns a summary (run id, metrics, checkpoints, model version).

    ``fit_fn`` (same signature as `fit`) replaces the Ray Train run, e.g. by a single-process one for
    benchmarks on small data (bench/reproduce.py); everything else (MLflow run, `single`'s per-domain
    models, logged results) stays the same.
    """
    info = open_dataset(data)
    uri = tracking.tracking_uri(cfg.mlflow.tracking_uri)
    if cfg.mlflow.tracking_uri is None:
        os.environ.setdefault("MLFLOW_TRACKING_URI", uri)
    run_id = None
    if resume:
        found = tracking.find_run(uri, cfg.mlflow.experiment, cfg.run_name)
        if found is None:
            raise ConfigError(
                f"--resume: no run named {cfg.run_name!r} in experiment {cfg.mlflow.experiment!r} at {uri}; "
                "check mlflow.run_name / mlflow.experiment, or start a new run without --resume"
            )
        run_id, status = found
        if status == "FINISHED":
            raise ConfigError(
                f"--resume: run {cfg.run_name!r} ({run_id}) already FINISHED; start a new run without --resume"
            )
        tracking.mark_running(uri, run_id)
        log.info("resuming MLflow run %s (%s, was %s)", run_id, cfg.run_name, status)
    if run_id is None:
        tags = {
            "data.path": info.root,
            "data.manifest_sha256": info.manifest_sha256,
            "method": cfg.method,
            "backbone": cfg.model.backbone,
            **{f"data.{k}": str(v) for k, v in info.manifest["counts"].items() if not isinstance(v, dict)},
        }
        run_id = tracking.start_run(uri, cfg.mlflow.experiment, cfg.run_name, cfg.to_dict(), tags)
    log.info("MLflow run %s (%s) in %s", run_id, cfg.run_name, uri)
    if fit_fn is None:
        init_ray(cfg, ray_address)
        fit_fn = fit
    started = time.monotonic()
    ok = False
    try:
        if cfg.method == "single":
            metrics, checkpoints = {}, {}
            for d, name in enumerate(info.vocab.domains, start=1):
                if name not in info.vocab.domain_ranges:
                    continue
                log.info("single-domain model %d/%d: %s", d, info.vocab.num_domains, name)
                m, ckpt = fit_fn(
                    cfg, info, run_id, uri, d, name_suffix=f"-{name}", metric_prefix=f"single/{name}/"
                )
                checkpoints[name] = ckpt
                # Each domain's model answers for its own domain's targets only.
                metrics.update({k: v for k, v in m.items() if k.endswith(f"/{name}")})
            metrics.update(evaluation.overall_from_domains(metrics, info.vocab.domains))
            checkpoint = None
        else:
            metrics, checkpoint = fit_fn(cfg, info, run_id, uri)
            checkpoints = {"all": checkpoint}
        summary = {
            "run_id": run_id,
            "tracking_uri": uri,
            "metrics": metrics,
            "checkpoint": checkpoint,
            "checkpoints": checkpoints,  # `single`: one per domain
        }
        summary["train_seconds"] = time.monotonic() - started
        tracking.log_results(uri, run_id, cfg, info, metrics, checkpoint, summary)
        ok = True
        return summary
    finally:
        tracking.end_run(uri, run_id, ok)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        overrides = list(args.overrides) + (["train.resume=true"] if args.resume else [])
        cfg = load_train_config(args.config, overrides)
    except ConfigError as e:
        log.error("config: %s", e)
        return 2
    if args.show_config:
        for k, v in flatten(cfg.to_dict()).items():
            print(f"{k}={v}")
        return 0
    try:
        summary = run(cfg, args.data, resume=cfg.train.resume, ray_address=args.ray_address)
    except (DatasetError, ConfigError) as e:
        log.error("%s", e)
        return 2
    print(tracking.format_summary(summary))
    print(f"\nOpen the MLflow UI:  {tracking.ui_command(summary['tracking_uri'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
