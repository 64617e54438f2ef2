"""`python -m autocdsr.compare RUN_NAME [RUN_NAME ...] [--experiment E] [--register NAME --alias A]`

Compares finished training runs of one MLflow experiment (the latest run of each name) side by side:
per-domain test Recall@10 / NDCG@10 of every run and the change of each run against the first one. The
best run is chosen on validation NDCG@10 over all domains (never on test, which stays the unbiased
estimate); with ``--register`` its logged model is registered under NAME and alias A (default
``champion``) points at that version, so ``models:/NAME@champion`` always loads the chosen model.
Prints the `mlflow ui` command that shows the runs.

Unfinished runs are never compared. RUNNING runs of the experiment whose driver process on this host is
gone (SIGKILL, crash) are first marked KILLED, with the tag autocdsr.status_reason saying why.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from autocdsr import tracking

log = logging.getLogger("autocdsr.compare")

SELECT_ON = "val/ndcg_10/all"


class CompareError(RuntimeError):
    """A named run is missing, unfinished, or lacks the metrics or model the comparison needs."""


@dataclass(frozen=True)
class RunResult:
    name: str
    run_id: str
    metrics: Mapping[str, float]


def latest_runs(uri: str, experiment: str, names: Sequence[str]) -> list[RunResult]:
    """The latest FINISHED run of each name, in the order given."""
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise CompareError(f"no experiment {experiment!r} at {uri}")
    out = []
    for name in names:
        runs = client.search_runs(
            [exp.experiment_id], filter_string=f"attributes.run_name = '{name}' and attributes.status = 'FINISHED'",
            max_results=1, order_by=["attributes.start_time DESC"],
        )  # fmt: skip
        if not runs:
            raise CompareError(f"no FINISHED run named {name!r} in experiment {experiment!r} at {uri}")
        if SELECT_ON not in runs[0].data.metrics:
            raise CompareError(f"run {name!r} ({runs[0].info.run_id}) has no {SELECT_ON} metric")
        out.append(RunResult(name, runs[0].info.run_id, dict(runs[0].data.metrics)))
    return out


def best_run(runs: Sequence[RunResult]) -> RunResult:
    """Highest validation NDCG@10 (all domains); the earlier run wins a tie."""
    return max(reversed(runs), key=lambda r: r.metrics[SELECT_ON])


def comparison_table(runs: Sequence[RunResult], split: str = "test") -> str:
    """Rows: domains then `all`; per run Recall@10 and NDCG@10, and NDCG@10 change vs the first run (%)."""
    domains = sorted(
        {k.rsplit("/", 1)[1] for r in runs for k in r.metrics if k.startswith(f"{split}/ndcg_10/")} - {"all"}
    )
    width = max(14, *(len(r.name) + 2 for r in runs))
    head = f"{'domain':<14}" + "".join(f"{r.name:>{width}}" for r in runs)
    sub = f"{'':<14}" + "".join(f"{'R@10   N@10':>{width}}" for _ in runs)
    if len(runs) > 1:
        head += "".join(f"{'ΔN@10 ' + str(i + 1):>12}" for i in range(1, len(runs)))
        sub += "".join(f"{'vs run 1':>12}" for _ in runs[1:])
    lines = [head, sub]
    for d in [*domains, "all"]:
        cells = []
        for r in runs:
            rec, ndcg = r.metrics.get(f"{split}/recall_10/{d}"), r.metrics.get(f"{split}/ndcg_10/{d}")
            cells.append(f"{'-' if rec is None else f'{rec:.4f}'} {'-' if ndcg is None else f'{ndcg:.4f}'}")
        line = f"{d:<14}" + "".join(f"{c:>{width}}" for c in cells)
        base = runs[0].metrics.get(f"{split}/ndcg_10/{d}")
        for r in runs[1:]:
            v = r.metrics.get(f"{split}/ndcg_10/{d}")
            line += f"{f'{100 * (v / base - 1):+.1f}%' if v is not None and base else '-':>12}"
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(
        prog="python -m autocdsr.compare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "runs", nargs="+", help="MLflow run names (the latest FINISHED run of each), first = baseline"
    )
    p.add_argument("--experiment", default="autocdsr", help="MLflow experiment (default %(default)s)")
    p.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")
    p.add_argument("--register", metavar="NAME", help="register the best run's model under NAME")
    p.add_argument(
        "--alias", default="champion", help="alias set on the registered version (default %(default)s)"
    )
    p.add_argument("--split", default="test", choices=["test", "val"], help="split shown in the table")
    p.add_argument("--json", action="store_true", help="also print the choice as one JSON line at the end")
    args = p.parse_args(argv)
    uri = tracking.tracking_uri(args.tracking_uri)
    # RUNNING runs whose driver died on this host (SIGKILL, crash) would otherwise stay RUNNING forever.
    tracking.reap_stale_runs(uri, args.experiment, "autocdsr.compare")
    try:
        runs = latest_runs(uri, args.experiment, args.runs)
        best = best_run(runs)
        registered = None
        if args.register:
            try:
                registered = tracking.register(
                    uri, f"runs:/{best.run_id}/model", args.register, args.alias, best.run_id
                )
            except MlflowException as e:
                raise CompareError(
                    f"cannot register the model of run {best.name!r} ({best.run_id}); was it trained with "
                    f"mlflow.log_model=false? ({e})"
                ) from e
    except CompareError as e:
        log.error("%s", e)
        return 2
    print(f"\n{args.split} metrics per target domain (experiment {args.experiment!r}):\n")
    print(comparison_table(runs, args.split))
    print(f"\nbest on {SELECT_ON}: {best.name} ({best.metrics[SELECT_ON]:.4f}), run {best.run_id}")
    if registered:
        print(f"registered as {registered['uri']} (version {registered['version']})")
    print(f"\nOpen the MLflow UI:  {tracking.ui_command(uri)}")
    if args.json:
        print(json.dumps({"best": best.name, "run_id": best.run_id, "registered": registered}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
