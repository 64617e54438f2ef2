"""bench/domain_conflict.py: its pair estimator against a brute-force computation, and the whole script on
real shards with a checkpoint in the trainer's format (the script asserts on every batch that the a_cd it
computes from the attention maps equals the model's fused a_cd)."""

from __future__ import annotations

import itertools
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
from tests.conftest import REPO, load_bench_script

TINY = ["model.n_layers=1", "model.d_model=16", "model.n_heads=2", "data.max_len=20", "train.batch_size=16"]


def test_pair_estimates_and_jackknife_equal_brute_force() -> None:
    domain_conflict = load_bench_script("domain_conflict")
    gen = torch.Generator().manual_seed(0)
    n, tasks, dim = 7, 3, 11
    g = torch.randn(n, tasks, dim, generator=gen, dtype=torch.float64) + torch.randn(
        tasks, dim, generator=gen
    )

    def estimate(rows: list[int]) -> torch.Tensor:  # mean over ordered pairs of distinct batches
        pairs = [(i, j) for i, j in itertools.product(rows, rows) if i != j]
        return sum(g[i] @ g[j].T for i, j in pairs) / len(pairs)

    u, se = domain_conflict.unbiased_dots(g)
    torch.testing.assert_close(u, estimate(list(range(n))))
    loo = torch.stack([estimate([j for j in range(n) if j != i]) for i in range(n)])
    ratio = loo / torch.diagonal(loo, dim1=1, dim2=2)[:, None, :]
    expected = ((n - 1) / n * ((ratio - ratio.mean(0)) ** 2).sum(0)).sqrt()
    torch.testing.assert_close(se, expected)
    # the same-batch products are left out: an estimate from one batch's gradients alone is biased
    assert not torch.allclose(u, (g.mean(0) @ g.mean(0).T))


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
