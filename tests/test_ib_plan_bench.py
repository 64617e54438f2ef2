"""bench/ib_plan.py: AutoCDSR⁺'s packing plan built in the encoder against in the data path. The figures are
the benchmark's business; here: it runs on a sequence build and on synth-like rows, reports every figure, and
its own check (the data-path plan's layout equals the encoder's, masks included) holds for both backbones
and T = 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def test_ib_plan_bench_reports_both_paths(synth_dataset: Path):
    for extra in (["--data", str(synth_dataset)], ["--ib-tokens", "2"]):
        out = subprocess.run(
            [sys.executable, str(REPO / "bench" / "ib_plan.py"), "--shapes", "16x30", "--batches", "2", *extra],
            capture_output=True, text=True, check=True, timeout=300,
        )  # fmt: skip
        result = json.loads(out.stdout.strip().splitlines()[-1])
        assert {r["backbone"] for r in result["rows"]} == {"sasrec", "bert4rec"}
        for r in result["rows"]:
            assert r["shape"] == "16x30"
            assert r["in_encoder_ms"] > 0 and r["plan_ms"] > 0 and r["training_thread_ms"] > 0
