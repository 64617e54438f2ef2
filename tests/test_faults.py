"""Faults in training, on the single-process path (`train.run(cfg, data, fit_fn=LocalFit())`: the worker loop
every Ray worker runs, a real SQLite MLflow store, real shards): non-finite loss and gradients, exact
resume, shards that change under the job, stale RUNNING runs, credentials and paths, tampered models.
The Ray-side counterparts are in tests/test_train.py."""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient

from autocdsr import compare, evaluation, tracking
from autocdsr.config import load_train_config
from autocdsr.configtools import ConfigError
from autocdsr.data import shards
from autocdsr.data.memory import in_memory_batches
from autocdsr.data.shards import DataChangedError, DatasetError
from autocdsr.security import PathError
from autocdsr.train import check_paths, run
from autocdsr.training import CHECKPOINT_FILE, LocalContext, NonFiniteError, train_worker
from tests.conftest import REPO, job_env
from tests.faults import LocalFit, append_copy, ddp_rank, drop_last_row, poison_at, poisoned_copy

TINY = [
    "model.d_model=16", "model.n_layers=1", "model.n_heads=2", "data.max_len=30", "train.batch_size=32",
    "train.lr=0.01", "train.warmup_steps=5", "eval.num_negatives=50", "eval.batch_size=64",
    "registry.name=null", "mlflow.log_model=false", "mlflow.system_metrics=false", "method=cd",
]  # fmt: skip
ABSURD_LR = ["train.lr=1.0e+30", "train.warmup_steps=1"]  # a real config that overflows the weights


def config(tmp: Path, *extra: str, name: str = "run"):
    return load_train_config(
        None,
        [*TINY, f"mlflow.tracking_uri=sqlite:///{tmp}/mlflow.db", f"train.storage_path={tmp}/ray",
         "mlflow.experiment=faults", f"mlflow.run_name={name}", *extra],
    )  # fmt: skip


def only_run(tmp: Path, name: str = "run"):
    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    exp = client.get_experiment_by_name("faults")
    (found,) = client.search_runs([exp.experiment_id], f"attributes.run_name = '{name}'")
    return client, found


@pytest.fixture(scope="module")
def poisoned(synth_dataset: Path, tmp_path_factory) -> Path:
    return poisoned_copy(synth_dataset, tmp_path_factory.mktemp("poisoned") / "sequences")


@pytest.fixture
def own_data(synth_dataset: Path, tmp_path: Path) -> Path:
    """A private copy of the shards that a test may change."""
    return Path(shutil.copytree(synth_dataset, tmp_path / "data"))


# ----------------------------------------------------------------------------- NaN / Inf
@pytest.mark.parametrize(
    ("cause", "expected"),
    [
        ("poisoned rows", r"at step 1: rank 0: loss_rec=nan, grad_norm=0\.0, pass 0, batch 0 of the pass "
                          r"\(32x1 items, 0 target positions\)"),
        ("absurd lr", r"at step 2: rank 0: loss_rec=nan, grad_norm=nan, pass 0, batch 1 of the pass "
                      r"\(32x\d+ items, [1-9]\d* target positions\)"),
    ],
)  # fmt: skip
def test_nan_stop_fails_the_run_naming_step_and_batch(
    cause: str, expected: str, synth_dataset: Path, poisoned: Path, tmp_path: Path
) -> None:
    data = poisoned if cause == "poisoned rows" else synth_dataset
    cfg = config(
        tmp_path, "train.max_steps=20", "train.eval_every=5", *([] if data == poisoned else ABSURD_LR)
    )
    assert cfg.train.nan_policy == "stop"  # the default
    with pytest.raises(NonFiniteError, match=expected + r"\. Stopping \(train\.nan_policy=stop"):
        run(cfg, str(data), fit_fn=LocalFit())
    _, r = only_run(tmp_path)
    assert r.info.status == "FAILED"
    assert re.search(
        "NonFiniteError: non-finite loss or gradients " + expected, r.data.tags["autocdsr.status_reason"]
    )


def test_nan_skip_drops_and_counts_bad_batches(synth_dataset: Path, poisoned: Path, tmp_path: Path) -> None:
    bad = {4, 10, 17}  # 10 is an evaluation step: it still evaluates and checkpoints
    cfg = config(tmp_path, "train.nan_policy=skip", "train.max_skipped_batches=3", "train.max_steps=24",
                 "train.eval_every=5")  # fmt: skip
    fit = LocalFit(batches=poison_at(bad, poisoned))
    summary = run(cfg, str(synth_dataset), fit_fn=fit)
    client, r = only_run(tmp_path)
    assert r.info.status == "FINISHED" and summary["metrics"]["train/skipped_batches"] == 3
    skipped = [(m.step, m.value) for m in client.get_metric_history(r.info.run_id, "train/skipped_batches")]
    assert sorted(skipped)[:3] == [(4, 1.0), (10, 2.0), (17, 3.0)]
    losses = client.get_metric_history(r.info.run_id, "train/loss_rec")
    assert sorted(m.step for m in losses) == sorted(set(range(1, 25)) - bad)
    assert all(math.isfinite(m.value) for m in losses)
    evaluated = {m.step for m in client.get_metric_history(r.info.run_id, "val/ndcg_10/all")}
    assert evaluated == {5, 10, 15, 20, 24}
    # the bad batches never reached the optimizer, the LR schedule or the weights
    saved = torch.load(Path(summary["checkpoint"]) / CHECKPOINT_FILE, weights_only=True)
    assert {float(s["step"]) for s in saved["optimizer"]["state"].values()} == {24.0 - len(bad)}
    assert saved["scheduler"]["last_epoch"] == 24 - len(bad)
    for weights in (saved["model"], saved["best_model"]):
        assert all(torch.isfinite(v).all() for v in weights.values())


@pytest.mark.parametrize("policy", ["skip", "stop"])
def test_ranks_agree_when_only_one_sees_a_bad_batch(
    policy: str, synth_dataset: Path, poisoned: Path, tmp_path: Path
) -> None:
    """Two real DDP ranks (gloo), only rank 1 meets a no-target batch at step 3 (NaN loss on rank 1 only; the
    all-reduced gradients stay finite). Both ranks must take the same branch: with skip both drop step 3 and
    end with identical weights; with stop both raise, naming rank 1. Without the agreement rank 0 would
    step and rank 1 not (diverged replicas), or rank 0 would wait forever in the next collective."""
    import torch.multiprocessing as mp

    overrides = [*TINY, f"train.nan_policy={policy}", "train.max_steps=8", "train.eval_every=4",
                 "train.max_skipped_batches=1"]  # fmt: skip
    args = (2, str(tmp_path / "init"), str(synth_dataset), str(poisoned), overrides, str(tmp_path))
    mp.start_processes(ddp_rank, args=args, nprocs=2, join=True, start_method="spawn")
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    if policy == "stop":
        for r in results:
            assert re.search(
                r"at step 3: rank 1: loss_rec=nan, .*0 target positions\)\. Stopping", r["result"]["error"]
            )
        return
    assert [r["result"]["final"]["train/skipped_batches"] for r in results] == [1.0, 1.0]
    w0, w1 = (r["weights"] for r in results)
    assert all(torch.equal(w0[k], w1[k]) and torch.isfinite(w0[k]).all() for k in w0)


def test_nan_skip_stops_after_max_skipped_batches(synth_dataset: Path, tmp_path: Path) -> None:
    """An absurd LR: every step after the first has NaN gradients; skip drops them until the limit."""
    cfg = config(tmp_path, *ABSURD_LR, "train.nan_policy=skip", "train.max_skipped_batches=2",
                 "train.max_steps=20", "train.eval_every=2")  # fmt: skip
    fit = LocalFit()
    with pytest.raises(NonFiniteError, match=r"at step 4: rank 0: .*grad_norm=nan.*Stopping: 2 batches were "
                       r"skipped already \(train\.max_skipped_batches=2\)"):  # fmt: skip
        run(cfg, str(synth_dataset), fit_fn=fit)
    _, r = only_run(tmp_path)
    assert r.info.status == "FAILED" and "max_skipped_batches=2" in r.data.tags["autocdsr.status_reason"]
    # the checkpoint of step 2 (a skipped step): only step 1 was ever applied, the weights are finite
    saved = torch.load(Path(fit.contexts[0].last_checkpoint) / CHECKPOINT_FILE, weights_only=True)
    assert saved["state"]["step"] == 2 and saved["state"]["skipped_batches"] == 1
    assert {float(s["step"]) for s in saved["optimizer"]["state"].values()} == {1.0}
    assert all(torch.isfinite(v).all() for v in saved["model"].values())
    # the overflowing model's validation scores are NaN: it ranks last, it is never the "best" model
    assert fit.contexts[0].reports[0]["val/ndcg_10/all"] == 0.0


def test_non_finite_scores_rank_last() -> None:
    target = torch.tensor([0.5, math.nan, 0.5])
    negatives = torch.tensor([[0.1, 0.2, 0.3], [0.1, 0.2, 0.3], [math.nan, 0.2, 0.9]])
    assert evaluation.ranks_against_candidates(target, negatives).tolist() == [0, 3, 2]
    scores = torch.tensor([[0.0, 0.9, math.nan, 0.1], [0.0, 0.1, 0.2, 0.3]])
    scores[1] = math.nan
    assert evaluation.ranks_full(scores, torch.tensor([1, 1])).tolist() == [1, 2]


# ----------------------------------------------------------------------------- resume
GATED = ["autocdsr.gate.enabled=true", "autocdsr.gate.every=6", "autocdsr.start_after=3",
         "autocdsr.gate.batches=2", "autocdsr.gate.sequences=16"]  # fmt: skip


@pytest.mark.parametrize(
    ("method", "backbone", "extra"),
    [("cd", "sasrec", []), ("cd+autocdsr", "bert4rec", []), ("cd+autocdsr", "sasrec", GATED)],
    ids=["cd-sasrec", "autocdsr-bert4rec", "autocdsr-sasrec-heldout-gate"],
)
def test_resume_after_a_crash_at_a_random_step_is_exact(
    method: str,
    backbone: str,
    extra: list[str],
    synth_dataset: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Single process, deterministic batches: a run that dies at a seeded-random step and resumes from its
    last checkpoint ends bit-identical to an uninterrupted one (weights, optimizer, LR schedule, balancer,
    RNG and the place in the pass are all in the checkpoint). 366 rows / 32 = 11 batches per pass, so the
    crash usually falls mid-pass. Each run keeps one checkpoint on disk, not one per report. With the held-out
    gate (probes at steps 4, 10, 16, 22, 28), its query weights and schedule are in the checkpoint too."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where LocalContext keeps its checkpoints
    info = shards.open_dataset(str(synth_dataset))
    cfg = load_train_config(None, [*TINY, f"method={method}", f"model.backbone={backbone}", "train.max_steps=30",
                                   "train.eval_every=10", "train.patience=1000", "model.dropout=0.2", *extra])  # fmt: skip
    ctx = LocalContext(in_memory_batches(info, cfg), reports=[])
    probes: list[int] = []  # steps at which the held-out gate probed, over the runs below

    def note_probes(metrics: dict[str, float], step: int) -> None:
        if "gate/heldout_loss_rec" in metrics:
            probes.append(step)

    whole = train_worker(cfg, info, ctx, log_metrics=note_probes)
    whole_probes, probes[:] = list(probes), []
    assert len([r for r in ctx.reports if "val/ndcg_10/all" in r]) == 3  # three checkpoints reported ...
    assert list(tmp_path.glob("autocdsr-ckpt-*")) == [Path(ctx.last_checkpoint)]  # ... the last one kept
    shutil.rmtree(ctx.last_checkpoint)
    crash_step = random.Random(f"resume-{method}{'-gate' if extra else ''}").randint(11, 29)

    class CrashError(Exception):
        pass

    def crash(metrics: dict[str, float], step: int) -> None:
        note_probes(metrics, step)
        if step == crash_step and "train/loss_rec" in metrics:
            raise CrashError

    first = LocalContext(in_memory_batches(info, cfg))
    with pytest.raises(CrashError):
        train_worker(cfg, info, first, log_metrics=crash)
    assert first.last_checkpoint is not None
    second = LocalContext(in_memory_batches(info, cfg), last_checkpoint=first.last_checkpoint)
    resumed = train_worker(cfg, info, second, log_metrics=note_probes)
    assert resumed == whole, f"crash at step {crash_step}"
    # the resumed run repeats the probes after its checkpoint's step, on the same schedule, and no other
    assert whole_probes == ([4, 10, 16, 22, 28] if extra else [])
    assert sorted(set(probes)) == whole_probes
    # the checkpoint resumed from is the caller's and stays; the resumed run's own newest one besides it
    assert sorted(tmp_path.glob("autocdsr-ckpt-*")) == sorted(
        map(Path, {first.last_checkpoint, second.last_checkpoint})
    )


# ----------------------------------------------------------------------------- data checks
def _mutate(kind: str, data: Path) -> str:
    """Change the folder one way; return the message part that must name it."""
    train = sorted((data / "train").glob("*.parquet"))
    if kind == "schema version":
        manifest = json.loads((data / "manifest.json").read_text())
        manifest["schema_version"] = 7
        (data / "manifest.json").write_text(json.dumps(manifest))
        return "schema_version 7 is not supported"
    if kind == "extra file":
        shutil.copy(train[0], data / "train" / "part-99999-copy.snappy.parquet")
        return r"train: manifest.json records 4 Parquet file\(s\), found 5 \(.*train/part-99999-copy"
    if kind == "truncated file":
        valid = sorted((data / "valid").glob("*.parquet"))[1]
        valid.write_bytes(valid.read_bytes()[: valid.stat().st_size // 2])
        return re.escape(f"valid/{valid.name}: not a readable Parquet file")
    if kind == "fewer rows":
        drop_last_row(train[2])
        return rf"train: manifest.json records 366 rows, the Parquet files hold 365 \(.*{train[2].name}: \d+"
    if kind == "not a dataset":
        return "holds no manifest.json"
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind", ["schema version", "extra file", "truncated file", "fewer rows", "not a dataset"]
)
def test_data_that_disagrees_with_its_manifest_stops_before_training(
    kind: str, own_data: Path, tmp_path: Path
) -> None:
    expected = _mutate(kind, own_data)
    target = own_data / "train" if kind == "not a dataset" else own_data
    fit = LocalFit()
    with pytest.raises((DatasetError, PathError), match=expected):
        run(config(tmp_path, "train.max_steps=5"), str(target), fit_fn=fit)
    assert fit.calls == 0  # no training started ...
    assert not (tmp_path / "mlflow.db").exists()  # ... and no MLflow run (not even the store)


@pytest.mark.parametrize("change", ["train shard rewritten", "test shard replaced", "valid shard appended"])
def test_data_changed_during_training_stops_the_run(change: str, own_data: Path, tmp_path: Path) -> None:
    """The files change at step 3. With eval_every=5 the check before the step-5 evaluation sees it; with
    no evaluation before step 30 the next pass start (step 12, 11 batches per pass) does."""
    train = sorted((own_data / "train").glob("*.parquet"))[0]
    test = sorted((own_data / "test").glob("*.parquet"))[1]
    valid = sorted((own_data / "valid").glob("*.parquet"))[3]

    def mutate(step: int) -> None:
        if step != 3:
            return
        if change == "train shard rewritten":
            drop_last_row(train)
        elif change == "test shard replaced":
            test.rename(test.with_name("part-00001-replaced.snappy.parquet"))
        else:
            append_copy(valid)

    expected = {
        "train shard rewritten": rf"before the evaluation at step 5 \(rank 0\): .*train/{train.name} changed size: "
        r"\d+ -> \d+ bytes",
        "test shard replaced": rf"at the start of pass 1 \(rank 0\): .*test/{test.name} disappeared \(was \d+ "
        r"bytes\); test/part-00001-replaced\.snappy\.parquet appeared",
        "valid shard appended": rf"before the evaluation at step 5 \(rank 0\): .*valid/{valid.name} changed size",
    }[change]
    eval_every = 30 if change == "test shard replaced" else 5
    cfg = config(tmp_path, "train.max_steps=30", f"train.eval_every={eval_every}")
    fit = LocalFit(on_step=mutate)
    with pytest.raises(DataChangedError, match=expected):
        run(cfg, str(own_data), fit_fn=fit)
    _, r = only_run(tmp_path)
    assert r.info.status == "FAILED"
    assert re.search("DataChangedError: data check " + expected, r.data.tags["autocdsr.status_reason"])


def test_fingerprint_names_every_kind_of_change(own_data: Path) -> None:
    info = shards.check_files(shards.open_dataset(str(own_data)))
    assert set(info.files) >= {"manifest.json", "_SUCCESS"} and sum(
        k.startswith("items/") for k in info.files
    )
    shards.verify_unchanged(info)  # nothing changed yet
    items = sorted((own_data / "items").glob("*.parquet"))[0]
    st = items.stat()
    os.utime(items, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # same bytes, rewritten
    (own_data / "_SUCCESS").unlink()
    with pytest.raises(DataChangedError) as e:
        shards.verify_unchanged(info)
    assert f"items/{items.name} was rewritten (modification time" in str(e.value)
    assert "_SUCCESS disappeared (was 0 bytes)" in str(e.value)


# ----------------------------------------------------------------------------- MLflow run status
def test_stale_running_runs_are_marked_killed_and_resumable(synth_dataset: Path, tmp_path: Path) -> None:
    """A driver that dies without ending its run (SIGKILL, crash) leaves it RUNNING; the next
    autocdsr.compare (or autocdsr.train) on the host marks it KILLED with the reason; --resume continues it.
    Runs of live drivers, or of other hosts, are left alone."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    code = f"from autocdsr import tracking; print(tracking.start_run({uri!r}, 'faults', 'gone', {{}}, {{}}))"
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=job_env(), cwd=REPO
    )
    gone_id = proc.stdout.strip().splitlines()[-1]
    gone_pid = MlflowClient(uri).get_run(gone_id).data.tags["autocdsr.driver.pid"]
    alive_id = tracking.start_run(uri, "faults", "alive", {}, {})  # this process: alive
    remote_id = tracking.start_run(uri, "faults", "remote", {}, {})
    MlflowClient(uri).set_tag(remote_id, "autocdsr.driver.host", "some-other-host")

    assert compare.main(["gone", "--experiment", "faults", "--tracking-uri", uri]) == 2  # nothing FINISHED
    client = MlflowClient(uri)
    gone = client.get_run(gone_id)
    assert gone.info.status == "KILLED"
    reason = gone.data.tags["autocdsr.status_reason"]
    assert f"driver pid {gone_pid} on {socket.gethostname()} exited without ending the run" in reason
    assert "marked KILLED by autocdsr.compare" in reason and "--resume" in reason
    assert client.get_run(alive_id).info.status == "RUNNING"
    assert client.get_run(remote_id).info.status == "RUNNING"

    # --resume continues the KILLED run (same id), and refuses one whose driver is alive
    summary = run(config(tmp_path, "train.max_steps=5", "train.eval_every=5", name="gone"), str(synth_dataset),
                  resume=True, fit_fn=LocalFit())  # fmt: skip
    assert summary["run_id"] == gone_id and client.get_run(gone_id).info.status == "FINISHED"
    assert client.get_run(gone_id).data.tags["autocdsr.status_reason"] == "resumed (was KILLED)"
    with pytest.raises(ConfigError, match="RUNNING in a live driver process on this host"):
        run(config(tmp_path, name="alive"), str(synth_dataset), resume=True, fit_fn=LocalFit())
    tracking.end_run(uri, alive_id, "KILLED", "test cleanup")


@pytest.mark.parametrize("change", ["files touched", "manifest rewritten", "shard renamed"])
def test_resume_continues_only_on_the_data_the_run_started_on(
    change: str, own_data: Path, tmp_path: Path
) -> None:
    """Interrupted (Ctrl-C: KILLED), then the folder changes between the two invocations: --resume refuses
    a rebuilt manifest or other files (each still consistent with the manifest), before training; a folder
    whose files only got new modification times (restored, copied) is the same data."""

    def interrupt(step: int) -> None:
        if step == 3:
            raise KeyboardInterrupt

    cfg = config(tmp_path, "train.max_steps=10", "train.eval_every=5")
    with pytest.raises(KeyboardInterrupt):
        run(cfg, str(own_data), fit_fn=LocalFit(on_step=interrupt))
    _, first = only_run(tmp_path)
    assert first.info.status == "KILLED" and "interrupted" in first.data.tags["autocdsr.status_reason"]
    shard = sorted((own_data / "train").glob("*.parquet"))[2]
    if change == "files touched":
        for f in own_data.rglob("*.parquet"):
            os.utime(f)
        summary = run(cfg, str(own_data), resume=True, fit_fn=LocalFit())
        assert summary["run_id"] == first.info.run_id and only_run(tmp_path)[1].info.status == "FINISHED"
        return
    if change == "manifest rewritten":
        manifest = json.loads((own_data / "manifest.json").read_text())
        (own_data / "manifest.json").write_text(json.dumps({**manifest, "note": "rebuilt"}))
        expected = r"--resume: .*manifest\.json differs from the one run \w+ started on"
    else:
        shard.rename(shard.with_name("part-00002-renamed.snappy.parquet"))
        expected = (
            rf"--resume: .* is not the data run \w+ started on: train/{re.escape(shard.name)} disappeared"
        )
    fit = LocalFit()
    with pytest.raises(DatasetError, match=expected):
        run(cfg, str(own_data), resume=True, fit_fn=fit)
    assert fit.calls == 0 and only_run(tmp_path)[1].info.status == "KILLED"


# ----------------------------------------------------------------------------- credentials and paths
@pytest.mark.parametrize(
    "override",
    ["mlflow.password=hunter2", "mlflow.token=abc", "train.aws_secret_access_key=x", "mlflow.api_key=k",
     "registry.credentials=c", "storage.access_key=a"],
)  # fmt: skip
def test_credential_like_config_keys_are_refused(override: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=rf"'{re.escape(override.split('=')[0])}' looks like a credential.*"
                       r"set them in the environment"):  # fmt: skip
        load_train_config(None, [override])
    yaml_file = tmp_path / "train.yaml"
    key, value = override.split("=")
    section, leaf = key.split(".")
    yaml_file.write_text(f"{section}:\n  {leaf}: {value}\n")
    with pytest.raises(ConfigError, match="looks like a credential"):
        load_train_config(yaml_file)
    load_train_config(None, ["model.num_ib_tokens=3"])  # "tokens" is not a credential


def test_cli_refuses_a_credential_override_without_echoing_it(synth_dataset: Path, tmp_path: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "autocdsr.train",
        "--data",
        str(synth_dataset),
        "mlflow.token=s3cr3t-value-77",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=job_env(), cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "'mlflow.token' looks like a credential" in proc.stderr
    assert "s3cr3t-value-77" not in proc.stdout + proc.stderr
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize(
    ("overrides", "data", "expected"),
    [
        ([], "s3://AKIAXX:topsecret@bucket/seq", r"--data: the URI carries a password"),
        (["mlflow.tracking_uri=https://bob:pw@mlflow.example.com"], None, r"mlflow.tracking_uri \(or \$MLFLOW_TRACKING_URI\): the URI carries a password"),
        (["train.storage_path=s3://b/ckpt?X-Amz-Signature=abc"], None, r"train.storage_path: .*secret query parameter \(X-Amz-Signature\)"),
        (["train.storage_path=abfs://c@acct.dfs.core.windows.net/x?sv=1&sig=zz"], None, r"secret query parameter \(sig\)"),
        (["train.storage_path=DATA/ckpt"], None, r"train.storage_path \(checkpoints\) .* lies inside the dataset folder"),
        (["mlflow.tracking_uri=sqlite:///DATA/../sequences/runs.db"], None, r"mlflow.tracking_uri \(SQLite file\) .* inside"),
        ([], "DATA/train", "holds no manifest.json"),
        ([], "DATA-missing", "is not a folder"),
        (["train.storage_path=TMP/a-file"], None, "exists and is not a folder"),
    ],
)  # fmt: skip
def test_paths_are_validated(
    overrides: list[str], data: str | None, expected: str, synth_dataset: Path, tmp_path: Path
) -> None:
    root = str(synth_dataset)
    (tmp_path / "a-file").write_text("")
    cfg = config(tmp_path, *[o.replace("DATA", root).replace("TMP", str(tmp_path)) for o in overrides])
    with pytest.raises(PathError, match=expected) as e:
        check_paths(cfg, (data or "DATA").replace("DATA", root))
    assert "topsecret" not in str(e.value) and ":pw@" not in str(e.value)


def test_accepted_paths_are_made_absolute(synth_dataset: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    rel = os.path.relpath(synth_dataset, tmp_path)  # "../..": allowed, resolved once on the driver
    cfg, data = check_paths(config(tmp_path, "train.storage_path=ckpt"), rel)
    assert data == str(synth_dataset.resolve()) and cfg.train.storage_path == str(tmp_path / "ckpt")


def test_tampered_model_weights_are_refused_at_load(synth_dataset: Path, tmp_path: Path) -> None:
    """Loading a logged model reads JSON, Parquet and torch.load(weights_only=True): a weights file swapped
    for a pickle that runs code is refused before any of it runs."""
    cfg = config(tmp_path, "train.max_steps=5", "train.eval_every=5", "mlflow.log_model=true")
    summary = run(cfg, str(synth_dataset), fit_fn=LocalFit())
    mlflow.set_tracking_uri(summary["tracking_uri"])
    local = Path(mlflow.artifacts.download_artifacts(summary["model"], dst_path=str(tmp_path / "model")))
    mlflow.pyfunc.load_model(str(local))  # untampered: loads
    weights = next(local.rglob("weights.pt"))
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    torch.save({"item_emb.weight": Payload()}, weights)
    with pytest.raises(Exception, match=r"Weights only load failed|Unsupported global"):
        mlflow.pyfunc.load_model(str(local))
    assert not marker.exists()
    torch.load(weights, weights_only=False)  # the payload is real: an unsafe load would have run it
    assert marker.exists()


def test_package_code_never_unpickles() -> None:
    """The only unpickling on the model-loading path is MLflow's own (python_model.pkl); our files are JSON,
    YAML (safe_load), Parquet and torch.load(weights_only=True)."""
    offenders = []
    for path in sorted((REPO / "autocdsr").rglob("*.py")):
        text = path.read_text()
        for m in re.finditer(r"torch\.load\(([^()]|\([^()]*\))*\)", text):
            if "weights_only=True" not in m.group(0):
                offenders.append(f"{path.name}: {m.group(0)}")
        for pattern in (r"\bpickle\.loads?\(", r"allow_pickle\s*=\s*True", r"yaml\.load\(", r"read_pickle\(",
                        r"cloudpickle\.loads?\(", r"(?<![.\w])eval\(", r"(?<![.\w])exec\("):  # fmt: skip
            offenders += [f"{path.name}: {pattern}" for _ in re.finditer(pattern, text)]
    assert not offenders, offenders
