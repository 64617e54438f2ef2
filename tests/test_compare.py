"""`python -m autocdsr.compare`: picks the best run on validation (never test) from a real MLflow store."""

from __future__ import annotations

import json

from mlflow import MlflowClient

from autocdsr import compare


def make_run(
    client: MlflowClient, exp: str, name: str, val: float, test: float, status: str = "FINISHED"
) -> str:
    run = client.create_run(exp, run_name=name)
    for d, scale in (("books", 1.0), ("games", 0.5), ("all", 0.8)):
        client.log_metric(run.info.run_id, f"val/ndcg_10/{d}", val * scale)
        client.log_metric(run.info.run_id, f"test/ndcg_10/{d}", test * scale)
        client.log_metric(run.info.run_id, f"test/recall_10/{d}", test * scale + 0.1)
    client.set_terminated(run.info.run_id, status)
    return run.info.run_id


def test_best_on_validation_latest_finished_run_per_name(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("cmp")
    make_run(client, exp, "cd", val=0.50, test=0.60)
    better_val = make_run(
        client, exp, "auto", val=0.55, test=0.40
    )  # better on val, worse on test: val decides
    make_run(client, exp, "auto", val=0.99, test=0.99, status="FAILED")  # never a candidate
    assert compare.main(["cd", "auto", "--experiment", "cmp", "--tracking-uri", uri, "--json"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out.strip().splitlines()[-1]) == {
        "best": "auto",
        "run_id": better_val,
        "registered": None,
    }
    books = next(line for line in out.splitlines() if line.startswith("books"))
    assert "0.7000 0.6000" in books and "0.5000 0.4000" in books and "-33.3%" in books
    assert "mlflow ui --backend-store-uri" in out


def test_missing_run_is_a_clear_error(tmp_path, caplog):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("cmp")
    make_run(client, exp, "cd", val=0.5, test=0.5)
    assert compare.main(["cd", "nope", "--experiment", "cmp", "--tracking-uri", uri]) == 2
    assert "no FINISHED run named 'nope'" in caplog.text
