"""`python -m autocdsr.train --data OUT [--config conf/train/NAME.yaml] [key=value ...]`

Trains SASRec / BERT4Rec with `single`, `cd`, `cd+autocdsr`, `cd+autocdsr_plus` or `cd+fixed` on the
shards of `jobs/build_sequences.py`, with Ray Train (DDP over `train.num_workers` workers, CPU or GPU),
streaming the training split with Ray Data, and tracks everything in one MLflow run.

The same command runs on a laptop (it starts a local Ray) and on a cluster:
    ray job submit --address http://HEAD:8265 --working-dir . -- python -m autocdsr.train --data s3://... ...
(inside a Ray job `ray.init()` joins the job's cluster; `RAY_ADDRESS` does the same from a shell).
On a cluster, `train.storage_path` and the MLflow tracking URI must be shared storage / a server.

Before any Ray worker starts, the data folder is checked against its manifest (schema version, Parquet
file count and rows per split, readable footers) and fingerprinted; the workers re-check the fingerprint
at every pass start and evaluation and stop on any change. Paths: --data must be a dataset folder;
train.storage_path and a local SQLite store must lie outside it; relative paths are resolved against
the working directory. Credentials come from the environment only (MLFLOW_TRACKING_TOKEN,
MLFLOW_TRACKING_PASSWORD, AWS_*, AZURE_STORAGE_*, ...): a credential-like config key, or a URI with a
password or a signed query, is refused (docs/configuration.md, "Paths and credentials").

Faults that restarting cannot fix (non-finite loss with train.nan_policy=stop, data changed) are not
retried; worker failures are, train.max_failures times, from the last checkpoint. The MLflow run ends
FINISHED, FAILED (with the tag autocdsr.status_reason) or KILLED (Ctrl-C, SIGTERM); a run whose driver
was SIGKILLed is marked KILLED by the next autocdsr.train/compare on the host, and --resume continues it.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import socket
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

from autocdsr import evaluation, security, tracking
from autocdsr.config import METHODS, TrainConfig, load_train_config
from autocdsr.configtools import ConfigError, flatten
from autocdsr.data.batching import ib_plan_spec, training_domain_table
from autocdsr.data.loader import SequenceCollate, copies_per_pass, train_dataset
from autocdsr.data.shards import (
    DataChangedError,
    DatasetError,
    DatasetInfo,
    check_files,
    describe_changes,
    open_dataset,
    verify_unchanged,
)
from autocdsr.training import NonFiniteError, train_worker

log = logging.getLogger("autocdsr.train")

# Errors a restart from the last checkpoint cannot fix: a worker returns them (instead of raising, which
# Ray Train would retry train.max_failures times) and `fit` raises them on the driver.
FATAL_ERRORS: dict[str, type[Exception]] = {
    e.__name__: e for e in (NonFiniteError, DataChangedError, DatasetError)
}
FATAL_KEY = "fatal_error"


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
            ib_plan=ib_plan_spec(cfg, info),
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
            # Ray moves batches of tensors; an AutoCDSR⁺ batch also holds its packing plan (a host object),
            # which Ray passes through unmoved: the training loop moves its tensors
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


def worker_entry(loop_config: dict[str, Any]) -> dict[str, Any]:
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
    try:
        info = dataclasses.replace(open_dataset(loop_config["data"]), files=loop_config.get("files"))
    except DatasetError as e:  # the folder changed or vanished since the driver checked it
        return {FATAL_KEY: str(e), "fatal_type": type(e).__name__}
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
        final: dict[str, Any] = train_worker(
            cfg, info, ctx, log_metrics=logger, restrict_domain=loop_config["restrict_domain"]
        )
    except tuple(FATAL_ERRORS.values()) as e:
        # Every rank raises these at the same step (the ranks agree through a collective), so all return.
        if ctx.rank == 0:
            logging.getLogger("autocdsr.train").error("%s: %s", type(e).__name__, e)
        final = {FATAL_KEY: str(e), "fatal_type": type(e).__name__}
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
        "`--show-config` prints every key with its value; docs/configuration.md explains each. "
        "Paths: train.storage_path and a sqlite:/// tracking store must lie outside --data; relative paths "
        "are resolved against the working directory. Keys or URIs holding credentials are refused. "
        "Exit status: 0 done, 1 training failed (non-finite loss, worker failures beyond "
        "train.max_failures), 2 bad config or data (including data changed during training), 130 interrupted.",
    )
    p.add_argument(
        "--data",
        required=True,
        help="OUT folder of jobs/build_sequences.py (local path or URI; holds manifest.json and _SUCCESS; "
        "no credentials in the URI: they come from the environment)",
    )
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
    # The dashboard (on localhost; ray[default] is a dependency) serves the State API: Ray Train V2's
    # PlacementGroupCleaner asks it every second whether the controller lives. Without it (Ray then loads
    # only its usage-stats module) every query fails and logs "Failed to query Ray Train Controller actor
    # state" once a second, and a dead controller's placement group would never be freed.
    # The cleaner's query names no cluster, so Ray looks for one on the host, and with a second local Ray
    # alive there (another run, a test session) the first query raises "Found multiple active Ray instances",
    # which ends the cleaner's monitor thread for good (Ray 2.60 catches only State API errors there). The
    # workers are therefore told which API server is theirs: the dashboard's port is chosen here and passed
    # to every task and actor of this job (children inherit the runtime environment) as
    # RAY_API_SERVER_ADDRESS, which the State API reads before anything else.
    port = _free_local_port()
    env["env_vars"]["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    context = ray.init(
        num_cpus=max(int(need) + 4, os.cpu_count() or 2),
        runtime_env=env,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=port,
    )
    if not str(context.dashboard_url or "").endswith(f":{port}"):
        log.warning(
            "Ray's dashboard is at %r, not on port %d: with another local Ray on this host, Ray Train's "
            "placement-group cleaner cannot reach the State API ('Found multiple active Ray instances') and "
            "would not free a dead run's placement group; training itself is not affected",
            context.dashboard_url,
            port,
        )


def _free_local_port(preferred: int = 8265) -> int:
    """`preferred` (Ray's usual dashboard port) when nothing listens on it on 127.0.0.1, else a port the
    OS picks."""
    for port in (preferred, 0):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise OSError("no free TCP port on 127.0.0.1 for Ray's dashboard")


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
            "files": info.files,
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
            storage_path=cfg.train.storage_path,  # absolute: `run` calls `check_paths` first
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
        datasets={"train": train_dataset(info, copies, cfg.seed)},
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )
    result = trainer.fit()
    value = dict(result.return_value or {})
    if FATAL_KEY in value:
        raise FATAL_ERRORS.get(str(value.get("fatal_type")), RuntimeError)(value[FATAL_KEY])
    ckpt = result.checkpoint.path if result.checkpoint is not None else None
    return value, ckpt


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
    cfg, data = check_paths(cfg, data)
    # Before any MLflow run or Ray worker exists: schema version, files and rows against the manifest.
    info = check_files(open_dataset(data))
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
        if status == "RUNNING" and tracking.driver_alive(run_tags := tracking.run_tags(uri, run_id)):
            raise ConfigError(
                f"--resume: run {cfg.run_name!r} ({run_id}) is RUNNING in a live driver process on this host "
                f"({run_tags.get('autocdsr.driver.pid')}); stop it first"
            )
        check_same_data(uri, run_id, info)
        tracking.mark_running(uri, run_id, status)
        log.info("resuming MLflow run %s (%s, was %s)", run_id, cfg.run_name, status)
    tracking.reap_stale_runs(uri, cfg.mlflow.experiment, f"autocdsr.train (run {cfg.run_name!r})")
    if run_id is None:
        tags = {
            "data.path": info.root,
            "data.manifest_sha256": info.manifest_sha256,
            "method": cfg.method,
            "backbone": cfg.model.backbone,
            **{f"data.{k}": str(v) for k, v in info.manifest["counts"].items() if not isinstance(v, dict)},
        }
        run_id = tracking.start_run(uri, cfg.mlflow.experiment, cfg.run_name, cfg.to_dict(), tags)
        tracking.log_fingerprint(uri, run_id, info.manifest_sha256, info.files)
    log.info("MLflow run %s (%s) in %s", run_id, cfg.run_name, uri)
    if fit_fn is None:
        init_ray(cfg, ray_address)
        fit_fn = fit
    started = time.monotonic()
    status, reason = "FAILED", None
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
        verify_unchanged(info)  # the logged model copies items/: they must be the ones trained on
        tracking.log_results(uri, run_id, cfg, info, metrics, checkpoint, summary)
        status = "FINISHED"
        return summary
    except (KeyboardInterrupt, SystemExit) as e:  # Ctrl-C; SIGTERM (ray.init's handler calls sys.exit)
        status, reason = "KILLED", f"interrupted ({type(e).__name__} {e}); --resume continues it"
        raise
    except BaseException as e:
        reason = f"{type(e).__name__}: {e}"
        raise
    finally:
        tracking.end_run(uri, run_id, status, reason)


def check_same_data(uri: str, run_id: str, info: DatasetInfo) -> None:
    """--resume continues on the data the run started on: the same manifest, the same files and sizes
    (modification times may differ: a restored or copied folder). Raises DatasetError naming the change."""
    saved = tracking.load_fingerprint(uri, run_id)
    if saved is None:
        log.warning(
            "run %s has no %s (older version): cannot check that --resume sees the same data",
            run_id, tracking.FINGERPRINT_ARTIFACT,
        )  # fmt: skip
        return
    if saved["manifest_sha256"] != info.manifest_sha256:
        raise DatasetError(
            f"--resume: {info.root}/manifest.json differs from the one run {run_id} started on (sha256 "
            f"{saved['manifest_sha256'][:12]}... now {info.manifest_sha256[:12]}...): the data was rebuilt; "
            "start a new run, or point --data at the folder it trained on"
        )
    before = {k: (int(v[0]), None) for k, v in saved["files"].items()}
    now = {k: (int(v[0]), None) for k, v in (info.files or {}).items()}
    changes = describe_changes(before, now)
    if changes:
        raise DatasetError(
            f"--resume: {info.root} is not the data run {run_id} started on: {'; '.join(changes[:10])}"
        )


def check_paths(cfg: TrainConfig, data: str) -> tuple[TrainConfig, str]:
    """Validate --data, train.storage_path and the tracking URI (autocdsr.security); return the config
    with train.storage_path made absolute and the absolute data path."""
    data = security.check_dataset_folder(data)
    storage = security.resolve_local(cfg.train.storage_path or "ray_results")
    uri = tracking.tracking_uri(cfg.mlflow.tracking_uri)
    security.check_training_paths(data, storage, uri, _local_artifacts(uri))
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, storage_path=storage))
    return cfg, data


def _local_artifacts(uri: str) -> str | None:
    location = tracking.artifact_location(uri)
    return location[len("file://") :] if location and location.startswith("file://") else None


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
    # SIGTERM (e.g. `ray job stop`, a scheduler) ends the run like Ctrl-C: marked KILLED, resumable.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        summary = run(cfg, args.data, resume=cfg.train.resume, ray_address=args.ray_address)
    except (DatasetError, ConfigError) as e:
        log.error("%s", e)
        return 2
    except NonFiniteError as e:
        log.error("%s", e)
        return 1
    except ray.train.TrainingFailedError as e:
        log.error(
            "training failed (worker failures beyond train.max_failures=%d): %s", cfg.train.max_failures, e
        )
        return 1
    except KeyboardInterrupt:
        log.error("interrupted; the MLflow run is marked KILLED and `--resume` continues it")
        return 130
    print(tracking.format_summary(summary))
    print(f"\nOpen the MLflow UI:  {tracking.ui_command(summary['tracking_uri'])}")
    return 0


def _interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


if __name__ == "__main__":
    sys.exit(main())
