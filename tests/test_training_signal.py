"""Training on the generated logs learns, and AutoCDSR moves attention away from the noise domain.

The generator (`autocdsr.synth`) plants cross-domain links between the signal domains and adds a `noise`
domain whose items predict nothing. A few hundred single-process steps (`train_worker` with
`LocalContext`, the code path every Ray worker runs) must lower the loss for `cd` and `cd+autocdsr`, and
the `cd+autocdsr` model must put less attention from signal-domain positions on noise-domain items than
the `cd` model trained identically (same seed, same batches).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from autocdsr import analysis
from autocdsr.config import load_train_config
from autocdsr.data import shards
from autocdsr.data.memory import in_memory_batches
from autocdsr.models import build_model
from autocdsr.training import LocalContext, load_best_state, train_worker

STEPS = 240
SETTINGS = [
    "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.dropout=0.1", "data.max_len=50",
    "train.batch_size=32", "train.lr=0.003", "train.warmup_steps=20", f"train.max_steps={STEPS}",
    f"train.eval_every={STEPS}", "train.patience=100000", "eval.num_negatives=50", "seed=0",
]  # fmt: skip


def train(data: Path, method: str) -> dict:
    info = shards.open_dataset(str(data))
    cfg = load_train_config(None, [*SETTINGS, f"method={method}"])
    ctx = LocalContext(in_memory_batches(info, cfg))
    logged: list[tuple[int, dict]] = []
    final = train_worker(cfg, info, ctx, log_metrics=lambda m, s: logged.append((s, dict(m))))
    model = build_model(
        cfg.model_config(info.vocab.num_items, info.vocab.num_domains), info.vocab.item_domain
    )
    model.load_state_dict(load_best_state(ctx.last_checkpoint))
    pairs = analysis.domain_pair_attention(model, info, "valid", cfg.data.max_len, max_sequences=300)
    losses = [m["train/loss_rec"] for _, m in logged if "train/loss_rec" in m]
    a_cd = [m["train/a_cd"] for _, m in logged if "train/a_cd" in m]
    return {"info": info, "final": final, "losses": losses, "a_cd": a_cd, "pairs": pairs}


@pytest.fixture(scope="module")
def trained(synth_dataset: Path) -> dict[str, dict]:
    return {method: train(synth_dataset, method) for method in ("cd", "cd+autocdsr")}


@pytest.mark.parametrize("method", ["cd", "cd+autocdsr"])
def test_training_lowers_the_loss(trained, method):
    losses = trained[method]["losses"]
    assert len(losses) == STEPS and all(np.isfinite(losses))
    first, last = np.mean(losses[:10]), np.mean(losses[-30:])
    assert last < 0.8 * first, (first, last)
    # better than chance: random ranking of the target among 50 negatives gives NDCG@10 ~ 0.08
    assert trained[method]["final"]["test/ndcg_10/all"] > 0.15


def test_autocdsr_attends_less_to_the_noise_domain_than_cd(trained):
    domains = list(trained["cd"]["info"].vocab.domains)
    noise = domains.index("noise")
    signal = [i for i, d in enumerate(domains) if d != "noise"]
    cd, auto = trained["cd"]["pairs"], trained["cd+autocdsr"]["pairs"]
    to_noise_cd, to_noise_auto = cd[signal, noise], auto[signal, noise]
    # the cd model does attend to noise items (the effect is measurable) ...
    assert to_noise_cd.mean() > 0.02, cd
    # ... and AutoCDSR lowers it, from every signal domain and on average by more than half
    assert (to_noise_auto < to_noise_cd).all(), (cd, auto)
    assert to_noise_auto.mean() < 0.5 * to_noise_cd.mean(), (cd, auto)
    # the training-time a_cd (Eq. 5) falls under AutoCDSR and ends below cd's
    a_auto, a_cd = trained["cd+autocdsr"]["a_cd"], trained["cd"]["a_cd"]
    assert np.mean(a_auto[-30:]) < np.mean(a_auto[:10]) and np.mean(a_auto[-30:]) < np.mean(a_cd[-30:])
