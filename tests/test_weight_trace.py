"""bench/weight_trace.py against a real MLflow store (SQLite): it reads each run's per-step metrics from the
store the run logged to, summarises them with the run's own preference vector, and names what it cannot read."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric

from autocdsr.analysis import weight_phases
from autocdsr.objectives.pareto import free_band
from tests.conftest import REPO, load_bench_script

CONFIG = REPO / "conf/train/quickstart.yaml"


@pytest.fixture(scope="module")
def weight_trace():
    return load_bench_script("weight_trace")


def _log_run(uri: str, name: str, metrics: dict[str, list[tuple[int, float]]]) -> str:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("trace") or client.get_experiment(client.create_experiment("trace"))
    run_id = client.create_run(exp.experiment_id, run_name=name).info.run_id
    now = int(time.time() * 1000)
    batch = [Metric(f"train/{k}", v, now, s) for k, pairs in metrics.items() for s, v in pairs]
    client.log_batch(run_id, metrics=batch)
    client.set_terminated(run_id)
    return run_id


def _pareto_metrics(n: int) -> dict[str, list[tuple[int, float]]]:
    """n steps: a_cd alone for the first half, then L_rec alone; a solve every 5 steps, L̃_cd/L̃_rec falling."""
    solves = range(5, n + 1, 5)
    return {
        "alpha2": [(s, 1.0 if s <= n // 2 else 0.0) for s in range(1, n + 1)],
        "a_cd": [(s, 0.3 - 0.01 * s) for s in range(1, n + 1)],
        "loss_rec": [(s, 10.0 - 0.1 * s) for s in range(1, n + 1)],
        "pareto/normalised_loss_rec": [(s, 1.0 - 0.01 * s) for s in solves],
        "pareto/normalised_a_cd": [(s, 1.0 - 0.04 * s) for s in solves],
    }


def _record(name: str, method: str, run_id: str, extra: list[str], uri: str | None) -> dict:
    overrides = ["train.warmup_steps=8", f"method={method}", "seed=0", "data.relabel_fraction=0.0", *extra]
    rec = {"backbone": "sasrec", "method": method, "seed": 0, "relabel": 0.0, "run_name": name, "run_id": run_id,
           "overrides": overrides}  # fmt: skip
    return rec | ({"tracking_uri": uri} if uri else {})


def test_phases_come_from_each_runs_own_store_and_preference(weight_trace, tmp_path: Path, capsys):
    # run 1 logs to a store named in results.json; run 2 to the mlflow.db next to an older results.json
    named = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    metrics = _pareto_metrics(20)
    p2 = _log_run(named, "p2", metrics)
    old = tmp_path / "old"
    old.mkdir()
    cd_metrics = {k: v for k, v in metrics.items() if not k.startswith("pareto/")}
    cd = _log_run(f"sqlite:///{old / 'mlflow.db'}", "cd", cd_metrics)
    new = tmp_path / "new"
    new.mkdir()
    (new / "results.json").write_text(json.dumps({"dataset": "synth", "runs": [
        _record("p2", "cd+autocdsr", p2, ["autocdsr.pareto.preference_index=2"], named)]}))  # fmt: skip
    (old / "results.json").write_text(json.dumps({"dataset": "synth", "runs": [
        _record("cd", "cd", cd, [], None)]}))  # fmt: skip

    out = tmp_path / "out"
    argv = [str(new), str(old), "--config", str(CONFIG), "--phases", "warmup,15", "--out", str(out)]
    assert weight_trace.main(argv) == 0
    traces = json.loads((out / "weight_trace.json").read_text())["runs"]
    # labels keep the override that sets the two runs apart; phases end at warmup (8), 15 and the last step
    p2_rows = traces["sasrec cd+autocdsr seed 0 [autocdsr.pareto.preference_index=2]"]
    assert [(r["first_step"], r["last_step"]) for r in p2_rows] == [(1, 8), (9, 15), (16, 20)]
    assert p2_rows == weight_phases(metrics, [0, 8, 15, 20], free_band(4, 2))  # p_2's band, not p_1's
    assert p2_rows[1]["share_cd_only"] == pytest.approx(2 / 7)  # steps 9 and 10 of 9..15
    cd_rows = traces["sasrec cd seed 0"]
    assert cd_rows == weight_phases(cd_metrics, [0, 8, 15, 20]) and "solves" not in cd_rows[0]
    # the printed table names the set-apart override once, in a legend
    table = capsys.readouterr().out.splitlines()
    assert sum(line.startswith("| sasrec cd+autocdsr seed 0 (1) | ") for line in table) == 3
    assert table[-1] == "(1) autocdsr.pareto.preference_index=2"
    assert not any("[autocdsr" in line for line in table)


def test_runs_it_cannot_read_are_named(weight_trace, tmp_path: Path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = _log_run(uri, "empty", {"lr": [(1, 0.001)]})
    (tmp_path / "results.json").write_text(json.dumps({"dataset": "synth", "runs": [
        _record("empty", "cd+autocdsr", run_id, [], uri)]}))  # fmt: skip
    with pytest.raises(SystemExit, match=f"run empty \\({run_id}\\) has no train/alpha2"):
        weight_trace.main([str(tmp_path), "--config", str(CONFIG), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out" / "weight_trace.json").exists()

    lost = tmp_path / "lost"
    lost.mkdir()
    (lost / "results.json").write_text(json.dumps({"dataset": "synth", "runs": [
        _record("gone", "cd", "0" * 32, [], None)]}))  # fmt: skip
    with pytest.raises(SystemExit, match="run gone names no tracking_uri and there is no"):
        weight_trace.main([str(lost), "--config", str(CONFIG)])
    with pytest.raises(SystemExit):
        weight_trace.main([str(lost), "--phases", "warmup,-3"])
