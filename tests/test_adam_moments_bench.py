"""bench/adam_moments.py: its closed form of the run's second moment against a step-by-step brute force (clip
included), and the whole script on real shards with a checkpoint in the trainer's format and the (α₁, α₂)
history in a real MLflow store (SQLite)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from mlflow.entities import Metric

from autocdsr.config import load_train_config
from autocdsr.data import shards
from autocdsr.data.memory import in_memory_batches
from autocdsr.models import build_model
from autocdsr.training import CHECKPOINT_FILE, seed_everything
from tests.conftest import REPO, load_bench_script

CONFIG = REPO / "conf/train/quickstart.yaml"
TINY = ["model.n_layers=1", "model.d_model=16", "model.n_heads=2", "data.max_len=20", "train.batch_size=16"]


@pytest.fixture(scope="module")
def adam_moments():
    return load_bench_script("adam_moments")


def _brute_force(batches, history, clip, beta2, last):
    """Σ_s w_s clip(α₁ₛ r + α₂ₛ g)² / Σ_s w_s, averaged over batches, one step at a time."""
    run = None
    for g_rec, g_cd in batches:
        total = [torch.zeros_like(r, dtype=torch.float64) for r in g_rec]
        weight = 0.0
        for step, a1, a2 in history.tolist():
            if step > last:
                continue
            w = beta2 ** (last - step)
            combined = [a1 * r.double() + a2 * g.double() for r, g in zip(g_rec, g_cd, strict=True)]
            norm = torch.sqrt(sum((c * c).sum() for c in combined))
            scale = min(1.0, clip / float(norm)) if clip > 0 else 1.0
            total = [t + w * (scale * c) ** 2 for t, c in zip(total, combined, strict=True)]
            weight += w
        total = [t / weight for t in total]
        run = total if run is None else [x + y for x, y in zip(run, total, strict=True)]
    return [x / len(batches) for x in run]


@pytest.mark.parametrize("clip", [0.0, 1.0])
def test_second_moment_matches_a_step_by_step_sum(adam_moments, clip: float):
    gen = torch.Generator().manual_seed(7)
    batches = [
        ([torch.randn(3, 4, generator=gen), torch.randn(5, generator=gen)],
         [0.3 * torch.randn(3, 4, generator=gen), 2.0 * torch.randn(5, generator=gen)])
        for _ in range(4)
    ]  # fmt: skip
    steps = torch.arange(1, 41, dtype=torch.float64)
    a2 = (torch.rand(40, generator=gen) < 0.3).double() * torch.rand(40, generator=gen).double()
    history = torch.stack([steps, 1 - a2, a2], dim=1)
    v_run, v_rec, n = adam_moments.accumulate(iter(batches), history, clip, 0.9, last=35)
    assert n == 4
    expected = _brute_force(batches, history, clip, 0.9, 35)
    for got, want in zip(v_run, expected, strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-9)
    # v_rec: L_rec alone, clipped like any step
    only_rec = torch.tensor([[35.0, 1.0, 0.0]], dtype=torch.float64)
    for got, want in zip(v_rec, _brute_force(batches, only_rec, clip, 0.9, 35), strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-9)
    if clip > 0:  # the clip binds on some steps here, so the test checks it
        norms = [float(torch.sqrt(sum((g * g).sum() for g in b[0]))) for b in batches]
        assert max(norms) > clip


def _checkpoint_and_run(synth_dataset: Path, tmp_path: Path, alpha2: float) -> Path:
    """A results.json folder: one run with a checkpoint after two AdamW steps, and 30 steps of (1 - α₂, α₂)."""
    overrides = ["method=cd+autocdsr", "seed=0", *TINY]
    cfg = load_train_config(CONFIG, overrides)
    info = shards.open_dataset(str(synth_dataset))
    vocab = info.vocab
    seed_everything(cfg.seed)
    model = build_model(
        cfg.model_config(vocab.num_items, vocab.num_domains, vocab.domains),
        vocab.item_domain,
        vocab.item_count,
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    it = in_memory_batches(info, cfg)(0)
    for _ in range(2):
        opt.zero_grad()
        out = model(next(it))
        (out.loss_rec + out.a_cd).backward()
        opt.step()
    folder = tmp_path / f"run-{alpha2:g}"
    ck = folder / "checkpoints" / "run"
    ck.mkdir(parents=True)
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, ck / CHECKPOINT_FILE)
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("moments")
    run_id = client.create_run(exp, run_name="run").info.run_id
    now = int(time.time() * 1000)
    metrics = [Metric("train/alpha1", 1.0 - alpha2, now, s) for s in range(1, 31)]
    metrics += [Metric("train/alpha2", alpha2, now, s) for s in range(1, 31)]
    client.log_batch(run_id, metrics=metrics)
    client.set_terminated(run_id)
    record = {"backbone": "sasrec", "method": "cd+autocdsr", "seed": 0, "relabel": 0.0, "run_name": "run",
              "run_id": run_id, "tracking_uri": uri, "overrides": overrides, "checkpoints": {"all": str(ck)}}  # fmt: skip
    (folder / "results.json").write_text(
        json.dumps({"dataset": "synth", "sequences": str(synth_dataset), "runs": [record]})
    )
    return folder


def test_script_on_built_shards_and_a_real_store(adam_moments, synth_dataset: Path, tmp_path: Path, capsys):
    plain = _checkpoint_and_run(synth_dataset, tmp_path, alpha2=0.0)
    mixed = _checkpoint_and_run(synth_dataset, tmp_path, alpha2=0.9)

    def run(folder: Path) -> dict:
        argv = [str(folder), "--config", str(CONFIG), "--batches", "3"]
        assert adam_moments.main(argv) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])["runs"][0]

    got = run(plain)
    assert got["step"] == 2 and got["batches"] == 3 and got["share_a_cd_steps"] == 0.0
    groups = got["groups"]
    assert {"item embedding", "attention q/k/v", "feed-forward"} <= set(groups)
    for name, row in groups.items():  # L_rec alone at every step: exactly v_rec
        assert row["inflation"] == pytest.approx(1.0, rel=1e-9), name
        assert row["step_factor"] == pytest.approx(1.0, rel=1e-9), name
        assert row["checkpoint"] > 0, name
    # a_cd weighted 0.9 at every step: a different second moment, and its q/k/v, which a_cd reaches, move
    moved = run(mixed)["groups"]
    assert moved["attention q/k/v"]["inflation"] != pytest.approx(1.0, rel=1e-3)
    assert moved["attention q/k/v"]["step_factor"] != pytest.approx(1.0, rel=1e-3)


def test_a_run_without_checkpoint_is_named(adam_moments, synth_dataset: Path, tmp_path: Path):
    folder = _checkpoint_and_run(synth_dataset, tmp_path, alpha2=0.5)
    results = json.loads((folder / "results.json").read_text())
    results["runs"][0]["checkpoints"] = {"all": str(tmp_path / "nowhere")}
    (folder / "results.json").write_text(json.dumps(results))
    with pytest.raises(SystemExit, match=r"run run has no checkpoint .*nowhere"):
        adam_moments.main([str(folder), "--config", str(CONFIG), "--batches", "1"])
    with pytest.raises(SystemExit, match="no run named other"):
        adam_moments.main([str(folder), "--config", str(CONFIG), "--run", "other"])
