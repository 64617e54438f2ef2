"""bench/step_time.py: step times of `cd`, AutoCDSR and AutoCDSR⁺ side by side. The figures are the
benchmark's business; here: it runs for both backbones, prints every variant (AutoCDSR⁺ also on batches that
carry their packing plan, as training batches do) and ends with the JSON line issue 3 asks for."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO


def test_step_time_bench_reports_every_ratio():
    out = subprocess.run(
        [sys.executable, str(REPO / "bench" / "step_time.py"), "--shapes", "4x30", "--rounds", "2", "--warmup",
         "1", "--layers", "2", "--update-every", "10", "1", "--ib-bucket-ratio", "2", "--ib-short-row", "4"],
        capture_output=True, text=True, check=True, timeout=300,
    )  # fmt: skip
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["autocdsr_update_every"] == 10
    # the AutoCDSR⁺ model and the data-path plans used these buckets (a mismatch would raise in the encoder)
    assert (result["ib_bucket_ratio"], result["ib_short_row"]) == (2.0, 4)
    for backbone in ("sasrec", "bert4rec"):
        key = f"{backbone}_4x30"
        for ratio in ("autocdsr_over_cd", "autocdsr_plus_over_cd", "autocdsr_every_step_over_cd",
                      "autocdsr_plus_every_step_over_cd", "autocdsr_plus_reuse_over_cd",
                      "autocdsr_plus_reuse_data_plan_over_cd"):  # fmt: skip
            assert result[f"{key}/{ratio}"] > 0, ratio
        assert result[f"{key}/cd_s_per_step"] > 0
    for headline in ("autocdsr_over_cd", "autocdsr_plus_over_cd"):  # the worst case over the rows
        assert result[headline] == max(result[f"{b}_4x30/{headline}"] for b in ("sasrec", "bert4rec"))
    assert out.stdout.count("plan from the data path") == 2
