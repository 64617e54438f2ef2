"""Everything MLflow: where runs go, what is logged, plots and tables.

One MLflow run per training, continuous across worker restarts: the driver creates it and hands its id to
the workers; rank 0 re-attaches to it (``MetricLogger``), and the id also travels in every checkpoint.

Run status: FINISHED when training and registration succeed; FAILED when they raise (worker failures
beyond ``train.max_failures``, non-finite loss, data changed, ...); KILLED on Ctrl-C / SIGTERM. The tag
``autocdsr.status_reason`` says why. A driver killed with SIGKILL (or a lost machine) cannot mark its run:
its tags ``autocdsr.driver.*`` name the host, pid and process start time, and the next ``autocdsr.train``
or ``autocdsr.compare`` on that host marks such a run KILLED once that process is gone (``reap_stale_runs``);
``--resume`` continues any unfinished run (RUNNING with a dead driver, KILLED or FAILED).

Credentials (``MLFLOW_TRACKING_TOKEN``, ``AWS_*``, ...) are read by MLflow from the environment and are
never logged: params come from the training config only, which holds no secrets (autocdsr.security
refuses credential-like keys and URIs with passwords), and ``safe_params`` refuses such keys again.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Metric, RunStatus

from autocdsr.configtools import flatten
from autocdsr.security import SECRET_KEY_RE

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
MAX_PARAM_LEN = 6000
STATUS_REASON_TAG = "autocdsr.status_reason"
DRIVER_TAGS = ("autocdsr.driver.host", "autocdsr.driver.pid", "autocdsr.driver.started")


def tracking_uri(configured: str | None = None) -> str:
    """Config value, else $MLFLOW_TRACKING_URI, else a SQLite file in the working directory.

    A relative ``sqlite:///file.db`` is made absolute so that Ray workers (other working directories)
    write to the same store as the driver on a single machine.
    """
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///") :]).resolve())
    return uri


def artifact_location(uri: str) -> str | None:
    """With a local SQLite store, keep artifacts beside it (./mlartifacts), as `mlflow server` would."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///") :]).parent / "mlartifacts").resolve().as_uri()
    return None


def ui_command(uri: str) -> str:
    if uri.startswith("sqlite:///"):
        art = artifact_location(uri) or ""
        return f"mlflow ui --backend-store-uri {uri} --default-artifact-root {art}"
    return f"open {uri} in a browser"


def safe_params(config: Mapping[str, Any]) -> dict[str, str]:
    """Flattened config as MLflow params; refuses anything that looks like a credential."""
    out = {}
    for k, v in flatten(config).items():
        if SECRET_KEY_RE.search(k):
            raise ValueError(
                f"config key {k!r} looks like a credential; pass credentials through the environment"
            )
        text = str(v)
        out[k] = text if len(text) <= MAX_PARAM_LEN else text[: MAX_PARAM_LEN - 3] + "..."
    return out


def get_or_create_experiment(client: MlflowClient, name: str, uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return client.create_experiment(name, artifact_location=artifact_location(uri))


def start_run(
    uri: str, experiment: str, run_name: str, params: Mapping[str, Any], tags: Mapping[str, str]
) -> str:
    """Create the run (status RUNNING), log params and tags; return its id."""
    client = MlflowClient(uri)
    exp_id = get_or_create_experiment(client, experiment, uri)
    run = client.create_run(exp_id, run_name=run_name, tags=dict(tags))
    from mlflow.entities import Param, RunTag

    items = list(safe_params(params).items())
    for i in range(0, len(items), 100):  # the REST API takes at most 100 params per batch
        client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in items[i : i + 100]])
    client.log_batch(run.info.run_id, tags=[RunTag("mlflow.runName", run_name)])
    set_driver_tags(client, run.info.run_id)
    return run.info.run_id


def _this_process() -> dict[str, str]:
    import psutil

    me = psutil.Process(os.getpid())
    return dict(zip(DRIVER_TAGS, (socket.gethostname(), str(me.pid), f"{me.create_time():.3f}"), strict=True))


def set_driver_tags(client: MlflowClient, run_id: str) -> None:
    """Record which process owns the run (host, pid, process start time): see ``reap_stale_runs``."""
    from mlflow.entities import RunTag

    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in _this_process().items()])


def driver_alive(tags: Mapping[str, str]) -> bool | None:
    """Whether the driver process named by a run's tags still runs: True/False on this host, None when
    unknown (another host, or a run without the tags)."""
    import psutil

    host, pid, started = (tags.get(k) for k in DRIVER_TAGS)
    if host != socket.gethostname() or pid is None or started is None:
        return None
    try:
        proc = psutil.Process(int(pid))
        # the same pid with another start time is another process (pid reuse)
        return abs(proc.create_time() - float(started)) < 1.0 and proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, ValueError):
        return False


def reap_stale_runs(uri: str, experiment: str, found_by: str) -> list[str]:
    """Mark KILLED every RUNNING run of ``experiment`` whose driver, on this host, is gone; return their ids.

    Runs of other hosts, and runs without driver tags, are left alone (nothing tells whether they still
    run) and logged. ``found_by`` goes into the ``autocdsr.status_reason`` tag.
    """
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    reaped = []
    running = client.search_runs([exp.experiment_id], filter_string="attributes.status = 'RUNNING'")
    for run in running:
        alive = driver_alive(run.data.tags)
        if alive is False:
            tags = run.data.tags
            reason = (
                f"driver pid {tags[DRIVER_TAGS[1]]} on {tags[DRIVER_TAGS[0]]} exited without ending the run "
                f"(killed or crashed); marked KILLED by {found_by} at {time.strftime('%Y-%m-%d %H:%M:%S')}; "
                "`python -m autocdsr.train --resume` with the same mlflow.run_name continues it"
            )
            client.set_tag(run.info.run_id, STATUS_REASON_TAG, reason)
            client.set_terminated(run.info.run_id, status=RunStatus.to_string(RunStatus.KILLED))
            log.warning("run %s (%s): %s", run.info.run_id, run.info.run_name, reason)
            reaped.append(run.info.run_id)
        elif alive is None:
            log.info(
                "run %s (%s) is RUNNING with a driver on another host or unknown; left as is",
                run.info.run_id, run.info.run_name,
            )  # fmt: skip
    return reaped


def find_run(uri: str, experiment: str, run_name: str) -> tuple[str, str] | None:
    """(run id, status) of the latest run of that name in the experiment, for --resume."""
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = client.search_runs(
        [exp.experiment_id], filter_string=f"attributes.run_name = '{run_name}'", max_results=1,
        order_by=["attributes.start_time DESC"],
    )  # fmt: skip
    return (runs[0].info.run_id, runs[0].info.status) if runs else None


FINGERPRINT_ARTIFACT = "data/fingerprint.json"


def log_fingerprint(uri: str, run_id: str, manifest_sha256: str, files: Mapping[str, Any] | None) -> None:
    """The data files a run trained on (relative path -> [size, mtime ns]), for `--resume` to compare."""
    payload = {"manifest_sha256": manifest_sha256, "files": {k: list(v) for k, v in (files or {}).items()}}
    MlflowClient(uri).log_dict(run_id, payload, FINGERPRINT_ARTIFACT)


def load_fingerprint(uri: str, run_id: str) -> dict[str, Any] | None:
    """What `log_fingerprint` stored, or None (a run logged before fingerprints existed)."""
    import tempfile

    client = MlflowClient(uri)
    if not any(a.path == FINGERPRINT_ARTIFACT for a in client.list_artifacts(run_id, "data")):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        return json.loads(Path(client.download_artifacts(run_id, FINGERPRINT_ARTIFACT, tmp)).read_text())


def run_tags(uri: str, run_id: str) -> dict[str, str]:
    return dict(MlflowClient(uri).get_run(run_id).data.tags)


def mark_running(uri: str, run_id: str, previous_status: str) -> None:
    """A resumed run is RUNNING again, owned by this process, until it ends (see ``end_run``)."""
    client = MlflowClient(uri)
    client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
    set_driver_tags(client, run_id)
    client.set_tag(run_id, STATUS_REASON_TAG, f"resumed (was {previous_status})")


def end_run(uri: str, run_id: str, status: bool | str = True, reason: str | None = None) -> None:
    """End the run: ``status`` True/False for FINISHED/FAILED, or a status name (``"KILLED"``);
    ``reason`` (the error) goes into the autocdsr.status_reason tag."""
    if isinstance(status, bool):
        status = RunStatus.to_string(RunStatus.FINISHED if status else RunStatus.FAILED)
    client = MlflowClient(uri)
    if reason is not None:
        client.set_tag(run_id, STATUS_REASON_TAG, reason[:4900])
    client.set_terminated(run_id, status=status)


class MetricLogger:
    """Buffers per-step metrics and writes them in batches (one HTTP call per flush on a server)."""

    def __init__(self, uri: str, run_id: str, flush_every: int = 10) -> None:
        self.client = MlflowClient(uri)
        self.run_id = run_id
        self.flush_every = flush_every
        self._buffer: list[Metric] = []
        self._since_flush = 0

    def log(self, metrics: Mapping[str, float], step: int, flush: bool = False) -> None:
        now = int(time.time() * 1000)
        self._buffer += [Metric(_key(k), float(v), now, step) for k, v in metrics.items()]
        self._since_flush += 1
        if flush or self._since_flush >= self.flush_every:
            self.flush()

    def step_logger(self, prefix: str = "") -> Callable[[Mapping[str, float], int], None]:
        """The ``log_metrics`` callback of `training.train_worker`: keys get ``prefix``; per-step training
        metrics are batched, evaluation results are written at once."""

        def log_metrics(metrics: Mapping[str, float], step: int) -> None:
            is_train = all(k.startswith("train/") for k in metrics)
            self.log({prefix + k: v for k, v in metrics.items()}, step, flush=not is_train)

        return log_metrics

    def flush(self) -> None:
        while self._buffer:  # the REST API takes at most 1000 metrics per batch
            chunk, self._buffer = self._buffer[:1000], self._buffer[1000:]
            self.client.log_batch(self.run_id, metrics=chunk)
        self._since_flush = 0


def _key(k: str) -> str:
    # MLflow keys allow alphanumerics, _ - . space / ; replace anything else (e.g. '+' in method names).
    return re.sub(r"[^\w\-. /]", "_", k)


def metric_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key)]


# ----------------------------------------------------------------------------- results, plots, models
def per_domain_table(metrics: Mapping[str, float], split: str, domains: list[str]) -> pd.DataFrame:
    """Rows: domains and 'all'; columns: recall@K, ndcg@K, sequences (from keys like test/ndcg_10/books)."""
    rows = []
    for d in [*domains, "all"]:
        row: dict[str, Any] = {"domain": d, "sequences": metrics.get(f"{split}/num_sequences/{d}", 0.0)}
        for m in ("recall", "ndcg"):
            for k in (5, 10, 20):
                row[f"{m}@{k}"] = metrics.get(f"{split}/{m}_{k}/{d}", float("nan"))
        rows.append(row)
    return pd.DataFrame(rows)


def markdown_table(df: pd.DataFrame) -> str:
    def cell(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def learning_curves(uri: str, run_id: str, prefix: str = "") -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    loss = metric_history(uri, run_id, f"{prefix}train/loss_rec")
    val = metric_history(uri, run_id, f"{prefix}val/ndcg_10/all")
    if loss:
        axes[0].plot(*zip(*loss, strict=True), lw=0.8)
    axes[0].set(title="training loss (L_rec)", xlabel="step")
    if val:
        axes[1].plot(*zip(*val, strict=True), marker="o")
    axes[1].set(title="validation NDCG@10", xlabel="step")
    fig.tight_layout()
    return fig


def pareto_trajectory(uri: str, run_id: str, prefix: str = "") -> Any:
    """The paper's Fig. 5: task weights (α1 on L_rec, α2 on a_cd) and a_cd over training steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key, label in (("alpha1", "α1 (L_rec)"), ("alpha2", "α2 (a_cd)"), ("a_cd", "a_cd")):
        hist = metric_history(uri, run_id, f"{prefix}train/{key}")
        if hist:
            ax.plot(*zip(*hist, strict=True), lw=0.8, label=label)
    ax.set(title="Pareto task weights and cross-domain attention", xlabel="step")
    ax.legend()
    fig.tight_layout()
    return fig


def log_results(
    uri: str,
    run_id: str,
    cfg: Any,
    info: Any,
    metrics: Mapping[str, float],
    checkpoint: str | None,
    summary: dict[str, Any],
) -> None:
    """Driver-side logging after training: tables, plots, manifest, config, model and registry."""
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    domains = list(info.vocab.domains)
    if cfg.method == "single":  # merged per-domain results of the single-domain models
        step = 0
        client.log_batch(
            run_id,
            metrics=[Metric(_key(k), float(v), int(time.time() * 1000), step) for k, v in metrics.items()],
        )
    with mlflow.start_run(run_id=run_id, log_system_metrics=False):
        for split in ("test", "val"):
            table = per_domain_table(metrics, split, domains)
            if table["sequences"].sum() > 0:
                mlflow.log_table(table, f"metrics/{split}_per_domain.json")
                mlflow.log_text(markdown_table(table), f"metrics/{split}_per_domain.md")
        prefixes = [f"single/{d}/" for d in domains] if cfg.method == "single" else [""]
        for p in prefixes:
            name = p.strip("/").replace("/", "_") or "model"
            mlflow.log_figure(learning_curves(uri, run_id, p), f"plots/learning_curves_{name}.png")
            if cfg.balancer.method != "cd":
                mlflow.log_figure(pareto_trajectory(uri, run_id, p), f"plots/pareto_weights_{name}.png")
        best = None
        if checkpoint is not None:
            from autocdsr.training import load_best_state

            best = load_best_state(checkpoint)  # read once: the attention plot and the logged model share it
        if best is not None and not cfg.uses_ib_tokens:
            log_domain_pair_attention(cfg, info, best)
        mlflow.log_dict(info.manifest, "data/manifest.json")
        mlflow.log_dict(cfg.to_dict(), "config/resolved_config.json")
        if cfg.mlflow.log_model and best is not None:
            summary["model"] = log_model(run_id, cfg, info, best)
    if summary.get("model") and cfg.registry.name:
        summary["registered"] = register(uri, summary["model"], cfg.registry.name, cfg.registry.alias, run_id)


def log_domain_pair_attention(
    cfg: Any, info: Any, weights: Mapping[str, Any], max_sequences: int = 512
) -> None:
    """The best model's mean attention by (query domain, key domain) on validation sequences, as a heatmap
    (`plots/cross_domain_attention.png`) and a table (`metrics/attention_by_domain_pair.json`)."""
    from autocdsr import analysis
    from autocdsr.models import build_model

    vocab = info.vocab
    model = build_model(
        cfg.model_config(vocab.num_items, vocab.num_domains, vocab.domains),
        vocab.item_domain,
        vocab.item_count,
    )
    model.load_state_dict(weights)
    matrix = analysis.domain_pair_attention(model, info, "valid", cfg.data.max_len, max_sequences)
    domains = list(vocab.domains)
    table = pd.DataFrame(matrix, columns=domains)
    table.insert(0, "query_domain", domains)
    mlflow.log_table(table, "metrics/attention_by_domain_pair.json")
    title = f"{cfg.method}: mean attention by domain pair (validation, best model)"
    mlflow.log_figure(analysis.domain_pair_figure(matrix, domains, title), "plots/cross_domain_attention.png")


def log_model(run_id: str, cfg: Any, info: Any, weights_state: Mapping[str, Any]) -> str:
    """Log the best weights as a pyfunc model (inside the active run); return its model URI."""
    import tempfile

    import pyarrow.parquet as pq
    import torch

    import autocdsr
    from autocdsr import serving

    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "weights.pt"
        torch.save(weights_state, weights)
        config = Path(tmp) / "config.json"
        config.write_text(json.dumps({"config": cfg.to_dict(), "domains": list(info.vocab.domains)}))
        items = Path(tmp) / "items.parquet"
        table = pq.read_table(f"{info.root}/items").sort_by("item_idx")
        pq.write_table(table, items)
        by_domain: dict[str, list[str]] = {}
        for d, i in zip(
            table.column("domain").to_pylist()[:5000], table.column("item_id").to_pylist()[:5000], strict=True
        ):
            by_domain.setdefault(d, []).append(i)
        for d, i in zip(table.column("domain").to_pylist(), table.column("item_id").to_pylist(), strict=True):
            if len(by_domain.setdefault(d, [])) < 2:
                by_domain[d].append(i)
        info_ = mlflow.pyfunc.log_model(
            name="model",
            python_model=serving.Recommender(),
            artifacts={"weights": str(weights), "config": str(config), "items": str(items)},
            code_paths=[str(Path(autocdsr.__file__).parent)],
            signature=serving.SIGNATURE,
            input_example=serving.input_example(list(info.vocab.domains), by_domain),
            pip_requirements=[
                f"torch=={torch.__version__.split('+')[0]}",
                "numpy",
                "pandas",
                "pyarrow",
                f"mlflow=={mlflow.__version__}",
            ],
        )
    return info_.model_uri


def register(uri: str, model_uri: str, name: str, alias: str, run_id: str) -> dict[str, str]:
    client = MlflowClient(uri)
    version = mlflow.register_model(model_uri, name, tags={"run_id": run_id})
    client.set_registered_model_alias(name, alias, version.version)
    return {"name": name, "version": str(version.version), "alias": alias, "uri": f"models:/{name}@{alias}"}


def format_table(m: Mapping[str, float], split: str = "test") -> str:
    """Per-domain Recall/NDCG @10 and @20 as a fixed-width text table."""
    domains = [*sorted({k.split("/")[-1] for k in m if k.startswith(f"{split}/ndcg_10/")} - {"all"}), "all"]
    lines = [f"{'domain':<28}{'R@10':>8}{'N@10':>8}{'R@20':>8}{'N@20':>8}{'sequences':>11}"]
    for d in domains:
        vals = [
            m.get(f"{split}/{k}/{d}", float("nan")) for k in ("recall_10", "ndcg_10", "recall_20", "ndcg_20")
        ]
        lines.append(
            f"{d:<28}"
            + "".join(f"{v:>8.4f}" for v in vals)
            + f"{m.get(f'{split}/num_sequences/{d}', 0):>11.0f}"
        )
    return "\n".join(lines)


def format_summary(summary: Mapping[str, Any]) -> str:
    lines = [
        f"run {summary['run_id']}  ({summary.get('train_seconds', 0):.0f}s)",
        "",
        format_table(summary["metrics"]),
    ]
    if summary.get("registered"):
        r = summary["registered"]
        lines.append(f"\nregistered {r['name']} version {r['version']} as {r['uri']}")
    return "\n".join(lines)
