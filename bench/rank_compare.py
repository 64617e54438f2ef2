"""Compare trained runs on the whole rank distribution of their test targets, paired per example.

    python bench/rank_compare.py RESULTS [RESULTS ...] [--negatives all|N] [--out DIR]

RESULTS is a `bench/reproduce.py` output folder (``--out``/<dataset>, or any folder above it) or its
``results.json``; runs from several invocations are pooled when they were trained on the same sequences.
For every run with one checkpoint for all domains (not `single`), the best checkpoint ranks every test
target against ``--negatives`` (default: full ranking over all items, the user's history excluded, ties
against the target; N: the same seeded negatives as the runs' own evaluation).

Why: at budgets where NDCG@10 rests on a handful of hits (KuaiRand on the 2-core CPU, docs/results.md) the top
of the ranking cannot separate methods, but where *every* target lands still can. Printed, and written to
``--out``/rank_compare.json with each run's per-example ranks in ``--out``/ranks/:
- per run: NDCG@10, Recall@10/100/1,000/10,000, MRR, the mean of log10(rank + 1) and the median rank, next to
  a popularity ranking (items scored by their count in the train split; full ranking only);
- per method against `cd` of the same backbone, seed and relabel fraction: the paired differences of mean
  log10(rank + 1) and of NDCG@10 with 95% bootstrap intervals over test examples (the test-sampling noise of
  a fixed pair of models) and the share of examples each ranks higher, overall and per target domain;
- `cd` seed against `cd` seed: the size of a difference that training seeds alone make.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from autocdsr import analysis, evaluation  # noqa: E402
from autocdsr.config import load_train_config  # noqa: E402
from autocdsr.data import shards  # noqa: E402
from autocdsr.training import load_best_model  # noqa: E402

log = logging.getLogger("bench.rank_compare")


def find_results(paths: list[str]) -> list[Path]:
    """results.json files named directly or found at most two folders below each path."""
    found: list[Path] = []
    for p in map(Path, paths):
        hits = (
            [p]
            if p.is_file()
            else sorted({*p.glob("results.json"), *p.glob("*/results.json"), *p.glob("*/*/results.json")})
        )
        if not hits:
            raise SystemExit(
                f"{p}: no results.json there (give a bench/reproduce.py --out folder or the file)"
            )
        found += hits
    return found


def collect_runs(files: list[Path]) -> tuple[str, str, list[dict[str, Any]]]:
    """(dataset, sequences, runs) pooled over results.json files of the same sequences; `single` left out."""
    dataset = sequences = manifest = None
    runs: list[dict[str, Any]] = []
    for f in files:
        data = json.loads(f.read_text())
        if manifest is None:
            dataset, sequences, manifest = data["dataset"], data["sequences"], data["manifest_sha256"]
        elif data["manifest_sha256"] != manifest:
            raise SystemExit(
                f"{f}: trained on other sequences ({data['sequences']}, manifest {data['manifest_sha256'][:12]}) "
                f"than {files[0]} ({sequences}, {manifest[:12]}); compare runs of one dataset build"
            )
        for r in data["runs"]:
            ckpt = r.get("checkpoints", {}).get("all")
            if r["method"] == "single" or ckpt is None:
                continue
            if not (Path(ckpt) / "state.pt").exists():
                raise SystemExit(f"{f}: run {r['run_name']} names checkpoint {ckpt}, which holds no state.pt")
            runs.append({**r, "results": str(f)})
    if not runs:
        raise SystemExit(f"no run with a checkpoint for all domains in {', '.join(map(str, files))}")
    label_runs(runs, files)
    return str(dataset), str(sequences), runs


PER_RUN = ("method=", "seed=", "data.relabel_fraction=", "mlflow.run_name=")


def label_runs(runs: list[dict[str, Any]], files: list[Path]) -> None:
    """Give each run a ``label`` and ``extra`` (its overrides beyond those every run shares, e.g. a
    `--set` of one invocation), so that two runs of one method and seed stay apart, and ``base_label``
    (the label without the extras); refuse two runs that would still share a label."""
    common = set.intersection(*(set(r["overrides"]) for r in runs))
    for r in runs:
        r["extra"] = tuple(o for o in r["overrides"] if o not in common and not o.startswith(PER_RUN))
        tag = f" relabel {r['relabel']:g}" if r.get("relabel") else ""
        more = f" [{' '.join(r['extra'])}]" if r["extra"] else ""
        r["base_label"] = f"{r['backbone']} {r['method']} seed {r['seed']}{tag}"  # without the extras
        r["label"] = r["base_label"] + more
    keys = [r["label"] for r in runs]
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    if dupes:
        raise SystemExit(f"runs named twice across {', '.join(map(str, files))}: {', '.join(dupes)}")


def results_parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    """The arguments every reader of bench/reproduce.py outputs takes: RESULTS... and --config."""
    p = argparse.ArgumentParser(
        prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("results", nargs="+", help="bench/reproduce.py output folders or their results.json")
    p.add_argument(
        "--config",
        default=None,
        help="training config the runs' overrides apply to (default: conf/train/<dataset>-<backbone>.yaml, "
        "as bench/reproduce.py uses)",
    )
    return p


def run_ranks(
    info: shards.DatasetInfo, config: Path, r: dict[str, Any], negatives: str
) -> dict[str, np.ndarray]:
    """sequence_id -> rank of every test target for one run's best checkpoint (sorted by sequence_id)."""
    import torch

    cfg = load_train_config(config, r["overrides"])
    model = load_best_model(cfg, info, r["checkpoints"]["all"])
    ecfg = dataclasses.replace(cfg.eval, num_negatives=negatives if negatives == "all" else int(negatives))
    sids: list[str] = []
    ranks, doms = [], []
    for b in evaluation.iter_ranks(model, info, "test", ecfg, 0, 1, torch.device("cpu"), cfg.data.max_len):
        sids += b.sequence_ids
        ranks.append(b.ranks.numpy())
        doms.append(b.target_domains.numpy())
    order = np.argsort(sids)
    return {
        "sequence_id": np.asarray(sids)[order],
        "rank": np.concatenate(ranks)[order],
        "domain_idx": np.concatenate(doms)[order],
    }


def popularity(info: shards.DatasetInfo) -> dict[str, np.ndarray]:
    """Ranks of the test targets when items are scored by their count in the train split (full ranking)."""
    counts = np.zeros(info.vocab.num_items + 1, dtype=np.int64)
    for b in shards.iter_eval_rows(info, "train", 0, 1, 1024, columns=("item_idx",)):
        for seq in shards.list_arrays(b.column("item_idx")):
            np.add.at(counts, seq, 1)
    sids, hists, targets, doms = [], [], [], []
    for b in shards.iter_eval_rows(info, "test", 0, 1, 1024):
        sids += b.column("sequence_id").to_pylist()
        for items, d in zip(
            shards.list_arrays(b.column("item_idx")), shards.list_arrays(b.column("domain_idx")), strict=True
        ):
            hists.append(items[:-1])
            targets.append(items[-1])
            doms.append(d[-1])
    ranks = analysis.popularity_ranks(counts, hists, np.asarray(targets))
    order = np.argsort(sids)
    return {
        "sequence_id": np.asarray(sids)[order],
        "rank": ranks[order],
        "domain_idx": np.asarray(doms)[order],
    }


def comparisons(
    runs: list[dict[str, Any]], ranks: dict[str, dict[str, np.ndarray]], n_boot: int, domains: list[str]
) -> list[dict]:
    """Each method against `cd` of the same (backbone, seed, relabel), and every pair of `cd` seeds; overall
    and per target domain (``by_domain``)."""
    out = []
    by_key = {
        (r["backbone"], r["method"], r["seed"], r.get("relabel", 0.0), r["extra"]): r["label"] for r in runs
    }

    def pair(a: str, b: str, kind: str) -> None:
        ra, rb = ranks[a], ranks[b]
        if not np.array_equal(ra["sequence_id"], rb["sequence_id"]):
            raise SystemExit(f"{a} and {b} ranked different test sequences; re-run both on one dataset build")
        by_domain = {}
        for d, name in enumerate(domains, start=1):
            mask = ra["domain_idx"] == d
            if mask.any():
                by_domain[name] = analysis.paired_comparison(ra["rank"][mask], rb["rank"][mask], n_boot)
        overall = analysis.paired_comparison(ra["rank"], rb["rank"], n_boot)
        out.append({"a": a, "b": b, "kind": kind, **overall, "by_domain": by_domain})

    for (bb, method, seed, frac, extra), label in sorted(by_key.items()):
        # the `cd` run with the same extra overrides, else the plain one
        base = by_key.get((bb, "cd", seed, frac, extra)) or by_key.get((bb, "cd", seed, frac, ()))
        if method != "cd" and base is not None:
            pair(label, base, "method vs cd")
    cds = sorted((k, v) for k, v in by_key.items() if k[1] == "cd")
    for i, (ka, a) in enumerate(cds):
        for kb, b in cds[i + 1 :]:
            if (ka[0], ka[3], ka[4]) == (kb[0], kb[3], kb[4]):
                pair(b, a, "cd seed vs cd seed")
    return out


def report(
    summaries: dict[str, dict[str, float]], pairs: list[dict], negatives: str, domains: list[str]
) -> str:
    cand = "all items (full ranking)" if negatives == "all" else f"the target + {negatives} sampled negatives"
    lines = [
        f"Test targets ranked against {cand}; rank 0 = first.",
        "",
        "| run | n | NDCG@10 | R@10 | R@100 | R@1,000 | R@10,000 | MRR | mean log10(rank+1) | median rank |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in summaries.items():
        lines.append(
            f"| {name} | {s['n']:.0f} | {s['ndcg_10']:.4f} | {s['recall_10']:.4f} | {s['recall_100']:.4f} | "
            f"{s['recall_1000']:.4f} | {s['recall_10000']:.4f} | {s['mrr']:.5f} | {s['mean_log10_rank']:.3f} | "
            f"{s['median_rank']:.0f} |"
        )
    if pairs:
        lines += [
            "",
            "Paired over test examples, a − b (95% bootstrap interval over examples):",
            "",
            "| a | b | Δ mean log10(rank+1) | Δ NDCG@10 | a higher / lower |",
            "|---|---|---|---|---|",
        ]
        for p in pairs:
            lines.append(
                f"| {p['a']} | {p['b']} | {p['d_log10_rank']:+.4f} ({p['d_log10_rank_lo']:+.4f} … "
                f"{p['d_log10_rank_hi']:+.4f}) | {p['d_ndcg_10']:+.4f} ({p['d_ndcg_10_lo']:+.4f} … "
                f"{p['d_ndcg_10_hi']:+.4f}) | {p['share_a_higher']:.1%} / {p['share_a_lower']:.1%} |"
            )
        lines += [
            "",
            "Per target domain, Δ mean log10(rank+1) (95% interval; n = the domain's test targets):",
            "",
            "| a | b | " + " | ".join(domains) + " |",
            "|---|---|" + "---|" * len(domains),
        ]
        for p in pairs:
            cells = []
            for name in domains:
                c = p["by_domain"].get(name)
                cells.append(
                    "–"
                    if c is None
                    else f"{c['d_log10_rank']:+.3f} ({c['d_log10_rank_lo']:+.3f} … {c['d_log10_rank_hi']:+.3f}), "
                    f"n {c['n']:.0f}"
                )
            lines.append(f"| {p['a']} | {p['b']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = results_parser("python bench/rank_compare.py", __doc__)
    p.add_argument("--negatives", default="all", help="'all' (full ranking, default) or N sampled negatives")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples of the test examples")
    p.add_argument(
        "--out",
        default=str(REPO / "bench/out/rank_compare"),
        help="folder for rank_compare.json and ranks/ (created; git-ignored by default)",
    )
    args = p.parse_args(argv)
    if args.negatives != "all" and not (args.negatives.isdigit() and int(args.negatives) > 0):
        p.error(f"--negatives must be 'all' or a positive integer, got {args.negatives!r}")
    if args.bootstrap < 1:
        p.error(f"--bootstrap must be >= 1, got {args.bootstrap}")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    dataset, sequences, runs = collect_runs(find_results(args.results))
    info = shards.open_dataset(sequences)
    out = Path(args.out)
    (out / "ranks").mkdir(parents=True, exist_ok=True)
    ranks: dict[str, dict[str, np.ndarray]] = {}
    for i, r in enumerate(runs, 1):
        label = r["label"]
        log.info("[%d/%d] ranking the test targets of %s (%s)", i, len(runs), label, r["checkpoints"]["all"])
        config = Path(args.config or REPO / f"conf/train/{dataset}-{r['backbone']}.yaml")
        ranks[label] = run_ranks(info, config, r, args.negatives)
        stem = out / "ranks" / re.sub(r"[^A-Za-z0-9_.=-]+", "_", label)
        np.savez(f"{stem}.tmp.npz", **ranks[label])  # complete or absent
        os.replace(f"{stem}.tmp.npz", f"{stem}.npz")
    if args.negatives == "all":  # against sampled negatives it would need the runs' own candidates
        log.info("popularity ranking from the train split")
        ranks["popularity (train counts)"] = popularity(info)
    summaries = {name: analysis.rank_summary(v["rank"]) for name, v in ranks.items()}
    domains = list(info.vocab.domains)
    pairs = comparisons(runs, ranks, args.bootstrap, domains)
    text = report(summaries, pairs, args.negatives, domains)
    payload = {
        "dataset": dataset,
        "sequences": sequences,
        "negatives": args.negatives,
        "runs": summaries,
        "pairs": pairs,
    }
    tmp = out / "rank_compare.json.tmp"
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(out / "rank_compare.json")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
