"""Shared fixtures: one real local Spark session per test session, generated logs, a job runner."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from pyspark.sql import SparkSession

from autocdsr.synth import SynthConfig, generate, write_logs

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("AUTOCDSR_SHARED_DATA", REPO.parent / "shared" / "data"))


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def gloo_group(rank: int, world_size: int, port: int) -> Iterator[None]:
    """One rank of a real torch.distributed gloo group on this host (inside a spawned process), one torch
    thread; on a clean exit it waits for every rank before closing its connections."""
    import torch
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        yield
        dist.barrier()  # no rank closes its connections while another is still in a collective
    finally:
        dist.destroy_process_group()


def load_bench_script(name: str) -> ModuleType:
    """bench/<name>.py as a module (bench/ holds scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def spark() -> Iterator[SparkSession]:
    session = (
        SparkSession.builder.master("local[2]")
        .appName("autocdsr-tests")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.shuffle.partitions", "4")
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.hadoop.mapreduce.fileoutputcommitter.marksuccessfuljobs", "false")
        .config("spark.driver.memory", "2g")
        .getOrCreate()
    )
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


@pytest.fixture(scope="session")
def synth_frame():
    """A small generated log (300 users, all four domains) as a pandas DataFrame."""
    return generate(SynthConfig(users=300, seed=11, mean_events=30))


@pytest.fixture(scope="session")
def synth_logs(tmp_path_factory, synth_frame) -> Path:
    """The generated log written as IN/<domain>/ in mixed formats (csv, parquet, jsonl)."""
    root = tmp_path_factory.mktemp("synth") / "logs"
    write_logs(synth_frame, root, "mixed")
    return root


def job_env() -> dict[str, str]:
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    env["PYSPARK_PYTHON"] = sys.executable
    env["PYSPARK_DRIVER_PYTHON"] = sys.executable
    return env


def spark_submit(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``spark-submit jobs/build_sequences.py ARGS`` as a user would, from the repository root."""
    cmd = [
        str(Path(sys.executable).parent / "spark-submit"),
        "--master",
        "local[2]",
        "--conf",
        "spark.ui.enabled=false",
        "--driver-java-options",
        f"-Dlog4j2.configurationFile={REPO / 'conf/spark/log4j2.properties'}",
        str(REPO / "jobs" / "build_sequences.py"),
        *args,
    ]
    return subprocess.run(cmd, cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def synth_dataset(spark, synth_logs: Path, tmp_path_factory) -> Path:
    """The generated logs built into sequence shards (max_len 50) by the real pipeline, once per session."""
    from pipelines.build import build_sequences
    from pipelines.config import load_config

    out = tmp_path_factory.mktemp("built") / "sequences"
    build_sequences(spark, str(synth_logs), str(out), load_config(None, ["max_len=50", "rows_per_shard=120"]))
    return out
