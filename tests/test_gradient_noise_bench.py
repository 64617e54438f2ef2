"""bench/gradient_noise.py: the Eq. 9 weight it reports is the min-norm point (against a brute-force search),
and on real shards it measures every requested step with shares and weights in range."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO, load_bench_script


@pytest.mark.parametrize("seed", range(6))
def test_mgda_weight_is_the_min_norm_point_of_the_segment(seed):
    bench = load_bench_script("gradient_noise")
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=5) * rng.uniform(0.1, 3), rng.normal(size=5) * rng.uniform(0.1, 3)
    w = bench.mgda_weight_on_second(float(a @ a), float(a @ b), float(b @ b))
    grid = np.linspace(0, 1, 100_001)
    norms = np.linalg.norm((1 - grid)[:, None] * a + grid[:, None] * b, axis=1)
    assert w == pytest.approx(grid[np.argmin(norms)], abs=2e-5)
    assert bench.mgda_weight_on_second(1.0, 1.0, 1.0) == 0.5  # identical vectors: any point, the middle


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
