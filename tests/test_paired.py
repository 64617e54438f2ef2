"""autocdsr.paired: the paired t-test, the bar's verdict, pairing runs across results.json files, the CLI."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
from scipy import stats

from autocdsr import paired
from tests.conftest import load_bench_script

DOMAINS = ("A", "B")


def test_two_sided_p_matches_scipy_for_integer_degrees_of_freedom():
    for df, t in itertools.product(range(1, 31), [0.0, 0.3, 1.0, 2.0, 2.776, 4.5, 12.0, -2.1]):
        assert paired.t_two_sided_p(t, df) == pytest.approx(2 * stats.t.sf(abs(t), df), abs=1e-12)
    assert paired.t_two_sided_p(math.inf, 3) == 0.0
    assert math.isnan(paired.t_two_sided_p(math.nan, 3))
    with pytest.raises(ValueError, match="df must be >= 1"):
        paired.t_two_sided_p(1.0, 0)


def test_paired_diff_is_scipys_paired_t_test_on_the_common_seeds():
    variant = {0: 0.30, 1: 0.25, 2: 0.41, 3: 0.33, 7: 0.9}  # seed 7 has no baseline: left out
    baseline = {0: 0.28, 1: 0.27, 2: 0.35, 3: 0.30, 5: 0.1}
    r = paired.paired_diff("A", variant, baseline, {0: 10, 1: 12, 2: 14, 3: 8}, {0: 9, 1: 11, 2: 13, 3: 7})
    seeds = [0, 1, 2, 3]
    diffs = [variant[s] - baseline[s] for s in seeds]
    assert r.seeds == (0, 1, 2, 3) and r.n == 4
    assert r.mean == pytest.approx(sum(diffs) / 4)
    assert r.sd == pytest.approx(stats.tstd(diffs))
    assert r.p == pytest.approx(
        stats.ttest_rel([variant[s] for s in seeds], [baseline[s] for s in seeds]).pvalue
    )
    assert (r.ahead, r.behind) == (3, 1)
    assert (r.variant_hits, r.baseline_hits) == (11.0, 10.0)


def test_paired_diff_edge_cases_one_seed_identical_runs_and_no_common_seed():
    one = paired.paired_diff("A", {0: 0.2}, {0: 0.1})
    assert math.isnan(one.sd) and math.isnan(one.p) and one.ahead == 1
    same = paired.paired_diff("A", {0: 0.2, 1: 0.3}, {0: 0.2, 1: 0.3})
    assert same.mean == 0 and same.p == 1.0 and (same.ahead, same.behind) == (0, 0)
    with pytest.raises(ValueError, match="no seed in common"):
        paired.paired_diff("A", {0: 0.2}, {1: 0.2})


def _diff(domain: str, diffs: list[float]) -> paired.PairedDiff:
    return paired.paired_diff(
        domain, {i: 1.0 + d for i, d in enumerate(diffs)}, dict.fromkeys(range(len(diffs)), 1.0)
    )


def test_bar_verdict_cases():
    ahead_clearly = _diff("all", [0.10, 0.11, 0.12, 0.10])
    ahead_noisily = _diff("all", [0.3, -0.2, 0.1, 0.05])
    clean = [_diff("A", [0.1, -0.1, 0.05, 0.0]), _diff("B", [0.2, 0.21, 0.19, 0.2])]
    v = paired.bar_verdict(ahead_clearly, clean)
    assert v.met and v.letter_met and v.text.startswith("met")
    v = paired.bar_verdict(ahead_noisily, clean)
    assert not v.met and v.letter_met and v.text.startswith("letter met")
    behind = [clean[0], _diff("B", [-0.10, -0.11, -0.09, -0.10])]
    v = paired.bar_verdict(ahead_clearly, behind)
    assert not v.letter_met and v.behind_beyond_noise == ("B",) and "behind beyond noise on B" in v.text
    v = paired.bar_verdict(_diff("all", [-0.1, 0.05, -0.02]), clean)
    assert not v.letter_met and "not ahead on average" in v.text
    v = paired.bar_verdict(_diff("all", [0.3]), clean)
    assert not v.letter_met and "no verdict" in v.text


def _run(method: str, seed: int, ndcg: dict[str, float], overrides: list[str], n: int = 100) -> dict:
    metrics = {}
    for d, value in ndcg.items():
        metrics[f"test/ndcg_10/{d}"] = value
        metrics[f"test/recall_10/{d}"] = 2 * value
        metrics[f"test/num_sequences/{d}"] = n
    # run-naming and execution keys (a per-run storage path, the registry) are never settings
    over = [*overrides, f"method={method}", f"seed={seed}", f"mlflow.run_name=x-{method}-{seed}"]
    over += ["registry.name=null", f"train.storage_path=/tmp/{method}-{seed}"]
    return {
        "backbone": "sasrec",
        "method": method,
        "seed": seed,
        "relabel": 0.0,
        "metrics": metrics,
        "overrides": over,
    }


def _nd(a: float, b: float) -> dict[str, float]:
    return {"A": a, "B": b, "all": (a + b) / 2}


def _write(path: Path, runs: list[dict], manifest: str = "m1") -> Path:
    path.write_text(json.dumps({"dataset": "toy", "manifest_sha256": manifest, "runs": runs}))
    return path


def test_runs_pair_by_backbone_seed_and_budget_across_files_and_group_by_variant(tmp_path: Path):
    long, short = ["train.max_steps=3000"], ["train.max_steps=3000", "train.max_steps=1500"]  # last one wins
    knob = "autocdsr.start_after=warmup"
    files = [
        _write(tmp_path / "a.json", [_run("cd", s, _nd(0.10, 0.20), long) for s in (0, 1, 2)]),
        _write(tmp_path / "b.json", [_run("cd", s, _nd(0.05, 0.10), short) for s in (0, 1)]),
        _write(tmp_path / "c.json", [_run("cd+autocdsr", s, _nd(0.11, 0.21), long) for s in (0, 1, 2)]),
        _write(tmp_path / "d.json", [_run("cd+autocdsr", s, _nd(0.12, 0.19), [*long, knob]) for s in (0, 1)]),
        _write(tmp_path / "e.json", [_run("cd+autocdsr", 0, _nd(0.06, 0.10), short)]),
        _write(
            tmp_path / "f.json", [_run("cd+autocdsr", 0, _nd(0.1, 0.1), ["train.max_steps=999"])]
        ),  # no cd
        _write(
            tmp_path / "g.json", [_run("cd+autocdsr", 1, _nd(0.1, 0.1), long)], manifest="m2"
        ),  # other data
    ]
    comps, unpaired = paired.pair_runs(paired.load_records(files))
    assert unpaired == 2
    by = {(c.extra, c.shared): c for c in comps}
    assert len(by) == 3
    plain = by[((), (("data.relabel_fraction", "0.0"), ("train.max_steps", "3000")))]
    assert sorted(plain.pairs) == [0, 1, 2] and plain.label == "`cd+autocdsr`"
    late = by[
        (
            (("autocdsr.start_after", "warmup"),),
            (("data.relabel_fraction", "0.0"), ("train.max_steps", "3000")),
        )
    ]
    assert sorted(late.pairs) == [0, 1] and "start_after=warmup" in late.label
    assert late.pairs[0][1]["metrics"]["test/ndcg_10/A"] == 0.10  # paired with the 3,000-step cd run
    quick = by[((), (("data.relabel_fraction", "0.0"), ("train.max_steps", "1500")))]
    assert list(quick.pairs) == [0] and quick.pairs[0][1]["metrics"]["test/ndcg_10/A"] == 0.05

    domains, overall = paired.compare(plain)
    assert [d.domain for d in domains] == ["A", "B"]
    assert overall.mean == pytest.approx(0.01) and overall.ahead == 3
    assert domains[0].variant_hits == pytest.approx(22.0) and domains[0].baseline_hits == pytest.approx(20.0)
    text = paired.markdown(late)
    assert "| B |" in text and "0 / 2" in text  # B behind on both seeds
    # the same loss on every seed: a zero-variance difference counts as beyond noise
    assert "**Bar** (alpha 0.05): not met: behind beyond noise on B" in text
    assert "`train.max_steps=3000`" in text


def test_the_most_specific_baseline_wins(tmp_path: Path):
    runs = [
        _run("cd", 0, _nd(0.1, 0.1), []),
        _run("cd", 0, _nd(0.3, 0.3), ["model.d_model=64"]),
        _run("cd+autocdsr", 0, _nd(0.3, 0.3), ["model.d_model=64", "autocdsr.update_every=5"]),
    ]
    (comp,), unpaired = paired.pair_runs(paired.load_records([_write(tmp_path / "r.json", runs)]))
    assert unpaired == 0 and comp.extra == (("autocdsr.update_every", "5"),)
    assert comp.pairs[0][1]["metrics"]["test/ndcg_10/A"] == 0.3


def test_cli_prints_markdown_or_json_and_names_bad_input(tmp_path: Path, capsys):
    runs = [_run("cd", s, _nd(0.10 + s / 100, 0.2), []) for s in range(3)]
    runs += [
        _run("cd+autocdsr", s, _nd(0.12 + s / 100 + (s == 1) / 1000, 0.2 - s / 1000), []) for s in range(3)
    ]
    path = _write(tmp_path / "results.json", runs)
    assert paired.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "`cd+autocdsr` against `cd` (seeds 0, 1, 2)" in out and "**Bar**" in out
    assert paired.main([str(path), "--json", "--metric", "recall_10"]) == 0
    (line,) = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(line)
    assert summary["metric"] == "recall_10" and summary["all"]["seeds"] == [0, 1, 2]
    assert summary["verdict"]["letter_met"] and [d["domain"] for d in summary["domains"]] == ["A", "B"]

    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(SystemExit, match=r"bad\.json: not a readable results\.json"):
        paired.main([str(bad)])
    broken = _write(tmp_path / "broken.json", [{"backbone": "sasrec", "method": "cd", "seed": 0}])
    with pytest.raises(SystemExit, match=r"broken\.json: run 0 lacks metrics"):
        paired.main([str(broken)])
    lonely = _write(tmp_path / "lonely.json", [_run("cd+autocdsr", 0, _nd(0.1, 0.1), [])])
    with pytest.raises(SystemExit, match="no run could be paired"):
        paired.main([str(lonely)])


def test_reproduce_writes_the_paired_section_from_unrelabelled_runs():
    reproduce = load_bench_script("reproduce")
    runs = [_run("cd", s, _nd(0.10, 0.20), []) for s in (0, 1)]
    runs += [_run("cd+autocdsr", s, _nd(0.12, 0.22), []) for s in (0, 1)]
    runs += [{**_run("cd+autocdsr", s, _nd(0.5, 0.5), []), "relabel": 0.25} for s in (0, 1)]
    text = reproduce.paired_tables("toy", "m", runs, "results.json")
    assert text.count("against `cd`") == 1 and "(seeds 0, 1)" in text
    assert "+2.00e-02" in text  # the relabelled runs (+0.35) are not in it
    assert reproduce.paired_tables("toy", "m", runs[:2], "results.json") == ""


def _mlflow_run(uri: str, method: str, seed: int, ndcg: dict[str, float], overrides: list[str],
                manifest: str = "m1", finish: bool = True) -> str:  # fmt: skip
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    from autocdsr import tracking
    from autocdsr.config import load_train_config

    cfg = load_train_config(None, [*overrides, f"method={method}", f"seed={seed}"])
    tags = {"data.path": "/data/toy/sequences", "data.manifest_sha256": manifest}
    run_id = tracking.start_run(uri, "exp", cfg.run_name, cfg.to_dict(), tags)
    metrics = []
    for d, value in ndcg.items():
        metrics += [Metric(f"test/ndcg_10/{d}", value, 0, 0), Metric(f"test/recall_10/{d}", 2 * value, 0, 0)]
        metrics.append(Metric(f"test/num_sequences/{d}", 100, 0, 0))
    MlflowClient(uri).log_batch(run_id, metrics=metrics)
    if finish:
        tracking.end_run(uri, run_id, True)
    return run_id


def test_runs_pair_from_an_mlflow_experiment_by_their_settings_against_the_defaults(tmp_path: Path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    budget = ["train.max_steps=300", "train.warmup_steps=20"]
    for s in (0, 1, 2):
        _mlflow_run(uri, "cd", s, _nd(0.10, 0.20), budget)
        # where a run executed is not a setting: another storage path still pairs
        _mlflow_run(uri, "cd+autocdsr", s, _nd(0.11, 0.21), [*budget, f"train.storage_path={tmp_path}/r{s}"])
    for s in (0, 1):
        _mlflow_run(uri, "cd+autocdsr", s, _nd(0.12, 0.19), [*budget, "autocdsr.start_after=warmup"])
    _mlflow_run(uri, "cd", 0, _nd(0.08, 0.20), budget)  # a later cd run of seed 0: the one that counts
    _mlflow_run(uri, "cd", 1, _nd(0.10, 0.20), [])  # the default budget: pairs with nothing
    _mlflow_run(uri, "cd+autocdsr", 3, _nd(0.5, 0.5), budget, finish=False)  # still RUNNING: left out
    _mlflow_run(uri, "cd+autocdsr", 1, _nd(0.1, 0.1), budget, manifest="m2")  # other data: no cd run

    records, left_out = paired.mlflow_records(uri, ["exp"])
    assert left_out == 1 and len(records) == 11
    assert {r["_dataset"] for r in records} == {"/data/toy/sequences"}
    comps, unpaired = paired.pair_runs(records)
    assert unpaired == 1
    by = {c.extra: c for c in comps}
    assert set(by) == {(), (("autocdsr.start_after", "warmup"),)}
    plain = by[()]
    assert plain.shared == (("train.max_steps", "300"), ("train.warmup_steps", "20")) and sorted(
        plain.pairs
    ) == [0, 1, 2]
    assert plain.pairs[0][1]["metrics"]["test/ndcg_10/A"] == 0.08  # the later cd run of seed 0
    assert sorted(by[(("autocdsr.start_after", "warmup"),)].pairs) == [0, 1]

    assert paired.main(["--tracking-uri", uri, "--experiment", "exp", "--method", "cd+autocdsr"]) == 0
    out = capsys.readouterr().out
    assert "`cd+autocdsr` against `cd` (seeds 0, 1, 2)" in out and "`train.max_steps=300`" in out
    assert "start_after=warmup against `cd` (seeds 0, 1)" in out
    with pytest.raises(SystemExit, match="no experiment 'nope'"):
        paired.main(["--tracking-uri", uri, "--experiment", "nope"])
    with pytest.raises(SystemExit, match="not both"):
        paired.main([str(tmp_path / "results.json"), "--tracking-uri", uri, "--experiment", "exp"])
    with pytest.raises(SystemExit, match="not both"):
        paired.main([])
