"""Do a Pareto run's a_cd steps inflate AdamW's second moment, and so damp the L_rec steps after them?

    python bench/adam_moments.py RESULTS [RESULTS ...] [--batches 16] [--run NAME]

AdamW divides each coordinate's step by the root of an exponential average (β₂) of its squared gradients.
A step that gives a_cd most of the weight puts ∇a_cd's squares into that average too. Where they are large
next to ∇L_rec's, the L_rec steps that follow move those coordinates less than in `cd`, for about
1/(1 − β₂) steps. This measures how much, for runs of `bench/reproduce.py` that kept a checkpoint.

For each run: the checkpoint's last weights, and the run's per-step (α₁, α₂) from the MLflow store it
logged to (as `bench/weight_trace.py` finds it). Then ``--batches`` probe batches of the train split at
those weights, in train mode, as training saw them. Per batch: g_rec = ∇L_rec and g_cd = ∇a_cd over every
parameter, and the second moments

    v_rec = E_b[clip(g_rec)²]                                      what L_rec alone (`cd`) puts there
    v_run = Σ_s w_s E_b[clip(α₁ₛ g_rec + α₂ₛ g_cd)²] / Σ_s w_s,  w_s = β₂^(T − s)

Here clip is the trainer's global-norm clip (train.grad_clip), applied step by step with that step's
weights, and T is the checkpoint's step. Both use the same weights, so they differ only by the run's
weighting of the two gradients. The gradients' own change over training is left out.

Reported per parameter group:
- ``inflation`` = Σ v_run / Σ v_rec: 1 means the a_cd steps leave the denominator as L_rec alone would.
- ``p99``: the 99th percentile of v_run / v_rec over the group's coordinates that L_rec reaches.
- ``step_factor``: the mean of sqrt(v_rec / v_run) over those coordinates. It is the factor on an L_rec
  step's size (1: no damping).
- ``checkpoint``: the checkpoint's own bias-corrected second moment over v_rec. It is for reference only:
  it also holds the larger gradients of earlier steps.

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from autocdsr import tracking  # noqa: E402
from autocdsr.config import load_train_config  # noqa: E402
from autocdsr.data import shards  # noqa: E402
from autocdsr.data.memory import in_memory_batches  # noqa: E402
from autocdsr.models import build_model  # noqa: E402
from autocdsr.training import CHECKPOINT_FILE, seed_everything  # noqa: E402
from bench.rank_compare import find_results, results_parser  # noqa: E402
from bench.weight_trace import collect_runs  # noqa: E402

log = logging.getLogger("bench.adam_moments")

# parameter-name fragments -> group, first match wins
GROUPS = (
    ("item_emb", "item embedding"),
    ("emb", "other embeddings"),
    ("ib_tokens", "other embeddings"),
    ("attn.qkv", "attention q/k/v"),
    ("attn.proj", "attention output"),
    ("ffn", "feed-forward"),
    ("ln", "layer norms"),
)


def group_of(name: str) -> str:
    return next((g for key, g in GROUPS if key in name), "other")


def step_coefficients(
    history: torch.Tensor, norms: tuple[float, float, float], clip: float, beta2: float, last: int
) -> tuple[float, float, float]:
    """(A, B, C), with Σ_s w_s clip(α₁ₛ r + α₂ₛ g)² = A r² + 2B r g + C g² per coordinate, over Σ_s w_s.

    history: [S, 3] rows of (step, α₁, α₂); norms: (r·r, r·g, g·g) over every parameter; clip: the global
    norm limit (0: none); last: T, the step of the second moment (rows after it are ignored)."""
    steps, a1, a2 = (history[:, k].double() for k in range(3))
    keep = steps <= last
    steps, a1, a2 = steps[keep], a1[keep], a2[keep]
    w = torch.pow(torch.tensor(beta2, dtype=torch.float64), last - steps)
    rr, rg, gg = norms
    norm = torch.sqrt(torch.clamp(a1 * a1 * rr + 2 * a1 * a2 * rg + a2 * a2 * gg, min=0.0))
    c2 = torch.ones_like(norm) if clip <= 0 else torch.clamp(clip / norm.clamp(min=1e-30), max=1.0) ** 2
    total = float(w.sum())
    if total <= 0:
        raise ValueError("step_coefficients: no step of the history is at or before the checkpoint's step")
    return tuple(float((w * c2 * x).sum()) / total for x in (a1 * a1, a1 * a2, a2 * a2))  # type: ignore[return-value]


def accumulate(
    batches: Iterator[tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]]],
    history: torch.Tensor,
    clip: float,
    beta2: float,
    last: int,
) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
    """v_run and v_rec per parameter (see the module docstring) from (g_rec, g_cd) per probe batch."""
    v_run: list[torch.Tensor] | None = None
    v_rec: list[torch.Tensor] | None = None
    n = 0
    ones = torch.tensor([[float(last), 1.0, 0.0]])  # L_rec alone at every step
    for g_rec, g_cd in batches:
        dots = [sum(float((x.double() * y.double()).sum()) for x, y in zip(a, b, strict=True))
                for a, b in ((g_rec, g_rec), (g_rec, g_cd), (g_cd, g_cd))]  # fmt: skip
        A, B, C = step_coefficients(history, (dots[0], dots[1], dots[2]), clip, beta2, last)
        R = step_coefficients(ones, (dots[0], dots[1], dots[2]), clip, beta2, last)[0]
        run = [A * r * r + 2 * B * r * g + C * g * g for r, g in zip(g_rec, g_cd, strict=True)]
        rec = [R * r * r for r in g_rec]
        v_run = run if v_run is None else [x + y for x, y in zip(v_run, run, strict=True)]
        v_rec = rec if v_rec is None else [x + y for x, y in zip(v_rec, rec, strict=True)]
        n += 1
    if v_run is None or v_rec is None:
        raise ValueError("accumulate: no probe batch")
    return [x / n for x in v_run], [x / n for x in v_rec], n


def summarise(
    names: Sequence[str],
    v_run: Sequence[torch.Tensor],
    v_rec: Sequence[torch.Tensor],
    v_checkpoint: Sequence[torch.Tensor] | None,
) -> dict[str, dict[str, float]]:
    """Per group: inflation, p99, step_factor and checkpoint (see the module docstring)."""
    out: dict[str, dict[str, float]] = {}
    for group in dict.fromkeys(group_of(n) for n in names):
        idx = [i for i, n in enumerate(names) if group_of(n) == group]
        run = torch.cat([v_run[i].reshape(-1).double() for i in idx])
        rec = torch.cat([v_rec[i].reshape(-1).double() for i in idx])
        reached = rec > 0
        if not bool(reached.any()):
            continue
        ratio = run[reached] / rec[reached]
        row = {
            "coordinates": int(reached.sum()),
            "inflation": float(run.sum() / rec.sum()),
            "p99": float(np.percentile(ratio.numpy(), 99)),
            "step_factor": float(torch.sqrt(1.0 / ratio).mean()),
        }
        if v_checkpoint is not None:
            ck = torch.cat([v_checkpoint[i].reshape(-1).double() for i in idx])
            row["checkpoint"] = float(ck.sum() / rec.sum())
        out[group] = row
    return out


def _history(r: dict[str, Any]) -> torch.Tensor:
    a1 = dict(tracking.metric_history(r["uri"], r["run_id"], "train/alpha1"))
    a2 = dict(tracking.metric_history(r["uri"], r["run_id"], "train/alpha2"))
    steps = sorted(set(a1) & set(a2))
    if not steps:
        raise SystemExit(f"{r['results']}: run {r['run_name']} ({r['run_id']}) has no train/alpha1 and "
                         f"train/alpha2 history in {r['uri']}")  # fmt: skip
    return torch.tensor([[s, a1[s], a2[s]] for s in steps], dtype=torch.float64)


def probe(r: dict[str, Any], config: Path, batches: int, probe_seed: int) -> dict[str, Any]:
    cfg = load_train_config(config, r["overrides"])
    folder = (r.get("checkpoints") or {}).get("all")
    if folder is None or not (Path(folder) / CHECKPOINT_FILE).exists():
        raise SystemExit(f"{r['results']}: run {r['run_name']} has no checkpoint ({folder})")
    data = r.get("sequences")
    if data is None:
        raise SystemExit(f"{r['results']}: names no sequences folder")
    info = shards.open_dataset(data)
    vocab = info.vocab
    seed_everything(cfg.seed)
    model = build_model(
        cfg.model_config(vocab.num_items, vocab.num_domains, vocab.domains),
        vocab.item_domain,
        vocab.item_count,
    )
    saved = torch.load(Path(folder) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    model.load_state_dict(saved["model"])
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names, params = [n for n, _ in named], [p for _, p in named]
    state = saved["optimizer"]["state"]
    beta2 = float(saved["optimizer"]["param_groups"][0]["betas"][1])
    last = int(float(state[0]["step"]))
    v_checkpoint = None
    if len(state) == len(params):  # AdamW over model.parameters(), in the model's order
        v_checkpoint = [state[i]["exp_avg_sq"] / (1 - beta2**last) for i in range(len(params))]
    history = _history(r)
    model.train()  # dropout as in training
    it = in_memory_batches(info, cfg)(probe_seed)

    def grads() -> Iterator[tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]]]:
        for i in range(batches):
            out = model(next(it))
            if out.a_cd is None:
                raise SystemExit(f"{r['run_name']}: the model computes no a_cd")
            g_rec = torch.autograd.grad(out.loss_rec, params, retain_graph=True, materialize_grads=True)
            g_cd = torch.autograd.grad(out.a_cd, params, materialize_grads=True)
            log.info("%s: probe batch %d/%d", r["label"], i + 1, batches)
            yield g_rec, g_cd

    v_run, v_rec, n = accumulate(grads(), history, cfg.train.grad_clip, beta2, last)
    keep = history[:, 0] <= last
    steps, a2 = history[keep, 0], history[keep, 2]
    w = torch.pow(torch.tensor(beta2, dtype=torch.float64), last - steps)
    return {
        "label": r["label"],
        "step": last,
        "beta2": beta2,
        "batches": n,
        "share_a_cd_steps": float((a2 > 0).double().mean()),
        "share_a_cd_weighted": float((w * (a2 > 0)).sum() / w.sum()),
        "groups": summarise(names, v_run, v_rec, v_checkpoint),
    }


def report(results: list[dict[str, Any]]) -> str:
    lines = []
    for res in results:
        lines.append(
            f"{res['label']}: step {res['step']}, {res['batches']} probe batches, "
            f"{100 * res['share_a_cd_steps']:.1f}% of steps give a_cd weight "
            f"({100 * res['share_a_cd_weighted']:.1f}% weighted by β₂^(T − s))"
        )
        lines.append(f"  {'group':<18} {'inflation':>9} {'p99':>7} {'step_factor':>11} {'checkpoint':>10}")
        for g, row in res["groups"].items():
            ck = row.get("checkpoint", math.nan)
            lines.append(
                f"  {g:<18} {row['inflation']:9.3f} {row['p99']:7.2f} {row['step_factor']:11.3f} {ck:10.2f}"
            )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = results_parser("python bench/adam_moments.py", __doc__)
    p.add_argument("--batches", type=int, default=16, help="probe batches of the train split (default 16)")
    p.add_argument("--probe-seed", type=int, default=1_000_003, help="epoch seed of the probe batches' order")
    p.add_argument("--run", action="append", default=None, help="only runs with this run name (repeatable)")
    p.add_argument("--tracking-uri", default=None, help="MLflow store of the runs (default: as weight_trace)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    args = p.parse_args(argv)
    if args.batches < 1:
        p.error("--batches must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    files = find_results(args.results)
    runs = collect_runs(files, args.tracking_uri)
    for r in runs:  # the sequences folder is recorded once per results.json
        r.setdefault("sequences", json.loads(Path(r["results"]).read_text()).get("sequences"))
    if args.run:
        runs = [r for r in runs if r["run_name"] in args.run]
        if not runs:
            raise SystemExit(f"no run named {', '.join(args.run)} in {', '.join(map(str, files))}")
    results = []
    for r in runs:
        config = Path(args.config or REPO / f"conf/train/{r['dataset']}-{r['backbone']}.yaml")
        results.append(probe(r, config, args.batches, args.probe_seed))
    print(report(results))
    print(json.dumps({"runs": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
