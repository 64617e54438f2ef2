"""Paired comparison over seeds: is a method ahead of a baseline, domain by domain, beyond seed noise?

`python -m autocdsr.paired RESULTS.json [RESULTS.json ...] [--baseline cd] [--metric ndcg_10] [--json]`
`python -m autocdsr.paired --tracking-uri URI --experiment NAME [--experiment NAME ...] [...]`

The results issue's bar for `cd+autocdsr` is: not worse than `cd` on any domain beyond seed noise, and
better on average. This module makes that judgement mechanical. It reads the run records that
`bench/reproduce.py` writes (``results.json``: one record per trained run with its backbone, method, seed,
config overrides and test metrics), pairs every run with the baseline run of the same dataset (sequence
manifest), backbone and seed whose settings it shares, and reports per domain the paired difference of the
metric over seeds: mean, sample sd, a two-sided paired t-test, and how many seeds are ahead and behind.

Pairing. A record's settings are its overrides (``KEY=VALUE``, the last value of a key wins) without the
keys that name the run or say where or how it executed rather than what it trained (``method``, ``seed``,
``mlflow.*``, ``registry.*``, ``train.storage_path`` ...: ``RUN_KEYS``, ``RUN_PREFIXES``). A run pairs with the
baseline run whose settings are a subset of its own, the most specific one where several are; what the run
sets beyond its baseline names the variant (e.g. ``autocdsr.start_after=warmup``). So runs with another
budget (``train.max_steps=1500`` against 3000) never pair, and runs from several ``results.json`` files
(one folder per run, as long experiments are often laid out) group by variant and budget.

From MLflow (``--experiment``, any number, on one tracking store): every FINISHED training run with test
metrics is a record. Its dataset is the sequence manifest it trained on (the run's ``data.manifest_sha256``
tag), and its settings are the logged params whose values differ from the code's defaults
(`autocdsr.config.TrainConfig`), i.e. the overrides it effectively ran with, whichever config file or
command line set them (without the run-naming keys above). Where one run and seed has several finished
runs, the latest counts.

Verdict, at ``--alpha`` (0.05): with fewer than two paired seeds there is no estimate of seed noise and no
verdict. A domain is *behind beyond noise* when its mean difference is negative with p < alpha. The bar is
*met* when the variant is ahead on average with p < alpha and no domain is behind beyond noise; its *letter
is met* when it is ahead on average, not beyond noise, and no domain is behind beyond noise. With a handful
of seeds the test has little power: "no domain behind beyond noise" then says little, which is why the
counts of seeds ahead and behind are printed next to it.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("autocdsr.paired")

# keys that name a run, or say where or how it executed, rather than what it trained: never settings
RUN_KEYS = (
    "method",
    "seed",
    "autocdsr.method",  # derived from `method`
    "train.storage_path",
    "train.resume",
    "train.log_every",
    "train.max_failures",
    "eval.batch_size",
)
RUN_PREFIXES = ("mlflow.", "registry.")


def t_two_sided_p(t: float, df: int) -> float:
    """P(|T| >= |t|) for Student's t with integer ``df`` >= 1, in closed form (the finite series of the
    t distribution's CDF for integer degrees of freedom; no SciPy at run time)."""
    if df < 1:
        raise ValueError(f"t_two_sided_p: df must be >= 1, got {df}")
    if math.isnan(t):
        return math.nan
    if math.isinf(t):
        return 0.0
    theta = math.atan(abs(t) / math.sqrt(df))
    s, c2 = math.sin(theta), math.cos(theta) ** 2
    if df % 2 == 1:
        # A = (2/pi) (theta + sin cos (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ... up to cos^(df-3)))
        term, total = 1.0, 1.0 if df > 1 else 0.0
        for k in range(1, (df - 1) // 2):
            term *= c2 * (2 * k) / (2 * k + 1)
            total += term
        inside = 2.0 / math.pi * (theta + s * math.cos(theta) * total)
    else:
        # A = sin (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ... up to cos^(df-2))
        term, total = 1.0, 1.0
        for k in range(1, df // 2):
            term *= c2 * (2 * k - 1) / (2 * k)
            total += term
        inside = s * total
    return min(max(1.0 - inside, 0.0), 1.0)


@dataclass(frozen=True)
class PairedDiff:
    """One domain's paired difference (variant − baseline) of one metric over seeds."""

    domain: str
    seeds: tuple[int, ...]
    variant_mean: float
    baseline_mean: float
    mean: float
    sd: float  # sample sd of the per-seed differences (nan with one seed)
    p: float  # two-sided paired t-test (nan with one seed)
    ahead: int  # seeds where the variant is ahead
    behind: int
    variant_hits: float | None = None  # mean top-k hits per seed (recall × targets), where known
    baseline_hits: float | None = None

    @property
    def n(self) -> int:
        return len(self.seeds)


def paired_diff(
    domain: str,
    variant: Mapping[int, float],
    baseline: Mapping[int, float],
    variant_hits: Mapping[int, float] | None = None,
    baseline_hits: Mapping[int, float] | None = None,
) -> PairedDiff:
    """Paired difference over the seeds both mappings (seed -> metric) have."""
    seeds = tuple(sorted(set(variant) & set(baseline)))
    if not seeds:
        raise ValueError(f"paired_diff({domain!r}): no seed in common")
    d = [variant[s] - baseline[s] for s in seeds]
    n = len(d)
    mean = sum(d) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1)) if n > 1 else math.nan
    if n < 2:
        p = math.nan
    elif sd == 0:  # every seed moved by the same amount: t is 0 or infinite
        p = 1.0 if mean == 0 else 0.0
    else:
        p = t_two_sided_p(mean / (sd / math.sqrt(n)), n - 1)

    def hits(m: Mapping[int, float] | None) -> float | None:
        return sum(m[s] for s in seeds) / n if m is not None and all(s in m for s in seeds) else None

    return PairedDiff(
        domain, seeds, sum(variant[s] for s in seeds) / n, sum(baseline[s] for s in seeds) / n, mean, sd, p,
        sum(x > 0 for x in d), sum(x < 0 for x in d), hits(variant_hits), hits(baseline_hits),
    )  # fmt: skip


@dataclass(frozen=True)
class Verdict:
    met: bool  # ahead on average beyond noise, no domain behind beyond noise
    letter_met: bool  # ahead on average (perhaps within noise), no domain behind beyond noise
    behind_beyond_noise: tuple[str, ...]
    text: str


def bar_verdict(overall: PairedDiff, domains: Sequence[PairedDiff], alpha: float = 0.05) -> Verdict:
    """The results issue's bar on paired differences (module docstring)."""
    if overall.n < 2:
        return Verdict(False, False, (), "one paired seed: no estimate of seed noise, no verdict")
    behind = tuple(d.domain for d in domains if d.mean < 0 and d.p < alpha)
    if behind:
        return Verdict(False, False, behind, f"not met: behind beyond noise on {', '.join(behind)}")
    if not overall.mean > 0:
        return Verdict(False, False, (), f"not met: not ahead on average (p = {overall.p:.2f})")
    if overall.p < alpha:
        return Verdict(True, True, (), f"met: ahead on average beyond noise (p = {overall.p:.3f}), "
                                       "no domain behind beyond noise")  # fmt: skip
    return Verdict(False, True, (), f"letter met: ahead on average within noise (p = {overall.p:.2f}), "
                                    "no domain behind beyond noise")  # fmt: skip


# ----------------------------------------------------------------------------- run records


def settings(record: Mapping[str, Any]) -> dict[str, str]:
    """A record's configuring overrides as a dict (last value of a key wins; run-naming keys dropped)."""
    out: dict[str, str] = {}
    for item in record.get("overrides", []):
        key, sep, value = str(item).partition("=")
        if not sep:
            raise ValueError(f"run {record.get('run_name', '?')}: override {item!r} is not KEY=VALUE")
        if key in RUN_KEYS or key.startswith(RUN_PREFIXES):
            continue
        out[key] = value
    if "relabel" in record and "data.relabel_fraction" not in out:
        out["data.relabel_fraction"] = str(float(record["relabel"]))
    return out


@dataclass
class Comparison:
    """Every paired seed of one variant (backbone, method, settings beyond the baseline's) against it."""

    dataset: str
    backbone: str
    method: str
    baseline: str
    extra: tuple[tuple[str, str], ...]  # the variant's settings beyond its baseline's
    shared: tuple[tuple[str, str], ...]  # the baseline's settings (the budget both share)
    pairs: dict[int, tuple[dict[str, Any], dict[str, Any]]] = field(default_factory=dict)  # seed -> (v, b)

    @property
    def label(self) -> str:
        own = " ".join(f"{k}={v}" for k, v in self.extra)
        return f"`{self.method}`" + (f" with {own}" if own else "")


def load_records(paths: Iterable[Path]) -> list[dict[str, Any]]:
    """The run records of reproduce's results.json files, each tagged with its file's dataset and manifest."""
    records = []
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: not a readable results.json ({exc})") from exc
        if not isinstance(data, dict) or not isinstance(data.get("runs"), list):
            raise ValueError(f"{path}: no 'runs' list; expected bench/reproduce.py's results.json")
        manifest = data.get("manifest_sha256") or str(data.get("sequences", path))
        records += tag_records(data["runs"], data.get("dataset", "?"), manifest, str(path))
    return records


def tag_records(
    runs: Iterable[Mapping[str, Any]], dataset: str, manifest: str, source: str
) -> list[dict[str, Any]]:
    """Run records with the dataset, sequence manifest and source they came from (what `pair_runs` groups
    by); raises naming the source and run when a record lacks what pairing needs."""
    out = []
    for i, r in enumerate(runs):
        missing = [k for k in ("backbone", "method", "seed", "metrics") if k not in r]
        if missing:
            raise ValueError(f"{source}: run {i} lacks {', '.join(missing)}")
        out.append({**r, "_dataset": dataset, "_manifest": manifest, "_file": source})
    return out


def mlflow_records(uri: str, experiments: Sequence[str]) -> tuple[list[dict[str, Any]], int]:
    """Run records of the FINISHED training runs of MLflow experiments, oldest first (module docstring).
    Returns them and how many runs were left out (unfinished, or not a training run with test metrics)."""
    from mlflow import MlflowClient

    from autocdsr.config import TrainConfig
    from autocdsr.tracking import safe_params

    defaults = safe_params(TrainConfig().to_dict())
    client = MlflowClient(uri)
    records: list[dict[str, Any]] = []
    skipped = 0
    for name in experiments:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise ValueError(f"no experiment {name!r} at {uri}")
        runs, token = [], None
        while True:
            page = client.search_runs(
                [exp.experiment_id],
                max_results=1000,
                order_by=["attributes.start_time ASC"],
                page_token=token,
            )
            runs += list(page)
            token = page.token
            if not token:
                break
        source, left_out = f"{uri} experiment {name}", 0
        for run in runs:
            params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
            trained = run.info.status == "FINISHED" and all(
                k in params for k in ("method", "seed", "model.backbone")
            )
            if not trained or not any(k.startswith("test/") for k in metrics):
                left_out += 1
                continue
            overrides = [f"{k}={v}" for k, v in sorted(params.items()) if defaults.get(k) != v]
            record = {
                "backbone": params["model.backbone"], "method": params["method"], "seed": int(params["seed"]),
                "metrics": dict(metrics), "overrides": overrides, "run_id": run.info.run_id,
                "run_name": run.info.run_name,
            }  # fmt: skip
            manifest = tags.get("data.manifest_sha256") or tags.get("data.path") or source
            records += tag_records([record], tags.get("data.path", name), manifest, source)
        if left_out:
            log.warning("%s: %d run(s) left out (unfinished, or no test metrics)", source, left_out)
        skipped += left_out
    return records, skipped


def pair_runs(records: Sequence[Mapping[str, Any]], baseline: str = "cd") -> tuple[list[Comparison], int]:
    """Group the non-baseline runs by variant and pair each with its baseline run (module docstring).
    Returns the comparisons and how many runs found no baseline run to pair with."""

    def key(r: Mapping[str, Any]) -> tuple:
        return (r["_manifest"], r["backbone"], int(r["seed"]))

    bases: dict[tuple, list[tuple[dict[str, str], Mapping[str, Any]]]] = {}
    for r in records:
        if r["method"] == baseline:
            bases.setdefault(key(r), []).append((settings(r), r))
    groups: dict[tuple, Comparison] = {}
    unpaired = 0
    for r in records:
        if r["method"] == baseline:
            continue
        own = settings(r)
        fits = [(s, b) for s, b in bases.get(key(r), []) if all(own.get(k) == v for k, v in s.items())]
        if not fits:
            unpaired += 1
            log.info("no %s run to pair %s (%s) with", baseline, r.get("run_name", r["method"]), r["_file"])
            continue
        most = max(len(s) for s, _ in fits)
        best = [(s, b) for s, b in fits if len(s) == most]
        if len(best) > 1:
            log.warning(
                "%d %s runs fit %s seed %s equally; pairing with the later one (%s)",
                len(best), baseline, r.get("run_name", r["method"]), r["seed"], best[-1][1]["_file"],
            )  # fmt: skip
        base_settings, base = best[-1]
        extra = tuple(sorted((k, v) for k, v in own.items() if k not in base_settings))
        shared = tuple(sorted(base_settings.items()))
        gkey = (r["_manifest"], r["backbone"], r["method"], extra, shared)
        comp = groups.setdefault(
            gkey, Comparison(r["_dataset"], r["backbone"], r["method"], baseline, extra, shared)
        )
        seed = int(r["seed"])
        if seed in comp.pairs:
            log.warning(
                "%s seed %d appears twice; keeping the later record (%s)", comp.label, seed, r["_file"]
            )
        comp.pairs[seed] = (dict(r), dict(base))
    return list(groups.values()), unpaired


def domains_of(comp: Comparison, metric: str) -> list[str]:
    """The domains both sides report the metric for, in first-seen order, without "all" (`compare` adds it)."""
    found: list[str] = []
    for v, b in comp.pairs.values():
        for k in v["metrics"]:
            if k.startswith(f"test/{metric}/") and k in b["metrics"]:
                d = k.split("/", 2)[2]
                if d not in found and d != "all":
                    found.append(d)
    return found


def compare(comp: Comparison, metric: str = "ndcg_10") -> tuple[list[PairedDiff], PairedDiff]:
    """Per-domain and overall paired differences of one comparison."""
    k = metric.rsplit("_", 1)[-1]

    def per_seed(side: int, name: str) -> dict[int, float]:
        out = {}
        for seed, pair in comp.pairs.items():
            value = pair[side]["metrics"].get(name)
            if value is not None and math.isfinite(value):
                out[seed] = float(value)
        return out

    def hits(side: int, d: str) -> dict[int, float] | None:
        recall, n = per_seed(side, f"test/recall_{k}/{d}"), per_seed(side, f"test/num_sequences/{d}")
        return {s: recall[s] * n[s] for s in recall if s in n} or None

    rows = []
    for d in [*domains_of(comp, metric), "all"]:
        v, b = per_seed(0, f"test/{metric}/{d}"), per_seed(1, f"test/{metric}/{d}")
        if set(v) & set(b):
            rows.append(paired_diff(d, v, b, hits(0, d), hits(1, d)))
    overall = [r for r in rows if r.domain == "all"]
    if not overall:
        raise ValueError(f"{comp.label} ({comp.backbone}): no paired test/{metric}/all metric")
    return [r for r in rows if r.domain != "all"], overall[0]


# ----------------------------------------------------------------------------- report


def _num(x: float, digits: int = 5) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def _sd(x: float) -> str:
    return "–" if not math.isfinite(x) else f"{x:.2e}"


def _hits(x: float | None) -> str:
    return "–" if x is None else f"{x:.1f}"


def markdown(comp: Comparison, metric: str = "ndcg_10", alpha: float = 0.05) -> str:
    """One comparison as a markdown block: a table over domains and the verdict."""
    domains, overall = compare(comp, metric)
    verdict = bar_verdict(overall, domains, alpha)
    k = metric.rsplit("_", 1)[-1]
    seeds = ", ".join(map(str, overall.seeds))
    lines = [
        f"#### {comp.dataset}, {comp.backbone}: {comp.label} against `{comp.baseline}` (seeds {seeds})",
        "",
        "Budget both share: " + (" ".join(f"`{k_}={v}`" for k_, v in comp.shared) or "the config files'"),
        "",
        f"| domain | hits@{k} per seed, variant / baseline | {metric} variant | {metric} baseline "
        f"| paired difference (mean ± sd) | p (paired t) | seeds ahead / behind |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in [*domains, overall]:
        lines.append(
            f"| {r.domain} | {_hits(r.variant_hits)} / {_hits(r.baseline_hits)} | {_num(r.variant_mean)} "
            f"| {_num(r.baseline_mean)} | {r.mean:+.2e} ± {_sd(r.sd)} | {_num(r.p, 3)} | {r.ahead} / {r.behind} |"
        )
    lines += ["", f"**Bar** (alpha {alpha:g}): {verdict.text}.", ""]
    return "\n".join(lines)


def summary(comp: Comparison, metric: str = "ndcg_10", alpha: float = 0.05) -> dict[str, Any]:
    domains, overall = compare(comp, metric)
    verdict = bar_verdict(overall, domains, alpha)
    return {
        "dataset": comp.dataset, "backbone": comp.backbone, "method": comp.method, "baseline": comp.baseline,
        "extra": dict(comp.extra), "shared": dict(comp.shared), "metric": metric,
        "domains": [asdict(d) for d in domains], "all": asdict(overall), "verdict": asdict(verdict),
    }  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m autocdsr.paired",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("results", nargs="*", type=Path, help="results.json files written by bench/reproduce.py")
    p.add_argument(
        "--experiment", action="append", default=[], metavar="NAME",
        help="read the runs from this MLflow experiment instead (repeatable; not together with results.json)",
    )  # fmt: skip
    p.add_argument(
        "--tracking-uri", help="with --experiment; default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db"
    )
    p.add_argument("--baseline", default="cd", help="the method every other one is paired with (default cd)")
    p.add_argument("--metric", default="ndcg_10", help="test metric to compare, e.g. ndcg_10, recall_20")
    p.add_argument("--alpha", type=float, default=0.05, help="significance level of 'beyond seed noise'")
    p.add_argument("--backbone", choices=["sasrec", "bert4rec"], help="only this backbone")
    p.add_argument("--method", help="only this method (e.g. cd+autocdsr)")
    p.add_argument("--json", action="store_true", help="one JSON object per comparison instead of markdown")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    if not 0 < args.alpha < 1:
        raise SystemExit(f"--alpha must be in (0, 1), got {args.alpha}")
    if bool(args.results) == bool(args.experiment):
        raise SystemExit(
            "give results.json files or --experiment NAME (MLflow), not both: their settings are read "
            "differently (overrides against MLflow params that differ from the defaults), so they do not pair"
        )
    try:
        if args.experiment:
            from autocdsr.tracking import tracking_uri

            records, _ = mlflow_records(tracking_uri(args.tracking_uri), args.experiment)
        else:
            records = load_records(args.results)
        comps, unpaired = pair_runs(records, args.baseline)
    except ValueError as exc:
        raise SystemExit(str(exc)) from exc
    comps = [c for c in comps if args.backbone in (None, c.backbone) and args.method in (None, c.method)]
    if not comps:
        raise SystemExit(
            f"no run could be paired with a {args.baseline!r} run of the same backbone, seed and budget"
        )
    comps.sort(key=lambda c: (c.dataset, c.backbone, c.shared, c.method, c.extra))
    for c in comps:
        print(
            json.dumps(summary(c, args.metric, args.alpha))
            if args.json
            else markdown(c, args.metric, args.alpha)
        )
    if unpaired:
        print(
            f"({unpaired} run(s) had no {args.baseline} run of the same backbone, seed and budget)",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
