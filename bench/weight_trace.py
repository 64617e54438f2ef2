"""What the loss weights of trained runs did, phase by phase, from their per-step MLflow metrics.

    python bench/weight_trace.py RESULTS [RESULTS ...] [--phases warmup,500,1000] [--out DIR]

RESULTS is a `bench/reproduce.py` output folder (``--out``/<dataset>, or any folder above it) or its
``results.json``. Each run's ``train/alpha2``, ``train/a_cd``, ``train/loss_rec`` and, for AutoCDSR and
AutoCDSR⁺, the solve-step ``train/pareto/normalised_*`` metrics are read from the MLflow store the runs
logged to (``--tracking-uri``, else each run's ``tracking_uri`` in results.json, else the ``mlflow.db``
next to it).

Per phase (steps a+1 … b; ``--phases`` gives the inner boundaries, ``warmup`` = the run's
train.warmup_steps): the mean weight α₂ on a_cd, the shares of steps trained on L_rec alone (α₂ = 0) and on
a_cd alone (α₂ = 1), a_cd and L_rec at the phase's end (mean of its last 10 steps), and for the Pareto
methods the solves' median L̃_cd / L̃_rec and where it lay against the preference vector's free band
(`autocdsr.objectives.pareto.free_band`): below (the active constraint asks for a_cd up), inside (MGDA of
the two tasks) or above (a_cd down). Printed as a table (a run's own overrides, those not shared by every run,
as a numbered legend below it) and written to ``--out``/weight_trace.json (keyed by the full labels).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from autocdsr import analysis, tracking  # noqa: E402
from autocdsr.config import load_train_config  # noqa: E402
from autocdsr.objectives.pareto import free_band  # noqa: E402
from bench.rank_compare import find_results, label_runs, results_parser  # noqa: E402

log = logging.getLogger("bench.weight_trace")

PARETO_METHODS = ("cd+autocdsr", "cd+autocdsr_plus")


def collect_runs(files: list[Path], tracking_uri: str | None) -> list[dict[str, Any]]:
    """Every run of the results.json files, with the MLflow store it logged to (``uri``)."""
    runs: list[dict[str, Any]] = []
    for f in files:
        data = json.loads(f.read_text())
        db = f.parent / "mlflow.db"
        for r in data["runs"]:
            uri = tracking_uri or r.get("tracking_uri")  # results.json of before 2026-12-03 lack it
            if uri is None:
                if not db.exists():
                    raise SystemExit(f"{f}: run {r['run_name']} names no tracking_uri and there is no {db}; "
                                     "pass --tracking-uri")  # fmt: skip
                uri = f"sqlite:///{db.resolve()}"
            runs.append({**r, "uri": uri, "results": str(f), "dataset": data["dataset"]})
    if not runs:
        raise SystemExit(f"no runs in {', '.join(map(str, files))}")
    label_runs(runs, files)
    return runs


def run_phases(r: dict[str, Any], config: Path, phases: list[str]) -> list[dict[str, float]]:
    cfg = load_train_config(config, r["overrides"])
    history = {k: tracking.metric_history(r["uri"], r["run_id"], f"train/{k}") for k in analysis.WEIGHT_KEYS}
    if not history["alpha2"]:
        raise SystemExit(
            f"{r['results']}: run {r['run_name']} ({r['run_id']}) has no train/alpha2 history in {r['uri']}"
        )
    last = max(s for s, _ in history["alpha2"])
    inner = sorted({cfg.train.warmup_steps if p == "warmup" else int(p) for p in phases})
    edges = [0, *(e for e in inner if 0 < e < last), last]
    band = None
    if r["method"] in PARETO_METHODS:
        band = free_band(cfg.autocdsr.pareto.K, cfg.autocdsr.pareto.preference_index)
    return analysis.weight_phases(history, edges, band)


def _pct(row: dict[str, float], key: str) -> str:
    return f"{row[key]:.0%}" if key in row else "–"


def short_names(runs: list[dict[str, Any]]) -> tuple[dict[str, str], list[str]]:
    """Table names for the runs' labels: the overrides that set a run apart (``extra``) become a number,
    "(1)", explained in a legend below the table instead of repeated on every phase row."""
    variants = list(dict.fromkeys(r["extra"] for r in runs if r["extra"]))
    names: dict[str, str] = {}
    for r in runs:
        number = f" ({variants.index(r['extra']) + 1})" if r["extra"] else ""
        names[r["label"]] = r["base_label"] + number
    return names, [f"({i}) {' '.join(v)}" for i, v in enumerate(variants, 1)]


def report(
    traces: dict[str, list[dict[str, float]]], names: dict[str, str] | None = None, legend: Sequence[str] = ()
) -> str:
    """The phases as a markdown table; `names` maps a label to its table name, `legend` follows the table."""
    names = names or {}
    lines = [
        "| run | steps | mean α₂ | L_rec only | a_cd only | solves: below / in / above band | median L̃_cd/L̃_rec "
        "| a_cd, end | L_rec, end |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, rows in traces.items():
        for row in rows:
            if not row["steps"]:
                continue
            solves = (
                f"{row['solves']:.0f}: {_pct(row, 'share_below_band')} / {_pct(row, 'share_in_band')} / "
                f"{_pct(row, 'share_above_band')}"
                if row.get("solves")
                else "–"
            )
            ratio = f"{row['ratio_median']:.3f}" if "ratio_median" in row else "–"
            a_cd = f"{row['a_cd_end']:.3f}" if not math.isnan(row["a_cd_end"]) else "–"
            lines.append(
                f"| {names.get(name, name)} | {row['first_step']:.0f}-{row['last_step']:.0f} | {row['alpha2_mean']:.3f} | "
                f"{_pct(row, 'share_rec_only')} | {_pct(row, 'share_cd_only')} | {solves} | {ratio} | {a_cd} | "
                f"{row['loss_rec_end']:.2f} |"
            )
    return "\n".join([*lines, *([""] if legend else []), *legend])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = results_parser("python bench/weight_trace.py", __doc__)
    p.add_argument(
        "--phases",
        default="warmup",
        help="comma-separated phase boundaries (steps; 'warmup' = the run's train.warmup_steps), default warmup",
    )
    p.add_argument("--tracking-uri", default=None, help="MLflow store of the runs (default: see above)")
    p.add_argument(
        "--out",
        default=str(REPO / "bench/out/weight_trace"),
        help="folder for weight_trace.json (created; git-ignored by default)",
    )
    args = p.parse_args(argv)
    args.phases = [s.strip() for s in args.phases.split(",") if s.strip()]
    bad = [s for s in args.phases if s != "warmup" and not (s.isdigit() and int(s) > 0)]
    if bad:
        p.error(f"--phases takes positive step numbers or 'warmup', got {', '.join(bad)}")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    runs = collect_runs(find_results(args.results), args.tracking_uri)
    traces: dict[str, list[dict[str, float]]] = {}
    for r in runs:
        config = Path(args.config or REPO / f"conf/train/{r['dataset']}-{r['backbone']}.yaml")
        log.info("%s: run %s in %s", r["label"], r["run_id"], r["uri"])
        traces[r["label"]] = run_phases(r, config, args.phases)
    text = report(traces, *short_names(runs))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "weight_trace.json.tmp"
    tmp.write_text(json.dumps({"runs": traces}, indent=1))
    tmp.replace(out / "weight_trace.json")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
