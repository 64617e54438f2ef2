"""bench/gradient_noise.py on real shards: it measures every requested step, with noise shares and Eq. 9
weights in range (Eq. 9 itself, `pareto.min_norm_segment`, is checked against a QP in tests/test_pareto.py)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO


def test_gradient_noise_runs_on_built_shards(synth_dataset):
    out = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gradient_noise.py"), "--data", str(synth_dataset), "--set",
         "model.n_layers=1", "model.d_model=16", "model.n_heads=2", "data.max_len=20", "train.batch_size=8",
         "train.warmup_steps=2", "--at", "0", "3", "--batches", "3"],
        capture_output=True, text=True, check=True, timeout=300,
    )  # fmt: skip
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert [r["step"] for r in result["rows"]] == [0, 3]
    for r in result["rows"]:
        assert 0.0 <= r["alpha2_single_min"] <= r["alpha2_single_median"] <= r["alpha2_single_max"] <= 1.0
        for key in (
            "alpha2_mean_gradients",
            "alpha2_expected_gradients",
            "noise_share_rec",
            "noise_share_cd",
        ):
            assert 0.0 <= r[key] <= 1.0, key
        assert 0.0 < r["a_cd"] < 1.0 and r["loss_rec"] > 0
    # training moved the model between the two measurements
    assert result["rows"][0]["loss_rec"] != result["rows"][1]["loss_rec"]
