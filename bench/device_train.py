"""Training runs in one process on one device, without Ray or MLflow: for a lent GPU (bench/gpu.sh).

    python bench/device_train.py --data data/kuairand1k/sequences --config conf/train/kuairand1k-sasrec.yaml \\
        --methods cd cd+autocdsr --seeds 0 --device cuda --set train.max_steps=3000 [--out DIR]

The device image has torch and pyarrow but neither Ray nor MLflow, and a lease is minutes long, so this runs
`autocdsr.training.train_worker` (the loop every Ray worker runs: same model, balancer, evaluation, early
stopping and best-checkpoint restore) with the in-memory train split (`autocdsr.data.memory`) on
``--device``, for each method and seed in turn, and records what `bench/reproduce.py` would put in MLflow:
the final validation/test metrics per domain, the best step, the wall time, and a summary of the per-step
training metrics (L_rec, a_cd, Pareto weights over windows of steps). Each finished run is written at once
to ``--out``/runs.jsonl, so a run cut off by the lease's time limit loses only itself. ``--budget-s``
skips runs that would start after that many seconds. The data must be built beforehand (`jobs/build_sequences.py`)
and, on the device, carried with the working tree.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from autocdsr import analysis  # noqa: E402
from autocdsr.config import METHODS, load_train_config  # noqa: E402
from autocdsr.data import shards  # noqa: E402
from autocdsr.data.memory import in_memory_batches  # noqa: E402
from autocdsr.objectives.pareto import free_band  # noqa: E402
from autocdsr.training import LocalContext, train_worker  # noqa: E402

# per-step training metrics summarised over windows of steps
TRACKED = ("train/loss_rec", "train/a_cd", "train/alpha1", "train/alpha2", "train/pareto/rec_share")
# what `analysis.weight_phases` says of each window's Pareto solves: how many, their median L̃_cd / L̃_rec and
# the shares below, inside and above p_1's free band (where the ratio sits decides the weights)
SOLVE_KEYS = ("solves", "ratio_median", "share_below_band", "share_in_band", "share_above_band")


def summarise(
    logged: list[tuple[int, dict[str, float]]], band: tuple[float, float] | None = None, windows: int = 8
) -> list[dict[str, float]]:
    """Means of the tracked training metrics over ``windows`` equal spans of the logged steps; with ``band``
    (`pareto.free_band` of the run's preference vector, for a method that solves for its weights) also
    `SOLVE_KEYS` per span, as ``train/pareto/<key>``."""
    steps = [(s, m) for s, m in logged if "train/loss_rec" in m]
    if not steps:
        return []
    out = []
    for chunk in np.array_split(np.arange(len(steps)), min(windows, len(steps))):
        rows = [steps[i] for i in chunk]
        row: dict[str, float] = {"first_step": float(rows[0][0]), "last_step": float(rows[-1][0])}
        for key in TRACKED:
            values = [m[key] for _, m in rows if key in m and math.isfinite(m[key])]
            if values:
                row[key] = float(np.mean(values))
        out.append(row)
    if band is not None:
        history = {
            k: [(s, m[f"train/{k}"]) for s, m in steps if f"train/{k}" in m] for k in analysis.WEIGHT_KEYS
        }
        edges = [int(out[0]["first_step"]) - 1, *(int(row["last_step"]) for row in out)]
        for row, phase in zip(out, analysis.weight_phases(history, edges, band), strict=True):
            row |= {f"train/pareto/{k}": phase[k] for k in SOLVE_KEYS if k in phase}
    return out


def run_one(data: Path, config: Path | None, overrides: list[str], device: torch.device) -> dict[str, Any]:
    info = shards.open_dataset(str(data))
    cfg = load_train_config(config, overrides)
    band = None
    if cfg.balancer.method == "autocdsr":  # the Pareto methods
        band = free_band(cfg.autocdsr.pareto.K, cfg.autocdsr.pareto.preference_index)
    logged: list[tuple[int, dict[str, float]]] = []
    start = time.perf_counter()
    final = train_worker(
        cfg,
        info,
        LocalContext(in_memory_batches(info, cfg), device=device),
        log_metrics=lambda m, s: logged.append((s, dict(m))),
    )
    return {
        "method": cfg.method,
        "seed": cfg.seed,
        "backbone": cfg.model.backbone,
        "overrides": overrides,
        "device": str(device),
        "seconds": time.perf_counter() - start,
        "steps": max((s for s, m in logged if "train/loss_rec" in m), default=0),
        "metrics": {k: float(v) for k, v in final.items()},
        "training": summarise(logged, band),
    }


def table(runs: list[dict[str, Any]], domains: list[str]) -> str:
    cols = [*domains, "all"]
    lines = [
        "| method | seed | "
        + " | ".join(f"test NDCG@10 {d}" for d in cols)
        + " | best val NDCG@10 (step) | steps | s |",
        "|---|---|" + "---|" * (len(cols) + 3),
    ]
    for r in runs:
        m = r["metrics"]
        cells = [f"{m.get(f'test/ndcg_10/{d}', math.nan):.4f}" for d in cols]
        lines.append(
            f"| {r['method']} | {r['seed']} | " + " | ".join(cells)
            + f" | {m.get('val/best_ndcg_10', math.nan):.4f} ({m.get('best_step', math.nan):.0f})"
            + f" | {r['steps']} | {r['seconds']:.0f} |"
        )  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python bench/device_train.py",
        description="Train methods x seeds with train_worker on one device, no Ray/MLflow; metrics to JSON lines.",
    )
    p.add_argument(
        "--data", type=Path, required=True, help="built sequences (jobs/build_sequences.py output)"
    )
    p.add_argument("--config", type=Path, help="conf/train/NAME.yaml (default: built-in defaults)")
    p.add_argument("--methods", nargs="+", default=["cd", "cd+autocdsr"], choices=METHODS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides for every run")
    p.add_argument("--out", type=Path, default=REPO / "bench/out/device_train", help="runs.jsonl goes here")
    p.add_argument("--budget-s", type=float, help="start no run after this many seconds")
    args = p.parse_args(argv)
    if "single" in args.methods:
        p.error("single trains one model per domain: use bench/reproduce.py (it needs MLflow)")
    if not (args.data / "_SUCCESS").exists():
        p.error(f"--data {args.data}: no built sequences there (no _SUCCESS)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    device = torch.device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    sink = args.out / "runs.jsonl"
    started = time.perf_counter()
    runs = []
    domains = shards.open_dataset(str(args.data)).vocab.domains
    for seed in args.seeds:
        for method in args.methods:
            if args.budget_s is not None and time.perf_counter() - started > args.budget_s:
                print(f"skipped {method} seed {seed}: --budget-s {args.budget_s:.0f} s spent")
                continue
            run = run_one(args.data, args.config, [*args.set, f"method={method}", f"seed={seed}"], device)
            runs.append(run)
            with sink.open("a") as f:
                f.write(json.dumps(run) + "\n")
            m = run["metrics"]
            print(
                f"{method} seed {seed}: test NDCG@10 {m.get('test/ndcg_10/all', math.nan):.4f}, "
                f"best val {m.get('val/best_ndcg_10', math.nan):.4f}, {run['steps']} steps, {run['seconds']:.0f} s",
                flush=True,
            )
    print(table(runs, list(domains)))
    print(json.dumps({"runs": len(runs), "file": str(sink)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
