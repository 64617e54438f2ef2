"""The scripts a session with a lent GPU runs (bench/gpu.sh), tested on the CPU: bench/device_check.py runs
every check (here the CPU against itself) and a check fails when the device computes something else;
bench/device_train.py trains through `train_worker` without Ray or MLflow (the device image has neither) and
reports what a direct `train_worker` call gives."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, load_bench_script

CPU = torch.device("cpu")
SHAPE = (6, 24)


load_script = load_bench_script


@pytest.fixture(scope="module")
def device_check():
    yield load_script("device_check")
    del sys.modules["bench_device_check"]


@pytest.fixture(scope="module")
def device_train():
    yield load_script("device_train")
    del sys.modules["bench_device_train"]


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


# -- bench/device_train.py --------------------------------------------------------------------------------

TINY = [
    "model.d_model=16", "model.n_layers=1", "model.n_heads=2", "data.max_len=20", "train.batch_size=32",
    "train.warmup_steps=5", "train.max_steps=30", "train.eval_every=15", "train.patience=1000",
    "eval.num_negatives=20",
]  # fmt: skip


def test_the_device_scripts_import_neither_ray_nor_mlflow():
    """The device image has torch and pyarrow but not Ray or MLflow: both scripts and the training loop they
    call must import without them (they are blocked here, as if not installed)."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('ray', 'mlflow', 'pyspark'):\n"
        "            raise ImportError(f'blocked: {name}')\n"
        "sys.meta_path.insert(0, Block())\n"
        "sys.path[:0] = ['bench', '.']\n"
        "import device_check, device_train\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_device_train_reports_what_train_worker_gives(
    device_train, synth_dataset: Path, tmp_path: Path, capsys
):
    from autocdsr.config import load_train_config
    from autocdsr.data import shards
    from autocdsr.data.memory import in_memory_batches
    from autocdsr.training import LocalContext, train_worker

    argv = ["--data", str(synth_dataset), "--methods", "cd", "cd+autocdsr", "--seeds", "3", "--device", "cpu"]
    # weights held between gradient solves, so that the windows' solve counts and ratios below are known
    held = [*TINY, "autocdsr.reuse=weights"]
    assert device_train.main([*argv, "--out", str(tmp_path), "--set", *held]) == 0
    runs = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    assert [(r["method"], r["seed"]) for r in runs] == [("cd", 3), ("cd+autocdsr", 3)]
    info = shards.open_dataset(str(synth_dataset))
    for run in runs:
        assert run["steps"] == 30 and run["metrics"]["best_step"] in (15.0, 30.0)
        assert {f"test/ndcg_10/{d}" for d in [*info.vocab.domains, "all"]} <= set(run["metrics"])
        windows = run["training"]
        assert windows[0]["first_step"] == 1 and windows[-1]["last_step"] == 30
        assert all("train/loss_rec" in w and "train/a_cd" in w for w in windows)
        # the Pareto run's solves per window (the first step, then every 10th) and where their L̃_cd / L̃_rec
        # sits against p_1's band (the first solve normalises both losses to 1: above the default band)
        solves = [sum(w["first_step"] <= s <= w["last_step"] for s in (1, 10, 20, 30)) for w in windows]
        if run["method"] == "cd+autocdsr":
            assert [w["train/pareto/solves"] for w in windows] == solves
            assert windows[0]["train/pareto/ratio_median"] == pytest.approx(1.0)
            assert windows[0]["train/pareto/share_above_band"] == 1.0
            for w in windows:
                if w["train/pareto/solves"]:
                    shares = [w[f"train/pareto/share_{k}"] for k in ("below_band", "in_band", "above_band")]
                    assert sum(shares) == pytest.approx(1.0)
        else:
            assert not any(k.startswith("train/pareto/solves") for w in windows for k in w)
    # the same run through train_worker directly: the same numbers
    cfg = load_train_config(None, [*held, "method=cd+autocdsr", "seed=3"])
    direct = train_worker(cfg, info, LocalContext(in_memory_batches(info, cfg)))
    assert runs[1]["metrics"] == pytest.approx({k: float(v) for k, v in direct.items()})
    table = capsys.readouterr().out
    assert "| cd+autocdsr | 3 |" in table and f"{direct['test/ndcg_10/all']:.4f}" in table


def test_max_minutes_ends_training_with_a_validation_and_the_test(
    device_train, synth_dataset: Path, tmp_path: Path
):
    """train.max_minutes (how a lease-bound run fits its time): once spent, the step just taken is validated, the
    best weights are kept and the test split is evaluated, as at max_steps; a budget of 0 or less is refused."""
    from autocdsr.config import ConfigError, load_train_config

    argv = [
        "--data",
        str(synth_dataset),
        "--methods",
        "cd+autocdsr",
        "--device",
        "cpu",
        "--out",
        str(tmp_path),
    ]
    assert device_train.main([*argv, "--set", *TINY, "train.max_minutes=0.000001"]) == 0
    (run,) = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    m = run["metrics"]
    assert run["steps"] == 1 and m["stopped_step"] == 1.0  # max_steps is 30, eval_every 15
    assert (
        m["best_step"] == 1.0 and math.isfinite(m["val/best_ndcg_10"]) and 0.0 <= m["test/ndcg_10/all"] <= 1.0
    )
    with pytest.raises(ConfigError, match=r"train\.max_minutes must be > 0"):
        load_train_config(None, ["train.max_minutes=0"])


def test_gpu_sh_lease_runs_checks_and_every_method_and_packs_the_results(synth_dataset: Path, tmp_path: Path):
    """`bash bench/gpu.sh lease`, what a session with a lent GPU runs in its one call, dry-run on the CPU
    (DEVICE=cpu, no step timings): the packing-plan timing, device_check and one training process per method,
    everything in lease.tgz."""
    env = {
        **os.environ, "DEVICE": "cpu", "TIMING": "0", "LEASE_S": "400", "STEPS": "30", "METHODS": "cd cd+autocdsr",
        "DATA": str(synth_dataset), "OUT": str(tmp_path), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
    }  # fmt: skip
    cmd = ["bash", "bench/gpu.sh", "lease", *TINY, "model.loss=full"]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with tarfile.open(tmp_path / "lease.tgz") as tar:
        files = {name.removeprefix("./"): tar.extractfile(name).read().decode() for name in tar.getnames() if tar.getmember(name).isfile()}  # fmt: skip
    assert json.loads(files["device_check.json"])["failed"] == 0
    for name, method in (("cd", "cd"), ("cd_autocdsr", "cd+autocdsr")):
        (run,) = [json.loads(line) for line in files[f"{name}/runs.jsonl"].splitlines()]
        assert run["method"] == method and run["steps"] == 30
        assert "train.max_minutes=" in " ".join(run["overrides"])  # bounded by what the lease had left
    assert "lease:" in files["lease.log"]
    plan = json.loads(files["ib_plan.log"].strip().splitlines()[-1])  # bench/ib_plan.py on the lease's data
    assert plan["data"] == str(synth_dataset) and len(plan["rows"]) == 4


def test_device_train_starts_no_run_once_its_budget_is_spent(
    device_train, synth_dataset: Path, tmp_path: Path
):
    argv = ["--data", str(synth_dataset), "--methods", "cd", "--device", "cpu", "--budget-s", "0"]
    assert device_train.main([*argv, "--out", str(tmp_path), "--set", *TINY]) == 0
    assert not (tmp_path / "runs.jsonl").exists()


def test_device_train_names_data_that_was_never_built(device_train, tmp_path: Path, capsys):
    with pytest.raises(SystemExit) as exc:
        device_train.main(
            ["--data", str(tmp_path / "nowhere"), "--device", "cpu", "--out", str(tmp_path / "o")]
        )
    assert exc.value.code == 2
    assert f"--data {tmp_path / 'nowhere'}: no built sequences there" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing written
