"""End-to-end tests of the sequence builder: every item of docs/data-contract.md against an independent
computation (tests/reference.py), through spark-submit and in-process on the shared Spark session."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.build import RejectedRowsError, build_sequences
from pipelines.config import load_config
from pipelines.output import OutputError
from tests import reference
from tests.conftest import REPO, SHARED_DATA, job_env, spark_submit

SEQ_SCHEMA = pa.schema(
    [
        ("sequence_id", pa.string()),
        ("user_id", pa.string()),
        ("chunk", pa.int32()),
        ("item_idx", pa.list_(pa.int32())),
        ("domain_idx", pa.list_(pa.int16())),
        ("timestamp", pa.list_(pa.int64())),
    ]
)
ITEM_SCHEMA = pa.schema(
    [
        ("item_idx", pa.int32()),
        ("item_id", pa.string()),
        ("domain", pa.string()),
        ("domain_idx", pa.int16()),
        ("count", pa.int64()),
    ]
)


def _types(schema: pa.Schema) -> list[tuple[str, pa.DataType]]:
    return [(f.name, f.type) for f in schema]


def read_split(out: Path, name: str) -> pa.Table:
    return pq.read_table(out / name, schema=None)


def assert_matches_reference(
    out: Path, events: pd.DataFrame, domains: list[str], max_len: int, min_len: int
) -> dict:
    """Check the published OUT against the plain-Python reference; return the manifest."""
    assert (out / "_SUCCESS").exists() and (out / "manifest.json").exists()
    assert not list(out.parent.glob(f".{out.name}.staging-*")), "staging folder left behind"
    manifest = json.loads((out / "manifest.json").read_text())
    ref = reference.build(
        [reference.Event(r.user_id, r.domain, r.item_id, int(r.ts)) for r in events.itertuples()],
        domains,
        max_len,
        min_len,
    )
    # items
    items = read_split(out, "items")
    assert _types(items.schema) == _types(ITEM_SCHEMA), items.schema
    got_items = {(r["domain"], r["item_id"]): r for r in items.to_pylist()}
    assert len(got_items) == len(ref.items) == manifest["counts"]["items"]
    for key, want in ref.items.items():
        got = got_items[key]
        assert (got["item_idx"], got["domain_idx"], got["count"]) == (
            want["item_idx"],
            want["domain_idx"],
            want["count"],
        )
    # sequences, all three splits
    tables = {s: read_split(out, s) for s in ("train", "valid", "test")}
    for name, table in tables.items():
        assert _types(table.schema) == _types(SEQ_SCHEMA), (name, table.schema)
        assert all(table.column(c).null_count == 0 for c in table.column_names), name
        assert table.num_rows == len(ref.sequences) == manifest["counts"]["subsequences"]
    test_rows = {r["sequence_id"]: r for r in tables["test"].to_pylist()}
    assert set(test_rows) == set(ref.sequences)
    for sid, want in ref.sequences.items():
        got = test_rows[sid]
        assert (got["user_id"], got["chunk"]) == (want["user_id"], want["chunk"])
        assert got["item_idx"] == want["item_idx"], sid
        assert got["domain_idx"] == want["domain_idx"], sid
        assert got["timestamp"] == want["timestamp"], sid
    for k, name in ((1, "valid"), (2, "train")):
        for r in tables[name].to_pylist():
            full = test_rows[r["sequence_id"]]
            for col in ("item_idx", "domain_idx", "timestamp"):
                assert r[col] == full[col][:-k]
    # manifest counts and the ledger
    c = manifest["counts"]
    assert c["duplicates_dropped"] == ref.duplicates
    assert c["interactions_in_short_subsequences"] == ref.short
    assert c["interactions_kept"] == ref.kept
    assert (
        c["input_rows"]
        == c["interactions_kept"]
        + c["rejected_rows"]
        + c["duplicates_dropped"]
        + (c["interactions_in_short_subsequences"])
    )
    assert c["rejected_rows"] == sum(c["rejected_by_reason"].values())
    assert [d["domain"] for d in manifest["domains"]] == sorted(set(domains))
    for d in manifest["domains"]:
        mine = [v for k, v in ref.items.items() if k[0] == d["domain"]]
        assert d["items"] == len(mine) and d["interactions"] == sum(v["count"] for v in mine)
        if mine:
            assert d["item_idx_range"] == [min(v["item_idx"] for v in mine), max(v["item_idx"] for v in mine)]
    lengths = sorted(len(s["item_idx"]) for s in ref.sequences.values())
    assert (
        manifest["sequence_length"]["min"] == lengths[0] and manifest["sequence_length"]["max"] == lengths[-1]
    )
    assert manifest["schema_version"] == 1
    return manifest


def synth_events(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.assign(ts=frame["timestamp"].astype("int64") * 1000)


def test_spark_submit_end_to_end(synth_logs: Path, synth_frame: pd.DataFrame, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = spark_submit("--input", str(synth_logs), "--output", str(out), "--config", "conf/data/synth.yaml",
                        "--max-len", "40", "--min-len", "4")  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "[6/6] writing" in proc.stdout and "subsequences" in proc.stdout  # PythonRunner merges stderr
    domains = sorted(synth_frame["domain"].unique())
    manifest = assert_matches_reference(out, synth_events(synth_frame), domains, max_len=40, min_len=4)
    assert manifest["config"]["max_len"] == 40 and manifest["counts"]["rejected_rows"] == 0
    assert manifest["counts"]["duplicates_dropped"] > 0  # the generator plants duplicates
    assert pq.read_table(out / "rejected").num_rows == 0


def test_spark_submit_by_sequence_split_file(
    synth_logs: Path, synth_frame: pd.DataFrame, tmp_path: Path
) -> None:
    """split=by_sequence: each user's subsequences go whole to the split the file names; laid out per split."""
    users = sorted(synth_frame["user_id"].unique())
    names = {0: "training", 1: "training", 2: "training", 3: "evaluation", 4: "testing"}
    assigned = {u: names[k % 5] for k, u in enumerate(users)}
    lines = [
        f" {u} ,{s}" if k % 7 == 0 else f"{u},{s}" for k, (u, s) in enumerate(assigned.items())
    ]  # trimmed
    lines += ["ghost1,testing", "ghost2,training"]  # users absent from the data are fine, and counted
    split_file = tmp_path / "split.csv"
    split_file.write_text("user_id,split\n" + "\n".join(lines) + "\n")
    out = tmp_path / "out"
    proc = spark_submit("--input", str(synth_logs), "--output", str(out), "--config", "conf/data/synth.yaml",
                        "--max-len", "20", "--set", "split=by_sequence", "--set", f"split_file={split_file}",
                        "--set", "rows_per_shard=60", "--set", "rows_per_row_group=7")  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    ref = reference.build(
        [
            reference.Event(r.user_id, r.domain, r.item_id, int(r.ts))
            for r in synth_events(synth_frame).itertuples()
        ],
        sorted(synth_frame["domain"].unique()),
        max_len=20,
        min_len=3,
    )
    ours = {"training": "train", "evaluation": "valid", "testing": "test"}
    data_users = {s["user_id"] for s in ref.sequences.values()}
    c, sp = manifest["counts"], manifest["split"]
    assert sp["protocol"] == "by_sequence" and sp["file"].endswith("split.csv")
    assert sum(sp["rows"].values()) == c["subsequences"] == len(ref.sequences)
    assert sp["users_in_file_not_in_data"] == len(assigned) + 2 - len(data_users)
    assert c["users"] < c["subsequences"]  # max_len 20 cuts some users into several subsequences
    tables = {s: read_split(out, s) for s in ("train", "valid", "test")}
    ids = {}
    for name, table in tables.items():
        assert _types(table.schema) == _types(SEQ_SCHEMA), (name, table.schema)
        rows = table.to_pylist()
        assert len(rows) == sp["rows"][name] > 0
        ids[name] = {r["sequence_id"] for r in rows}
        assert len(ids[name]) == len(rows)
        for r in rows:
            assert ours[assigned[r["user_id"]]] == name  # the user's split, from the (trimmed) file row
            want = ref.sequences[r["sequence_id"]]  # whole: the last item is the target, not held out
            assert (r["item_idx"], r["domain_idx"], r["timestamp"]) == (
                want["item_idx"],
                want["domain_idx"],
                want["timestamp"],
            )
        # The layout guarantee, per split: every row group holds R rows but the split's last.
        sizes = []
        files = sorted((out / name).glob("*.parquet"))
        for f in files:
            meta = pq.ParquetFile(f).metadata
            sizes += [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        assert len(files) == manifest["shards"][name]
        assert sum(sizes) == len(rows) and len(set(sizes[:-1])) <= 1 and sizes[-1] <= sizes[0], (name, sizes)
        assert sizes[0] == min(7, -(-len(rows) // -(-len(rows) // 60))), (name, sizes)
    assert (
        not ids["train"] & ids["valid"] and not ids["train"] & ids["test"] and not ids["valid"] & ids["test"]
    )
    assert ids["train"] | ids["valid"] | ids["test"] == set(ref.sequences)
    assert len(list((out / "train").glob("*.parquet"))) > 1  # really several files


def _build(spark, inp: Path, out: Path, *overrides: str, partitions: int = 4, force: bool = False):
    spark.conf.set("spark.sql.shuffle.partitions", str(partitions))
    try:
        return build_sequences(spark, str(inp), str(out), load_config(None, list(overrides)), force=force)
    finally:
        spark.conf.set("spark.sql.shuffle.partitions", "4")


def _content(out: Path) -> dict:
    """Everything a reader sees in OUT, independent of file layout."""
    manifest = json.loads((out / "manifest.json").read_text())
    manifest.pop("run")
    return {
        "manifest": manifest,
        **{s: read_split(out, s).sort_by("sequence_id").to_pylist() for s in ("train", "valid", "test")},
        "items": read_split(out, "items").sort_by("item_idx").to_pylist(),
    }


def test_deterministic_across_partition_counts(spark, synth_logs: Path, tmp_path: Path) -> None:
    _build(spark, synth_logs, tmp_path / "a", "max_len=25", partitions=2)
    _build(spark, synth_logs, tmp_path / "b", "max_len=25", "rows_per_shard=100", partitions=9)
    a, b = _content(tmp_path / "a"), _content(tmp_path / "b")
    a["manifest"]["config"].pop("rows_per_shard")
    b["manifest"]["config"].pop("rows_per_shard")
    a["manifest"].pop("shards")
    b["manifest"].pop("shards")
    assert a == b
    assert len(list((tmp_path / "b" / "train").glob("*.parquet"))) > 1  # really sharded differently


def _write_csv(folder: Path, rows: list[tuple]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]).to_csv(folder / "part-0.csv", index=False)


def test_bad_rows_are_quarantined_and_too_many_fail_without_writing(spark, tmp_path: Path) -> None:
    good = [(f"u{u}", f"i{(u * 7 + k) % 13}", 1_600_000_000 + k) for u in range(20) for k in range(10)]
    bad = [("", "i1", 1_600_000_000), ("u1", "i1", "not-a-time"), ("u2", "i2", -3)]
    _write_csv(tmp_path / "in" / "a", good[:100] + bad)
    _write_csv(tmp_path / "in" / "b", good[100:])
    out = tmp_path / "out"
    result = _build(spark, tmp_path / "in", out, "max_rejected_fraction=0.05")
    c = result.manifest["counts"]
    assert c["rejected_by_reason"] == {
        "missing_user_id": 1,
        "negative_timestamp": 1,
        "unparseable_timestamp": 1,
    }
    assert (
        c["input_rows"]
        == 203
        == c["interactions_kept"]
        + c["rejected_rows"]
        + c["duplicates_dropped"]
        + (c["interactions_in_short_subsequences"])
    )
    rejected = read_split(out, "rejected").to_pylist()
    assert sorted(r["reason"] for r in rejected) == sorted(c["rejected_by_reason"])
    assert all(r["source_file"].endswith("a/part-0.csv") for r in rejected)
    before = (out / "manifest.json").read_text()

    # Above the threshold: a clear error naming the reason and an example row; OUT untouched.
    with pytest.raises(
        RejectedRowsError, match=r"(?s)above max_rejected_fraction=1.00%.*unparseable_timestamp.*part-0\.csv"
    ):
        _build(spark, tmp_path / "in", out)  # default threshold 1%
    assert (out / "manifest.json").read_text() == before
    assert not list(tmp_path.glob(".out.staging-*"))


def test_long_user_is_cut_into_subsequences(spark, tmp_path: Path) -> None:
    n = 20_000
    rows = [("whale", f"i{k % 500}", 1_500_000_000 + k // 3) for k in range(n)]  # many same-second ties
    rows += [
        ("minnow", "i1", 1_500_000_000),
        ("minnow", "i2", 1_500_000_001),
        ("minnow", "i3", 1_500_000_002),
    ]
    _write_csv(tmp_path / "in" / "a", rows)
    out = tmp_path / "out"
    result = _build(spark, tmp_path / "in", out, "max_len=800")
    test = read_split(out, "test").to_pandas()
    whale = test[test.user_id == "whale"].sort_values("chunk")
    assert list(whale.chunk) == list(range(25)) and {len(x) for x in whale.item_idx} == {800}
    assert result.manifest["counts"]["subsequences"] == 26
    # the newest subsequence holds the last 800 events in history order
    newest = whale.iloc[-1]
    assert (
        list(newest.timestamp) == sorted(newest.timestamp)
        and newest.timestamp[-1] == (1_500_000_000 + (n - 1) // 3) * 1000
    )


def test_empty_domain_folder_and_output_rules(spark, tmp_path: Path) -> None:
    _write_csv(tmp_path / "in" / "a", [("u", f"i{k}", 1_600_000_000 + k) for k in range(5)])
    (tmp_path / "in" / "zz_empty").mkdir()
    out = tmp_path / "out"
    m = _build(spark, tmp_path / "in", out).manifest
    assert m["empty_domains"] == ["zz_empty"]
    assert m["domains"][1] == {
        "domain": "zz_empty",
        "domain_idx": 2,
        "items": 0,
        "interactions": 0,
        "item_idx_range": None,
    }

    with pytest.raises(OutputError, match="inside the input"):
        _build(spark, tmp_path / "in", tmp_path / "in" / "a" / "out")
    with pytest.raises(OutputError, match=r"input .* lies inside the output"):
        _build(spark, tmp_path / "in", tmp_path)
    foreign = tmp_path / "precious"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("do not delete")
    with pytest.raises(OutputError, match="refusing to replace"):
        _build(spark, tmp_path / "in", foreign)
    assert (foreign / "thesis.tex").read_text() == "do not delete"
    _build(spark, tmp_path / "in", foreign, force=True)
    assert (foreign / "_SUCCESS").exists() and not (foreign / "thesis.tex").exists()


def test_spark_submit_bad_schema_exits_2_and_writes_nothing(tmp_path: Path) -> None:
    folder = tmp_path / "in" / "a"
    folder.mkdir(parents=True)
    (folder / "part-0.csv").write_text("uid,item_id,timestamp\nu,i,1\n")
    proc = spark_submit("--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"))
    assert proc.returncode == 2, proc.stdout[-2000:]
    assert "missing column(s) user_id" in proc.stdout and "part-0.csv" in proc.stdout
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))
    help_text = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "build_sequences.py"), "--help"],
        capture_output=True,
        text=True,
        env=job_env(),
    )
    assert help_text.returncode == 0 and "--max-len" in help_text.stdout


def test_kill_mid_write_keeps_previous_output(spark, synth_logs: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    _build(spark, synth_logs, out, "max_len=30")
    before = _content(out)
    cmd = [
        str(Path(sys.executable).parent / "spark-submit"), "--master", "local[2]", "--conf", "spark.ui.enabled=false",
        str(REPO / "jobs" / "build_sequences.py"), "--input", str(synth_logs), "--output", str(out), "--max-len", "20",
    ]  # fmt: skip
    writing = False
    for _ in range(3):  # a job that finished between two polls is retried: we must kill it mid-write
        proc = subprocess.Popen(cmd, cwd=REPO, env=job_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and proc.poll() is None:
            if list(tmp_path.glob(".out.staging-*/*")):  # the new result is being written
                writing = True
                break
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if writing:
            break
        if _content(out) != before:  # it finished and published: start again from the max_len=30 result
            _build(spark, synth_logs, out, "max_len=30")
    assert writing, "the job never started writing"
    assert _content(out) == before  # the previous complete output is intact
    assert (out / "_SUCCESS").exists()
    # A re-run succeeds and replaces it.
    result = _build(spark, synth_logs, out, "max_len=20")
    assert result.manifest["config"]["max_len"] == 20


def test_restores_output_parked_by_a_crashed_swap(spark, tmp_path: Path) -> None:
    _write_csv(tmp_path / "in" / "a", [("u", f"i{k}", 1_600_000_000 + k) for k in range(5)])
    out = tmp_path / "out"
    _build(spark, tmp_path / "in", out)
    before = _content(out)
    out.rename(tmp_path / ".out.previous-deadbeef0000")  # a kill between the two renames of a swap
    from pipelines.fs import HadoopFS
    from pipelines.output import AtomicOutput

    AtomicOutput(HadoopFS(spark, str(out)), str(out)).prepare()
    assert _content(out) == before


def test_amazon5_real_data(spark, tmp_path: Path) -> None:
    logs = SHARED_DATA / "amazon5" / "logs"
    if not logs.exists():
        pytest.fail(f"real data not found at {logs}; set AUTOCDSR_SHARED_DATA to the shared data folder")
    out = tmp_path / "amazon5"
    result = _build(spark, logs, out, "timestamp_unit=s")
    frames = [pd.read_csv(f, dtype=str).assign(domain=f.parent.name) for f in sorted(logs.glob("*/*.csv"))]
    events = pd.concat(frames, ignore_index=True)
    events["ts"] = events["timestamp"].astype("int64") * 1000
    m = assert_matches_reference(out, events, sorted(events["domain"].unique()), max_len=800, min_len=3)
    c = result.manifest["counts"]
    assert c["input_rows"] == 16_123 and c["duplicates_dropped"] == 337 and c["users"] == 500
    assert [d["domain"] for d in m["domains"]] == [
        "Books",
        "Clothing_Shoes_and_Jewelry",
        "Sports_and_Outdoors",
        "Toys_and_Games",
        "Video_Games",
    ]
