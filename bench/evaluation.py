"""Benchmark: the cost of sampled-negative evaluation per sequence, at the paper's two protocols' shapes.

    python bench/evaluation.py [--quick] [--rounds 5] [--batch 256]

Evaluation draws each sequence's negatives on the CPU (`autocdsr.evaluation.sample_negatives`, seeded per
sequence) and scores the target and its negatives (`autocdsr.evaluation.candidate_scores`). On KuaiRand
(944,384 items, 50,000 negatives per sequence, histories up to 800 items) both are far more work than the
model's forward pass, and they run at every validation. Measured side by side, interleaved round by round, on
one torch thread (as a Ray Train worker with one CPU runs):

- sampling: this project's sampler (positions among the allowed items mapped by a binary search) against the
  rejection sampler it replaced (draw 2n, drop excluded and repeated items with `np.isin` / `np.unique`),
  written out below as the baseline;
- scoring: gathering each row's candidate rows from the item table (`dense=False`) against multiplying by
  the whole table and picking the candidates (`dense=True`), and which one `candidate_scores` chooses.

Shapes: `kuairand` (944,385 x 32 item table, 50,001 candidates, 800-item histories), `kuairand-15k` (the
same with 15,001 candidates, near where the two scoring paths cost the same) and `amazon` (14,854 x 32, 101
candidates, 50-item histories). Embeddings are random unit vectors: the cost does not depend on the
values. The last line printed is one JSON object: milliseconds per sequence for each part and shape, and the
ratios before/after `sampling_speedup` and `scoring_speedup` (KuaiRand; evaluation always gathered before),
and `max_chosen_over_faster`: the scoring path the rule chose, over the faster one, at worst (1.0 = always
the faster).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from autocdsr import evaluation  # noqa: E402

SHAPES: dict[str, dict[str, int]] = {
    "kuairand": {"num_items": 944_384, "negatives": 50_000, "history": 800},
    "kuairand-15k": {"num_items": 944_384, "negatives": 15_000, "history": 800},  # near the crossover
    "amazon": {"num_items": 14_853, "negatives": 100, "history": 50},
}


def rejection_sampler(num_items: int, n: int, exclude: np.ndarray, seed: int) -> np.ndarray:
    """The baseline: the sampler `autocdsr.evaluation` used until 2026-11-29 (same distribution)."""
    excl = np.unique(exclude[(exclude >= 1) & (exclude <= num_items)])
    rng = np.random.default_rng(seed)
    out = np.empty(0, dtype=np.int64)
    while len(out) < n:
        draw = rng.integers(1, num_items + 1, size=2 * (n - len(out)) + 8)
        draw = draw[~np.isin(draw, excl)]
        out = np.unique(np.concatenate([out, draw]))
    return rng.permutation(out)[:n]


def per_sequence_ms(fn: Callable[[], Any], sequences: int) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000 / sequences


def measure(shape: str, batch: int, rounds: int) -> dict[str, Any]:
    cfg = SHAPES[shape]
    num_items, n = cfg["num_items"], cfg["negatives"]
    rng = np.random.default_rng(0)
    histories = [rng.integers(1, num_items + 1, size=cfg["history"]) for _ in range(batch)]
    g = torch.Generator().manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(num_items + 1, 32, generator=g), dim=-1)
    user = torch.randn(batch, 32, generator=g)

    def draw(sampler: Callable[..., np.ndarray]) -> np.ndarray:
        return np.stack([sampler(num_items, n, h, k) for k, h in enumerate(histories)])

    negs = draw(evaluation.sample_negatives)
    cand = torch.cat(
        [torch.as_tensor([int(h[-1]) for h in histories]).unsqueeze(1), torch.as_tensor(negs)], 1
    )
    chosen = evaluation.scores_densely(cand.shape[1], emb.shape[0])
    gathered = evaluation.candidate_scores(user, emb, cand, dense=False)
    torch.testing.assert_close(evaluation.candidate_scores(user, emb, cand, dense=True), gathered)

    times: dict[str, list[float]] = {
        "sample_new": [],
        "sample_rejection": [],
        "score_gather": [],
        "score_dense": [],
    }
    for _ in range(rounds):  # interleaved, so drift of the machine hits every variant alike
        times["sample_new"].append(per_sequence_ms(lambda: draw(evaluation.sample_negatives), batch))
        times["sample_rejection"].append(per_sequence_ms(lambda: draw(rejection_sampler), batch))
        times["score_gather"].append(
            per_sequence_ms(lambda: evaluation.candidate_scores(user, emb, cand, dense=False), batch)
        )
        times["score_dense"].append(
            per_sequence_ms(lambda: evaluation.candidate_scores(user, emb, cand, dense=True), batch)
        )
    med = {k: statistics.median(v) for k, v in times.items()}
    chosen_ms = med["score_dense" if chosen else "score_gather"]
    return {
        "shape": shape,
        **cfg,
        "batch": batch,
        "rounds": rounds,
        "ms_per_sequence": {k: round(v, 3) for k, v in med.items()},
        "spread": {k: round((max(v) - min(v)) / statistics.median(v), 3) for k, v in times.items()},
        "chosen_scoring": "dense" if chosen else "gather",
        "sampling_speedup": round(med["sample_rejection"] / med["sample_new"], 2),
        # before 2026-11-29 evaluation always gathered; now `candidate_scores` chooses
        "scoring_speedup": round(med["score_gather"] / chosen_ms, 2),
        # 1.0: the rule chose the faster path; near the crossover either is within noise of the other
        "chosen_over_faster": round(chosen_ms / min(med["score_dense"], med["score_gather"]), 2),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5, help="interleaved repetitions; medians are reported")
    p.add_argument("--batch", type=int, default=256, help="sequences per evaluation batch (eval.batch_size)")
    p.add_argument("--quick", action="store_true", help="2 rounds of 64 sequences")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.batch = 2, 64
    torch.set_num_threads(1)
    print(
        f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, numpy {np.__version__}, 1 thread"
    )
    results = [measure(shape, args.batch, args.rounds) for shape in SHAPES]
    print(
        "| shape | sampling: this project | rejection (before) | speed-up | scoring: gather | dense | chosen |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in results:
        m = r["ms_per_sequence"]
        print(
            f"| {r['shape']} | {m['sample_new']:.2f} ms | {m['sample_rejection']:.2f} ms | "
            f"{r['sampling_speedup']:.1f}x | {m['score_gather']:.2f} ms | {m['score_dense']:.2f} ms | "
            f"{r['chosen_scoring']} |"
        )
    kuai = results[0]
    print(
        json.dumps(
            {
                "sampling_speedup": kuai["sampling_speedup"],
                "scoring_speedup": kuai["scoring_speedup"],
                "max_chosen_over_faster": max(r["chosen_over_faster"] for r in results),
                "runs": results,
            }
        )
    )


if __name__ == "__main__":
    main()
