"""bench/device_check.py, the first thing a session with a lent GPU runs: every check runs (here on the CPU
against itself) and a check fails when the device computes something else."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO

CPU = torch.device("cpu")
SHAPE = (6, 24)


@pytest.fixture(scope="module")
def device_check():
    spec = importlib.util.spec_from_file_location("bench_device_check", REPO / "bench" / "device_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def test_every_check_runs_and_passes_on_the_cpu(device_check, tmp_path: Path, capsys):
    assert device_check.main(["--device", "cpu", "--quick", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "device_check.json").read_text())
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["failed"] == report["failed"] == 0 and last["passed"] == report["passed"]
    names = list(report["checks"])
    for backbone in ("sasrec", "bert4rec"):
        for enc in ("plain", "plus"):
            kind = f"{backbone} {enc}"
            assert sum(n.startswith(f"fp32 {kind}") for n in names) == 1
            assert sum(n.startswith(f"bf16 {kind}") for n in names) == 2  # full and sampled softmax
            assert sum(n.startswith(f"retrieval {kind}") for n in names) == 1
            assert sum(n.startswith(f"training {kind}") for n in names) == 1
            assert sum(n.startswith(f"causal {kind}") for n in names) == (backbone == "sasrec")
    assert all(c["bf16_module_outputs"] > 0 for n, c in report["checks"].items() if n.startswith("bf16"))


@pytest.mark.parametrize("ib", [False, True])
def test_causality_check_catches_a_model_that_sees_the_future(device_check, ib):
    """BERT4Rec is bidirectional: run through the causality check it must fail (SASRec passes above)."""
    check = device_check.check_causal(ib, CPU, SHAPE, backbone="bert4rec")
    assert not check.ok and check.figures["max_change_before_j"] > device_check.CAUSAL_ABS


def test_parity_checks_catch_a_device_that_computes_differently(device_check, monkeypatch):
    """A device that computes differently (here: a copy whose first attention weights are off by ~1e-2, a fault this
    machine cannot produce for real) fails the fp32, retrieval and training checks."""
    gen = torch.Generator().manual_seed(0)
    original = device_check.on_device

    def drifting(model, device):
        copy = original(model, device)
        with torch.no_grad():
            weight = next(p for n, p in copy.named_parameters() if "blocks.0" in n and p.dim() == 2)
            weight.add_(1e-2 * torch.randn(weight.shape, generator=gen))
        return copy

    assert device_check.check_fp32("sasrec", True, CPU, SHAPE).ok  # the honest copy passes ...
    monkeypatch.setattr(device_check, "on_device", drifting)
    assert not device_check.check_fp32("sasrec", True, CPU, SHAPE).ok  # ... the drifting one does not
    assert not device_check.check_retrieval("bert4rec", False, CPU, SHAPE).ok
    assert not device_check.check_training("sasrec", False, CPU, SHAPE, steps=2).ok
