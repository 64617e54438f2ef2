"""bench/loss.py: the chunked and the materialised full-softmax loss side by side. The figures are the
benchmark's business; here: it runs, reports every figure, and the chunked loss's peak memory is a small
fraction of the logit matrix's (the point of chunking, measured in fresh processes)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO


def test_loss_bench_reports_time_and_bounded_memory():
    rows, items = 4096, 20_000  # logits: 312 MiB of fp32 per copy; a chunk: 16 MiB
    out = subprocess.run(
        [sys.executable, str(REPO / "bench" / "loss.py"), "--shapes", f"{rows}x{items}", "1000x5000:512",
         "--rounds", "1"],
        capture_output=True, text=True, check=True, timeout=300,
    )  # fmt: skip
    both = json.loads(out.stdout.strip().splitlines()[-1])
    sampled = both["1000x5000:512"]  # the sampled softmax's pair runs too
    assert sampled["chunked_s"] > 0 and sampled["materialised_s"] > 0 and sampled["chunked_peak_mib"] >= 0
    report = both[f"{rows}x{items}"]
    assert report["chunked_s"] > 0 and report["materialised_s"] > 0
    assert report["chunked_over_materialised"] > 0
    logits_mib = rows * items * 4 / 2**20
    assert report["materialised_peak_mib"] > logits_mib  # at least the logits themselves
    # the chunked step's peak is mostly the libraries' own first-use buffers (~0.1 GiB here), not logits
    assert report["chunked_peak_mib"] < report["materialised_peak_mib"] / 4
