"""bench/domain_conflict.py: the whole script on real shards with a checkpoint in the trainer's format (it
asserts on every batch that the a_cd it computes from the attention maps equals the model's fused a_cd), with
and without its held-out table. Its pair estimator (`autocdsr.objectives.gate.unbiased_dots`) is tested
against brute force in tests/test_gate.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from autocdsr.config import load_train_config
from autocdsr.data import shards
from autocdsr.models import build_model
from autocdsr.training import CHECKPOINT_FILE, seed_everything
from tests.conftest import REPO

TINY = ["model.n_layers=1", "model.d_model=16", "model.n_heads=2", "data.max_len=20", "train.batch_size=16"]


@pytest.mark.parametrize("weights", ["best", "last"])
def test_domain_conflict_runs_on_built_shards_with_a_checkpoint(synth_dataset: Path, tmp_path: Path, weights):
    info = shards.open_dataset(str(synth_dataset))
    cfg = load_train_config(None, ["method=cd", *TINY])
    vocab = info.vocab
    seed_everything(cfg.seed)  # as the script does: the same initial weights
    model = build_model(
        cfg.model_config(vocab.num_items, vocab.num_domains), vocab.item_domain, vocab.item_count
    )
    best = {
        k: v * 3 if k.endswith("qkv.weight") else v for k, v in model.state_dict().items()
    }  # sharper attention
    torch.save({"model": model.state_dict(), "best_model": best}, tmp_path / CHECKPOINT_FILE)

    def run(*extra: str) -> dict:
        out = subprocess.run(
            [sys.executable, str(REPO / "bench" / "domain_conflict.py"), "--data", str(synth_dataset),
             "--set", *TINY, "--batches", "4", *extra],
            capture_output=True, text=True, check=True, timeout=300,
        )  # fmt: skip
        return json.loads(out.stdout.strip().splitlines()[-1])

    got = run("--checkpoint", str(tmp_path), "--weights", weights)
    names = [*vocab.domains, "all"]
    assert got["domains"] == names and got["weights"] == weights
    assert len(got["pairs"]) == len(names) ** 2
    for part in ("target_positions", "query_rows"):
        assert sum(got[part][d] for d in vocab.domains) == got[part]["all"] > 0, part
    for pair in got["pairs"]:
        assert pair["se"] >= 0 and torch.isfinite(torch.tensor(pair["effect"]))
    assert all(got["cd_grad_norm_sq"][d] > 0 for d in names)
    initial = run()
    assert initial["weights"] == "initial"
    # "last" holds the initial weights (the script seeds as this test did), "best" sharper attention
    same = got["a_cd"]["all"] == pytest.approx(initial["a_cd"]["all"], rel=1e-9)
    assert same == (weights == "last")


@pytest.mark.parametrize("split", ["valid", "train"])
def test_domain_conflict_adds_the_heldout_table(synth_dataset: Path, split: str):
    out = subprocess.run(
        [sys.executable, str(REPO / "bench" / "domain_conflict.py"), "--data", str(synth_dataset),
         "--set", *TINY, "--batches", "3", "--heldout-batch", "24", "--heldout-split", split],
        capture_output=True, text=True, check=True, timeout=300,
    )  # fmt: skip
    got = json.loads(out.stdout.strip().splitlines()[-1])
    names = got["domains"]
    assert len(got["heldout_pairs"]) == len(names) ** 2
    # one target per sequence, its last item (3 x 24; a train sequence of one item has none)
    n = got["heldout_targets"]["all"]
    assert n == sum(got["heldout_targets"][d] for d in names[:-1])
    assert n == 3 * 24 if split == "valid" else 0.9 * 3 * 24 <= n <= 3 * 24
    assert "held-out L_rec^(t)" in out.stdout
