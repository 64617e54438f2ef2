"""bench/rank_compare.py on real shards: ranks equal the project's evaluation, a model against its own copy
differs by exactly nothing, and runs it cannot compare are refused by name."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from autocdsr import evaluation
from autocdsr.config import load_train_config
from autocdsr.data import shards
from autocdsr.models import build_model
from tests.conftest import REPO, load_bench_script

CONFIG = REPO / "conf/train/quickstart.yaml"
COMMON = ["data.max_len=20", "model.n_layers=1"]


@pytest.fixture(scope="module")
def rank_compare():
    return load_bench_script("rank_compare")


def _save_run(
    info, root: Path, method: str, seed: int, weights_seed: int, extra: list[str] | None = None
) -> dict:
    """A results.json run record with a checkpoint of an untrained model (weights from ``weights_seed``)."""
    overrides = [*COMMON, *(extra or []), f"method={method}", f"seed={seed}", "data.relabel_fraction=0.0"]
    cfg = load_train_config(CONFIG, overrides)
    torch.manual_seed(weights_seed)
    model = build_model(
        cfg.model_config(info.vocab.num_items, info.vocab.num_domains), info.vocab.item_domain
    )
    ckpt = root / "checkpoints" / f"{method}-{seed}"
    ckpt.mkdir(parents=True)
    torch.save({"model": model.state_dict(), "best_model": None}, ckpt / "state.pt")
    return {"backbone": "sasrec", "method": method, "seed": seed, "relabel": 0.0, "run_name": f"{method}-{seed}",
            "overrides": overrides, "checkpoints": {"all": str(ckpt)}}  # fmt: skip


def _results(info, root: Path, runs: list[dict]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / "results.json"
    path.write_text(json.dumps({"dataset": "synth", "sequences": str(info.root),
                                "manifest_sha256": info.manifest_sha256, "runs": runs}))  # fmt: skip
    return path


def test_ranks_match_the_evaluation_and_a_copy_differs_by_nothing(
    rank_compare, synth_dataset: Path, tmp_path
):
    info = shards.open_dataset(str(synth_dataset))
    root = tmp_path / "runs"
    runs = [
        _save_run(info, root, "cd", 0, weights_seed=7),
        _save_run(info, root, "cd+autocdsr", 0, weights_seed=7),  # the very same weights as cd seed 0
        _save_run(info, root, "cd", 1, weights_seed=8),
    ]
    results = _results(info, root, runs)
    out = tmp_path / "out"
    assert (
        rank_compare.main([str(root), "--config", str(CONFIG), "--out", str(out), "--bootstrap", "200"]) == 0
    )

    report = json.loads((out / "rank_compare.json").read_text())
    # NDCG@10 of each run equals evaluate_split's full-ranking figure for the same weights
    cfg = load_train_config(CONFIG, runs[2]["overrides"])
    model = build_model(
        cfg.model_config(info.vocab.num_items, info.vocab.num_domains), info.vocab.item_domain
    )
    model.load_state_dict(torch.load(Path(runs[2]["checkpoints"]["all"]) / "state.pt")["model"])
    direct = evaluation.evaluate_split(
        model, info, "test", dataclasses.replace(cfg.eval, num_negatives="all"), 0, 1, torch.device("cpu"), 20
    )
    s = report["runs"]["sasrec cd seed 1"]
    assert s["ndcg_10"] == pytest.approx(direct["test/ndcg_10/all"], abs=1e-12)
    assert s["recall_10"] == pytest.approx(direct["test/recall_10/all"], abs=1e-12)
    assert s["n"] == direct["test/num_sequences/all"]
    assert report["runs"]["popularity (train counts)"]["n"] == s["n"]

    pairs = {(p["a"], p["b"]): p for p in report["pairs"]}
    same = pairs[("sasrec cd+autocdsr seed 0", "sasrec cd seed 0")]
    assert same["d_log10_rank"] == same["d_log10_rank_lo"] == same["d_log10_rank_hi"] == 0.0
    assert same["share_a_higher"] == same["share_a_lower"] == 0.0
    assert set(same["by_domain"]) == set(info.vocab.domains)  # every domain has test targets here
    assert sum(d["n"] for d in same["by_domain"].values()) == s["n"]
    assert all(d["d_log10_rank"] == 0.0 for d in same["by_domain"].values())
    seeds = pairs[("sasrec cd seed 1", "sasrec cd seed 0")]  # other weights: the ranks differ
    assert seeds["share_a_higher"] + seeds["share_a_lower"] > 0.5
    saved = np.load(out / "ranks" / "sasrec_cd_seed_1.npz")
    assert len(saved["rank"]) == s["n"]
    assert list(saved["sequence_id"]) == sorted(saved["sequence_id"])

    # sampled negatives: the same candidates as the evaluation with eval.num_negatives=N
    out_n = tmp_path / "out_n"
    rank_compare.main([str(results), "--config", str(CONFIG), "--out", str(out_n), "--negatives", "50"])
    sampled = json.loads((out_n / "rank_compare.json").read_text())
    direct_n = evaluation.evaluate_split(
        model, info, "test", dataclasses.replace(cfg.eval, num_negatives=50), 0, 1, torch.device("cpu"), 20
    )
    assert sampled["runs"]["sasrec cd seed 1"]["ndcg_10"] == pytest.approx(
        direct_n["test/ndcg_10/all"], abs=1e-12
    )
    assert "popularity (train counts)" not in sampled["runs"]  # full ranking only


def test_refuses_missing_checkpoints_and_mixed_datasets_by_name(rank_compare, synth_dataset: Path, tmp_path):
    info = shards.open_dataset(str(synth_dataset))
    run = _save_run(info, tmp_path / "a", "cd", 0, weights_seed=1)
    good = _results(info, tmp_path / "a", [run])
    gone = {**run, "run_name": "gone", "checkpoints": {"all": str(tmp_path / "nowhere")}}
    bad = _results(info, tmp_path / "b", [gone])
    with pytest.raises(SystemExit, match=r"gone names checkpoint .*nowhere, which holds no state\.pt"):
        rank_compare.main([str(bad), "--config", str(CONFIG), "--out", str(tmp_path / "o1")])
    other = json.loads(good.read_text())
    other["manifest_sha256"] = "0" * 64
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "results.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="trained on other sequences"):
        rank_compare.main(
            [str(good), str(tmp_path / "c"), "--config", str(CONFIG), "--out", str(tmp_path / "o2")]
        )
    with pytest.raises(SystemExit, match=r"no results\.json"):
        rank_compare.main([str(tmp_path / "empty_dir_that_is_missing"), "--out", str(tmp_path / "o3")])
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
