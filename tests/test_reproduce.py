"""bench/reproduce.py's report: generated sections replace only their own markers; mean ± sd and deltas."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import load_bench_script


@pytest.fixture(scope="module")
def reproduce():
    return load_bench_script("reproduce")


def test_write_section_replaces_its_block_and_keeps_the_rest(reproduce, tmp_path: Path):
    doc = tmp_path / "results.md"
    doc.write_text("# Results\n\nhand-written text\n")
    reproduce.write_section(doc, "x:table", "first")
    reproduce.write_section(doc, "y:table", "other")
    reproduce.write_section(doc, "x:table", "second\n")
    text = doc.read_text()
    assert text.startswith("# Results\n\nhand-written text\n")
    assert "first" not in text and text.count("second") == 1 and "other" in text
    assert (
        text.index("<!-- reproduce:x:table -->")
        < text.index("second")
        < text.index("<!-- /reproduce:x:table -->")
    )


def test_results_table_reports_mean_sd_over_seeds_and_change_vs_cd(reproduce):
    def run(method, seed, ndcg):
        metrics = {f"test/{m}/{d}": ndcg for m in reproduce.METRICS for d in ("A", "all")}
        return {"backbone": "sasrec", "method": method, "seed": seed, "relabel": 0.0, "metrics": metrics}

    results = [
        run("cd", 0, 0.10),
        run("cd", 1, 0.20),
        run("cd+autocdsr", 0, 0.18),
        run("cd+autocdsr", 1, 0.18),
    ]
    table = reproduce.results_tables("toy", results, ["A"], None)
    cd_row = next(line for line in table.splitlines() if line.startswith("| A | `cd`"))
    assert "0.1500 ± 0.0707" in cd_row  # sample standard deviation over the two seeds
    auto_row = next(line for line in table.splitlines() if "`cd+autocdsr`" in line)
    assert "0.1800 ± 0.0000" in auto_row and "+20.0%" in auto_row


def test_results_table_names_each_domain_once_even_without_a_cd_baseline(reproduce):
    metrics = {f"test/{m}/{d}": 0.1 for m in reproduce.METRICS for d in ("A", "B", "all")}
    results = [{"backbone": "sasrec", "method": "cd+autocdsr", "seed": 0, "relabel": 0.0, "metrics": metrics}]
    rows = [line for line in reproduce.results_tables("toy", results, ["A", "B"], None).splitlines()
            if "`cd+autocdsr`" in line]  # fmt: skip
    assert [row.split("|")[1].strip() for row in rows] == ["A", "B", "all"]
    assert "nan" not in "".join(rows)  # no baseline, no change column


def test_results_accumulate_across_invocations_and_only_complete_records_are_reused(
    reproduce, tmp_path: Path
):
    def run(method, seed, relabel, value, **extra):
        return {"backbone": "bert4rec", "method": method, "seed": seed, "relabel": relabel,
                "metrics": {"test/recall_20/all": value}, **extra}  # fmt: skip

    budget = ["train.max_steps=10"]
    config = reproduce.config_sha256("amazon5", budget)
    old = [run("cd", 0, 0.0, 0.5), run("cd", 0, 0.1, 0.4, overrides=["x"], checkpoints={})]
    (tmp_path / "results.json").write_text(
        reproduce.json.dumps(
            {"budget": budget, "manifest_sha256": "abc", "config_sha256": config, "runs": old}
        )
    )
    earlier = reproduce.previous_results(tmp_path, budget, "abc", config)
    assert reproduce.previous_results(tmp_path, ["train.max_steps=20"], "abc", config) == {}
    assert reproduce.previous_results(tmp_path, budget, "other sequences", config) == {}
    # runs made under other configuration defaults (another resolved config) are not mixed in
    assert config != reproduce.config_sha256("amazon5", [*budget, "model.num_ib_tokens=2"])
    assert reproduce.previous_results(tmp_path, budget, "abc", "other defaults") == {}
    # a record without its overrides (an older results.json) is kept for tables but never reused
    assert list(reproduce.reusable_runs(earlier)) == ["bert4rec|cd|0|0.1"]
    merged = reproduce.merge_runs(earlier["runs"], [run("cd", 0, 0.1, 0.3), run("cd", 0, 0.25, 0.2)])
    assert [(r["relabel"], r["metrics"]["test/recall_20/all"]) for r in merged] == [
        (0.0, 0.5), (0.1, 0.3), (0.25, 0.2)
    ]  # fmt: skip
    table = reproduce.robustness_table(merged)
    assert "0% relabelled | 10% relabelled | 25% relabelled" in table


def test_transfer_table_renders_rank_strata_and_a_cd_bins_and_older_analyses_without_them(reproduce):
    def result(seed_shift: float, with_ranks: bool) -> dict:
        groups = reproduce.analysis.TRANSFER_GROUPS
        out = {
            "counts": dict(zip(groups, (1, 2, 3, 94), strict=True)),
            "a_cd": {m: {g: 0.5 + seed_shift for g in groups} for m in ("cd", "cd+autocdsr")},
        }
        if with_ranks:
            rgroups = reproduce.analysis.RANK_GROUPS
            out["rank_counts"] = dict(zip(rgroups, (40, 20, 40), strict=True))
            out["rank_a_cd"] = {"cd": {g: 0.4 for g in rgroups}, "cd+autocdsr": {g: 0.1 for g in rgroups}}
            out["by_a_cd"] = {
                "n": 100,
                "spearman": 0.2 + seed_shift,
                "bins": [
                    {"n": 50, "a_cd_min": 0.1, "a_cd_max": 0.3, "a_cd_mean": 0.2, "share_single_higher": 0.3,
                     "share_cd_higher": 0.5, "d_log10_rank": -0.1},
                    {"n": 50, "a_cd_min": 0.3, "a_cd_max": 0.9, "a_cd_mean": 0.6, "share_single_higher": 0.5,
                     "share_cd_higher": 0.3, "d_log10_rank": 0.2},
                ],
            }  # fmt: skip
            out["by_a_cd_domain"] = {
                "books": {**out["by_a_cd"], "n": 60, "spearman": -0.1 - seed_shift},
                "empty": {"n": 0, "spearman": float("nan"), "bins": []},  # a domain without `single` examples
            }
        return out

    new = [{"backbone": "sasrec", "seed": s, "result": result(0.1 * s, True)} for s in (0, 1)]
    table = reproduce.transfer_table(new)
    assert (
        "| books | 60.0 | -0.1500 ± 0.0707 | 0.3000 ± 0.0000 | 0.5000 ± 0.0000 | -0.1000 ± 0.0000 |" in table
    )
    assert "| empty |" not in table
    fig = reproduce.a_cd_domain_bins_figure(new[1]["result"]["by_a_cd_domain"], "sasrec")
    assert [line.get_label() for line in fig.axes[0].get_lines()] == ["books (n=60, Spearman -0.200)"]
    before_split = [{"backbone": "sasrec", "seed": 0, "result": result(0.0, True)}]
    del before_split[0]["result"]["by_a_cd_domain"]  # analyses made before the per-domain split
    assert "Spearman correlation" in reproduce.transfer_table(before_split)
    assert "Within each target domain" not in reproduce.transfer_table(before_split)
    assert "2 seed(s); 100 test examples" in table
    assert "| single ranks higher | 40.0 | 40.0% | 0.4000 ± 0.0000 | 0.1000 ± 0.0000 | -75% |" in table
    assert "Spearman correlation" in table and "0.2500 ± 0.0707" in table
    assert "| 2 | 0.300-0.900 (0.600) | 0.5000 ± 0.0000 | 0.3000 ± 0.0000 | 0.2000 ± 0.0000 |" in table
    old = reproduce.transfer_table([{"backbone": "bert4rec", "seed": 0, "result": result(0.0, False)}])
    assert "| both wrong | 94.0 | 94.0% |" in old
    assert "ranks the target higher" not in old and "Spearman" not in old
