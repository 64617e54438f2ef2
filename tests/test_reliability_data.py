"""Reliability of the sequence builder (docs/reliability.md): every kind of bad input gives a clear error that
names the file and the field, or is quarantined in rejected/ with counts; the ledger
input = kept + rejected + duplicates + short holds; nothing half-written is ever visible as a result; a job
killed at any moment leaves the previous result intact and a re-run succeeds.

Real Spark throughout: the pipeline in-process on the session's shared Spark, and `spark-submit` for the kill
tests. Cases already covered elsewhere are listed in docs/reliability.md, not repeated here.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from autocdsr.data.shards import open_dataset
from pipelines.build import BuildResult, RejectedRowsError, build_sequences
from pipelines.config import ConfigError, load_config
from pipelines.fs import HadoopFS
from pipelines.output import AtomicOutput, OutputError
from pipelines.read import InputError
from tests.conftest import REPO, job_env
from tests.test_build_sequences import assert_matches_reference, synth_events

HEADER = "user_id,item_id,timestamp\n"
T0 = 1_600_000_000  # 2020-09-13, epoch seconds
REFERENCE = "reference_time=2030-01-01T00:00:00Z"  # "future" measured from a fixed time: reproducible counts


def _good(users: int = 10, events: int = 8, prefix: str = "u", t0: int = T0) -> list[tuple[str, str, int]]:
    return [
        (f"{prefix}{u}", f"i{(u * 7 + k) % 11}", t0 + 60 * k) for u in range(users) for k in range(events)
    ]


def _csv_text(rows: list[tuple]) -> str:
    return HEADER + "".join(",".join(str(x) for x in r) + "\n" for r in rows)


def _write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        path.write_text(data)
    else:
        path.write_bytes(data)
    return path


def _parquet(path: Path, table: pa.Table | pd.DataFrame, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(table, pd.DataFrame):
        table = pa.Table.from_pandas(table, preserve_index=False)
    pq.write_table(table, path, **kwargs)
    return path


def _build(spark, inp: Path, out: Path, *overrides: str, force: bool = False) -> BuildResult:
    return build_sequences(spark, str(inp), str(out), load_config(None, [REFERENCE, *overrides]), force=force)


def _ledger(counts: dict) -> None:
    """input = kept + rejected + duplicates + short, and the per-reason counts add up."""
    assert counts["input_rows"] == (
        counts["interactions_kept"]
        + counts["rejected_rows"]
        + counts["duplicates_dropped"]
        + counts["interactions_in_short_subsequences"]
    ), counts
    assert counts["rejected_rows"] == sum(counts["rejected_by_reason"].values()), counts


def _nothing_written(out: Path) -> None:
    assert not out.exists(), f"{out} was created"
    assert not list(out.parent.glob(f".{out.name}.*")), "a staging folder was left behind"


def _rejected(out: Path) -> list[dict]:
    return pq.read_table(out / "rejected").to_pylist()


# ------------------------------------------------------------------ bad rows, quarantined with counts
def test_every_kind_of_bad_row_at_once_keeps_the_ledger(spark, tmp_path: Path) -> None:
    """Each reject reason from real files (CSV, JSON lines, Parquet), plus duplicates, a short user and a dropped
    domain, in one run: exact counts per reason, rejected/ agrees with the manifest row by row, the ledger holds."""
    inp = tmp_path / "in"
    good = _good()
    bad_csv = [
        ("", "i1", T0),  # missing_user_id
        ("u1", "   ", T0),  # missing_item_id
        ("u1", "i1", ""),  # missing_timestamp
        ("u1", "i1", "yesterday"),  # unparseable_timestamp
        ("u1", "i1", "9" * 31),  # unparseable_timestamp: too large once in ms (was an overflow error)
        ("u1", "i1", -5),  # negative_timestamp
        ("u1", "i1", 5),  # early_timestamp (before min_timestamp, 1971)
        ("u1", "i1", 2_000_000_000),  # future_timestamp (2033, after reference_time + 1 day)
    ]
    duplicates = [good[0], good[0], good[1]]
    short = [("shorty", "i1", T0), ("shorty", "i2", T0 + 1)]  # 2 events < min_len 3
    csv = _csv_text(good[:40] + bad_csv + duplicates + short) + "u2,i3\n"  # malformed_record: a field short
    latin1 = "caf\u00e9,i1,1600000000\n".encode("latin-1")  # invalid_encoding: not UTF-8
    _write(inp / "books" / "part-0.csv", csv.encode() + latin1)
    jsonl = "".join(
        json.dumps({"user_id": u, "item_id": i, "timestamp": t}) + "\n" for u, i, t in good[40:64]
    )
    _write(inp / "music" / "part-0.jsonl", jsonl + '{"user_id": "u3" "item_id": "i1"}\n')  # malformed_record
    users = [u.encode() for u, _, _ in good[64:]] + [b"u\xff\xfe"]  # invalid_encoding in a Parquet string
    _parquet(
        inp / "games" / "part-0.parquet",
        pa.table(
            {
                "user_id": pa.array(users, pa.binary()),
                "item_id": [i for _, i, _ in good[64:]] + ["i1"],
                "timestamp": [t for _, _, t in good[64:]] + [T0],
            }
        ),
    )
    _write(inp / "legacy" / "part-0.csv", _csv_text(_good(2, 3, prefix="old")))  # unmapped_domain: dropped
    out = tmp_path / "out"
    result = _build(
        spark, inp, out, "other_domain=drop", "domain_map.books=books", "domain_map.music=music",
        "domain_map.games=games", "max_rejected_fraction=0.5",
    )  # fmt: skip
    c = result.manifest["counts"]
    assert c["rejected_by_reason"] == {
        "early_timestamp": 1,
        "future_timestamp": 1,
        "invalid_encoding": 2,
        "malformed_record": 2,
        "missing_item_id": 1,
        "missing_timestamp": 1,
        "missing_user_id": 1,
        "negative_timestamp": 1,
        "unmapped_domain": 6,
        "unparseable_timestamp": 2,
    }
    assert c["input_rows"] == len(good) + len(bad_csv) + len(duplicates) + len(short) + 1 + 1 + 1 + 1 + 6
    assert c["duplicates_dropped"] == 3 and c["interactions_in_short_subsequences"] == 2
    assert c["interactions_kept"] == len(good) and c["users"] == 10
    _ledger(c)
    # rejected/ holds exactly the counted rows, readable as text (invalid bytes replaced by U+FFFD).
    rejected = _rejected(out)
    assert len(rejected) == c["rejected_rows"]
    by_reason: dict[str, list[dict]] = {}
    for r in rejected:
        by_reason.setdefault(r["reason"], []).append(r)
    assert {k: len(v) for k, v in by_reason.items()} == c["rejected_by_reason"]
    assert sorted(r["user_id"] for r in by_reason["invalid_encoding"]) == ["caf\ufffd", "u\ufffd\ufffd"]
    assert sorted(r["malformed_record"] for r in by_reason["malformed_record"]) == [
        "u2,i3",
        '{"user_id": "u3" "item_id": "i1"}',
    ]
    assert {r["source_file"].rsplit("/", 2)[-2] for r in by_reason["unmapped_domain"]} == {"legacy"}
    assert all(r["source_file"].endswith("books/part-0.csv") for r in by_reason["negative_timestamp"])


def test_csv_quotes_and_embedded_newlines(spark, tmp_path: Path) -> None:
    """Quoted commas and doubled quotes are read as values; a quoted line break splits the record unless
    csv_multiline=true, and the two halves are quarantined as malformed_record (never read as data)."""
    inp = tmp_path / "in"
    quoted = (
        '"q1","item, with comma",1600000000\n"q1","item ""quoted""",1600000001\n"q1","two\nlines",1600000002\n'
        '"q1","plain",1600000003\n'
    )
    _write(inp / "a" / "part-0.csv", _csv_text(_good()) + quoted)
    out = tmp_path / "out"
    c = _build(spark, inp, out, "max_rejected_fraction=0.05").manifest["counts"]
    # Read line by line: the record with a line break is two malformed rows, input counts what Spark saw.
    assert c["rejected_by_reason"] == {"malformed_record": 2} and c["input_rows"] == 80 + 5
    _ledger(c)
    assert sorted(r["malformed_record"] for r in _rejected(out)) == ['"q1","two', 'lines",1600000002']
    items = set(pq.read_table(out / "items").column("item_id").to_pylist())
    assert {"item, with comma", 'item "quoted"', "plain"} <= items

    # Above the threshold the error names the reason, the file, the raw record and the fix.
    with pytest.raises(RejectedRowsError) as err:
        _build(spark, inp, tmp_path / "strict")
    text = str(err.value)
    assert "malformed_record: 2 rows" in text and 'a/part-0.csv: \'"q1","two\'' in text
    assert "csv_multiline=true" in text
    _nothing_written(tmp_path / "strict")

    # With csv_multiline the record is one row holding the line break.
    out2 = tmp_path / "multiline"
    c2 = _build(spark, inp, out2, "csv_multiline=true").manifest["counts"]
    assert c2["input_rows"] == c2["interactions_kept"] == 84 and c2["rejected_rows"] == 0
    assert "two\nlines" in set(pq.read_table(out2 / "items").column("item_id").to_pylist())


def test_mixed_timestamp_units_are_quarantined(spark, tmp_path: Path) -> None:
    """Seconds among milliseconds land in January 1970 (early_timestamp); milliseconds among seconds lie
    centuries ahead (future_timestamp); min_timestamp=null turns the lower bound off."""
    in_ms = tmp_path / "in_ms"
    ms_rows = [(u, i, t * 1000) for u, i, t in _good()] + [("u1", "i1", T0), ("u2", "i2", 0)]
    _write(in_ms / "a" / "part-0.csv", _csv_text(ms_rows))
    c = _build(spark, in_ms, tmp_path / "o1", "timestamp_unit=ms", "max_rejected_fraction=0.05").manifest[
        "counts"
    ]
    assert c["rejected_by_reason"] == {"early_timestamp": 2} and c["interactions_kept"] == 80
    _ledger(c)
    c = _build(
        spark, in_ms, tmp_path / "o2", "timestamp_unit=ms", "min_timestamp=null", "max_rejected_fraction=0.05"
    ).manifest["counts"]
    assert c["rejected_rows"] == 0 and c["interactions_kept"] == 82

    in_s = tmp_path / "in_s"
    _write(in_s / "a" / "part-0.csv", _csv_text([*_good(), ("u1", "i1", T0 * 1000)]))
    c = _build(spark, in_s, tmp_path / "o3", "max_rejected_fraction=0.05").manifest["counts"]
    assert c["rejected_by_reason"] == {"future_timestamp": 1} and c["interactions_kept"] == 80
    _ledger(c)


def test_single_table_missing_and_invalid_domains(spark, tmp_path: Path) -> None:
    """layout=single_table: a row without a domain is a data error (missing_domain, counted against the limit),
    not a deliberately dropped domain; a domain value that is not a valid name fails naming file and column."""
    table = tmp_path / "t"
    rows = [(u, i, t, "books") for u, i, t in _good()] + [("u1", "i1", T0, None), ("u1", "i2", T0, " ")]
    _parquet(table / "log.parquet", pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp", "domain"]))
    # Even with other_domain set, blank domains are not merged into it.
    cfg = ["layout=single_table", "other_domain=other", "max_rejected_fraction=0.05"]
    c = _build(spark, table, tmp_path / "out", *cfg).manifest["counts"]
    assert c["rejected_by_reason"] == {"missing_domain": 2} and c["interactions_kept"] == 80
    _ledger(c)
    with pytest.raises(RejectedRowsError, match=r"missing_domain: 2 rows"):
        _build(spark, table, tmp_path / "strict", "layout=single_table")
    _nothing_written(tmp_path / "strict")

    bad = tmp_path / "bad"
    rows = [(u, i, t, "books") for u, i, t in _good()] + [("u1", "i1", T0, "../etc")]
    _parquet(bad / "log.parquet", pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp", "domain"]))
    with pytest.raises(
        ConfigError, match=r"bad/log\.parquet: column 'domain' .*domain name '\.\./etc' is not valid"
    ):
        _build(spark, bad, tmp_path / "o2", "layout=single_table")
    _nothing_written(tmp_path / "o2")


# ------------------------------------------------------------------ bad files and schemas: clear errors
def test_extra_columns_are_ignored_in_every_format(spark, tmp_path: Path) -> None:
    """Extra columns, including a repeated header name and a column named like Spark's hidden _metadata."""
    inp = tmp_path / "in"
    good = _good()
    _write(
        inp / "a" / "part-0.csv",
        "note,user_id,rating,item_id,timestamp,rating\n"
        + "".join(f'"x, y",{u},4.5,{i},{t},1\n' for u, i, t in good[:30]),
    )
    frame = pd.DataFrame(good[30:60], columns=["user_id", "item_id", "timestamp"])
    _parquet(inp / "b" / "part-0.parquet", frame.assign(_metadata="mine", score=1.5))
    _write(
        inp / "c" / "part-0.jsonl",
        "".join(json.dumps({"extra": [1, {"k": 2}], "user_id": u, "item_id": i, "timestamp": t}) + "\n" for u, i, t in good[60:]),
    )  # fmt: skip
    out = tmp_path / "out"
    m = _build(spark, inp, out).manifest
    c = m["counts"]
    assert c["input_rows"] == c["interactions_kept"] == 80 and c["rejected_rows"] == 0
    _ledger(c)
    items = pq.read_table(out / "items").to_pylist()
    assert {r["item_id"] for r in items} == {i for _, i, _ in good}  # the right column, in every format
    assert [d["interactions"] for d in m["domains"]] == [30, 30, 20]


def test_wrong_column_types_in_parquet(spark, tmp_path: Path) -> None:
    # Numbers where text is expected and text where numbers are: read as their text.
    ok = tmp_path / "ok"
    rows = [(u, k, str(t)) for k, (u, _, t) in enumerate(_good())]
    _parquet(ok / "a" / "part-0.parquet", pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]))
    c = _build(spark, ok, tmp_path / "o_ok").manifest["counts"]
    assert c["interactions_kept"] == 80 and c["rejected_rows"] == 0
    assert "79" in set(pq.read_table(tmp_path / "o_ok" / "items").column("item_id").to_pylist())

    # Files of one folder whose column types differ: found when the data is read; the error names the file and
    # the column, and nothing is written.
    mixed = tmp_path / "mixed"
    good = _good()
    _parquet(mixed / "a" / "p0.parquet", pd.DataFrame(good[:40], columns=["user_id", "item_id", "timestamp"]))
    text_ts = [(u, i, str(t)) for u, i, t in good[40:]]
    _parquet(mixed / "a" / "p1.parquet", pd.DataFrame(text_ts, columns=["user_id", "item_id", "timestamp"]))
    with pytest.raises(
        InputError, match=r"p1\.parquet\. Data type mismatches when reading Parquet column \[timestamp\]"
    ):
        _build(spark, mixed, tmp_path / "o_mixed")
    _nothing_written(tmp_path / "o_mixed")

    # A time-typed column: clear errors until timestamp_unit=iso, then read exactly.
    times = tmp_path / "times"
    ts = pa.array([t * 1000 for _, _, t in good], pa.timestamp("ms", tz="UTC"))
    table = pa.table(
        {"user_id": [u for u, _, _ in good], "item_id": [i for _, i, _ in good], "timestamp": ts}
    )
    _parquet(times / "a" / "part-0.parquet", table)
    with pytest.raises(
        InputError, match=r"part-0\.parquet: column timestamp has type timestamp.*timestamp_unit=iso"
    ):
        _build(spark, times, tmp_path / "o_times")
    _nothing_written(tmp_path / "o_times")
    out = tmp_path / "o_iso"
    _build(spark, times, out, "timestamp_unit=iso")
    got = sorted(t for row in pq.read_table(out / "test").column("timestamp").to_pylist() for t in row)
    assert got == sorted(t * 1000 for _, _, t in good)
    # Numbers with timestamp_unit=iso, and pandas' default nanosecond timestamps, which Spark cannot read.
    with pytest.raises(InputError, match=r"column timestamp has type bigint, but timestamp_unit=iso"):
        _build(spark, tmp_path / "mixed", tmp_path / "o_num", "timestamp_unit=iso")
    nanos = tmp_path / "nanos"
    frame = pd.DataFrame(good, columns=["user_id", "item_id", "timestamp"])
    frame["timestamp"] = pd.to_datetime(frame["timestamp"], unit="s", utc=True)
    _parquet(nanos / "a" / "part-0.parquet", frame)
    with pytest.raises(
        InputError, match=r"nanos/a/part-0\.parquet: cannot read the input: .*NANOS.*coerce_timestamps"
    ):
        _build(spark, nanos, tmp_path / "o_nanos", "timestamp_unit=iso")
    _nothing_written(tmp_path / "o_nanos")


def test_csv_files_of_a_folder_must_share_the_header(spark, tmp_path: Path) -> None:
    """Spark reads CSV columns by position: a second file with its columns in another order used to swap users
    and items silently. Every file's header is now checked against the folder's first."""
    good = _good()
    swapped = tmp_path / "swapped"
    _write(swapped / "a" / "p0.csv", _csv_text(good[:40]))
    _write(
        swapped / "a" / "p1.csv",
        "item_id,user_id,timestamp\n" + "".join(f"{i},{u},{t}\n" for u, i, t in good[40:]),
    )
    with pytest.raises(
        InputError, match=r"(?s)p1\.csv\. CSV header does not conform.*Expected: user_id but found: item_id"
    ):
        _build(spark, swapped, tmp_path / "o1")
    _nothing_written(tmp_path / "o1")
    short = tmp_path / "short"
    _write(short / "a" / "p0.csv", _csv_text(good[:40]))
    _write(short / "a" / "p1.csv", "user_id,timestamp\n" + "".join(f"{u},{t}\n" for u, _, t in good[40:]))
    with pytest.raises(InputError, match=r"p1\.csv\. Number of column in CSV header is not equal"):
        _build(spark, short, tmp_path / "o2")
    # A header that names a column twice (ignoring case) is reported with how Spark renamed it.
    dup = tmp_path / "dup"
    _write(
        dup / "a" / "p.csv",
        "user_id,item_id,timestamp,User_ID\n" + "".join(f"{u},{i},{t},x\n" for u, i, t in good),
    )
    with pytest.raises(
        InputError, match=r"missing column\(s\) user_id; found user_id0, .*Spark appends a column's position"
    ):
        _build(spark, dup, tmp_path / "o3")
    _nothing_written(tmp_path / "o3")


def test_corrupted_files_fail_naming_the_file_and_keep_the_previous_output(spark, tmp_path: Path) -> None:
    inp = tmp_path / "in"
    good = _good()
    _parquet(inp / "a" / "p0.parquet", pd.DataFrame(good[:40], columns=["user_id", "item_id", "timestamp"]))
    p1 = _parquet(
        inp / "a" / "p1.parquet", pd.DataFrame(good[40:], columns=["user_id", "item_id", "timestamp"])
    )
    out = tmp_path / "out"
    _build(spark, inp, out)
    before = _files(out)

    whole = p1.read_bytes()
    p1.write_bytes(whole[: len(whole) // 2])  # truncated: found when the data is read
    with pytest.raises(InputError, match=r"cannot read the input: .*a/p1\.parquet.*is not a Parquet file"):
        _build(spark, inp, out)
    assert _files(out) == before and not list(tmp_path.glob(".out.*"))
    (inp / "a" / "p0.parquet").rename(inp / "a" / "p2.parquet")  # now the truncated file is read first
    with pytest.raises(InputError, match=r"a/p1\.parquet.*Could not read footer"):
        _build(spark, inp, out)
    assert _files(out) == before and not list(tmp_path.glob(".out.*"))

    gz = tmp_path / "gz"
    packed = gzip.compress(_csv_text(good).encode())
    _write(gz / "a" / "part-0.csv.gz", packed[: len(packed) // 2])
    with pytest.raises(InputError, match=r"a/part-0\.csv\.gz\. Unexpected end of input stream"):
        _build(spark, gz, out)
    assert _files(out) == before


def test_empty_inputs_fail_clearly(spark, tmp_path: Path) -> None:
    (tmp_path / "no_files" / "a").mkdir(parents=True)
    (tmp_path / "no_files" / "b").mkdir()
    with pytest.raises(InputError, match=r"no_files: every domain folder is empty"):
        _build(spark, tmp_path / "no_files", tmp_path / "o1")
    _write(tmp_path / "zero" / "a" / "part-0.csv", b"")
    with pytest.raises(
        InputError,
        match=r"zero/a/part-0\.csv: missing column\(s\) user_id, item_id, timestamp; found none \(empty file\?\)",
    ):
        _build(spark, tmp_path / "zero", tmp_path / "o2")
    _write(tmp_path / "header" / "a" / "part-0.csv", HEADER)
    empty = pa.table(
        {
            "user_id": pa.array([], pa.string()),
            "item_id": pa.array([], pa.string()),
            "timestamp": pa.array([], pa.int64()),
        }
    )
    _parquet(tmp_path / "header" / "b" / "part-0.parquet", empty)
    with pytest.raises(InputError, match=r"no interactions left after validation .*\(0 input rows"):
        _build(spark, tmp_path / "header", tmp_path / "o3")
    for name in ("o1", "o2", "o3"):
        _nothing_written(tmp_path / name)
    # An empty file next to good ones is no problem.
    _write(tmp_path / "some" / "a" / "part-0.csv", b"")
    _write(tmp_path / "some" / "a" / "part-1.csv", _csv_text(_good()))
    c = _build(spark, tmp_path / "some", tmp_path / "o4").manifest["counts"]
    assert c["input_rows"] == c["interactions_kept"] == 80


def test_bad_domain_folder_names_and_output_paths(spark, tmp_path: Path) -> None:
    inp = tmp_path / "in"
    _write(inp / "my books" / "part-0.csv", _csv_text(_good()))
    with pytest.raises(
        ConfigError, match=r"input folder .*/in/my books: domain name 'my books' is not valid.*domain_map"
    ):
        _build(spark, inp, tmp_path / "o1")
    _nothing_written(tmp_path / "o1")
    out = tmp_path / "o2"
    assert _build(spark, inp, out, "domain_map.my books=books").manifest["domains"][0]["domain"] == "books"

    # The output may not be the input, lie inside it (however the path is spelled), or contain it.
    for bad in (str(inp), f"{inp}/my books/../x", f"{inp}/"):
        with pytest.raises(OutputError, match=r"lies inside the input"):
            build_sequences(spark, f"{inp}/", bad, load_config(None))
    with pytest.raises(OutputError, match=r"input .* lies inside the output"):
        _build(spark, inp, tmp_path)
    assert sorted(p.name for p in inp.iterdir()) == ["my books"]
    # A previous result is replaced (and only that: see test_empty_domain_folder_and_output_rules).
    before = (out / "manifest.json").read_text()
    _build(spark, inp, out, "domain_map.my books=books", "max_len=5")
    after = json.loads((out / "manifest.json").read_text())
    assert (out / "manifest.json").read_text() != before and after["config"]["max_len"] == 5
    assert not list(tmp_path.glob(".o2.*"))


# ------------------------------------------------------------------ kill -9 at random moments
def _files(folder: Path) -> dict[str, tuple[int, str]]:
    """Every file under ``folder``: relative path -> (size, sha256)."""
    return {
        str(p.relative_to(folder)): (p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _assert_complete(folder: Path) -> dict:
    """A folder holding _SUCCESS holds everything its manifest promises (what readers rely on)."""
    info = open_dataset(str(folder))  # the reader's own checks: _SUCCESS, schema version, items 1..N
    m = info.manifest
    for split, rows in m["split"]["rows"].items():
        assert pq.read_table(folder / split).num_rows == rows, (folder, split)
    assert pq.read_table(folder / "rejected").num_rows == m["counts"]["rejected_rows"]
    _ledger(m["counts"])
    return m


def _job(inp: Path, out: Path, *args: str) -> list[str]:
    return [
        str(Path(sys.executable).parent / "spark-submit"), "--master", "local[2]", "--conf", "spark.ui.enabled=false",
        "--driver-java-options", f"-Dlog4j2.configurationFile={REPO / 'conf/spark/log4j2.properties'}",
        str(REPO / "jobs" / "build_sequences.py"), "--input", str(inp), "--output", str(out), *args,
    ]  # fmt: skip


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # every process of the job is gone: nothing can still write
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    raise AssertionError(f"processes of job {proc.pid} survived SIGKILL")


def _watch(
    proc: subprocess.Popen,
    parent: Path,
    started: float,
    old: set[Path],
    stop_at: float | None = None,
    after_writing: float | None = None,
) -> float | None:
    """Poll the job until it ends, ``stop_at`` seconds after ``started``, or ``after_writing`` seconds after it
    began writing (the first file in a staging folder not in ``old``); return when it began writing, or None."""
    began = None
    while proc.poll() is None:
        now = time.monotonic() - started
        if began is None:
            with contextlib.suppress(FileNotFoundError):
                if any(any(d.iterdir()) for d in parent.glob(".out.staging-*") if d not in old):
                    began = now
        if stop_at is not None and now >= stop_at:
            break
        if after_writing is not None and began is not None and now >= began + after_writing:
            break
        time.sleep(0.02)
    return began


def test_sigkill_at_random_moments_keeps_the_previous_output(
    spark, synth_logs: Path, synth_frame, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """SIGKILL the whole spark-submit process group at seeded-random moments spread over the job's phases
    (start-up and reading, the build, writing and commit): the previous result stays byte-identical, no folder
    that looks complete (_SUCCESS) holds partial data, and a re-run then succeeds with the right content."""
    out = tmp_path / "out"
    log = tmp_path / "first.log"
    with log.open("w") as sink:
        old = set(tmp_path.glob(".out.staging-*"))
        started = time.monotonic()
        first = subprocess.Popen(
            _job(synth_logs, out, "--max-len", "30"), cwd=REPO, env=job_env(), stdout=sink,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        writing = _watch(first, tmp_path, started, old)  # measure the phases
        duration = time.monotonic() - started
    assert first.returncode == 0, log.read_text()[-3000:]
    assert writing is not None and 0 < writing < duration
    before = _files(out)
    assert _assert_complete(out)["config"]["max_len"] == 30

    # One moment in each phase, as fractions of the phases' lengths: (of the time before writing began, of the
    # writing). The lengths are those of the last run that finished: when load on the machine changes and a run
    # ends before its moment, its own phases become the estimate and the same fraction is tried again.
    rng = random.Random(20261129)
    fractions = [(rng.uniform(0.05, 0.5), None), (rng.uniform(0.5, 1.0), None), (None, rng.uniform(0.0, 0.9))]
    killed_while_running = 0
    for before_writing, of_writing in fractions:
        for _attempt in range(3):
            stop_at = None if before_writing is None else before_writing * writing
            after_writing = None if of_writing is None else of_writing * (duration - writing)
            old = set(tmp_path.glob(".out.staging-*"))
            started = time.monotonic()
            proc = subprocess.Popen(
                _job(synth_logs, out, "--max-len", "20"), cwd=REPO, env=job_env(),
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
            began = _watch(proc, tmp_path, started, old, stop_at, after_writing)
            ended = time.monotonic() - started
            running = proc.poll() is None
            _kill_group(proc)
            if running:
                # killed between the two renames of the swap: the previous result is parked
                if not out.exists():
                    (parked,) = tmp_path.glob(".out.previous-*")
                    assert _files(parked) == before
                    restore = AtomicOutput(HadoopFS(spark, str(out)), str(out))
                    restore.prepare()  # what the next run does first
                    restore.abort()
                assert _files(out) == before, (
                    f"previous output changed by a job killed at {stop_at=}, {after_writing=}"
                )
            else:  # the job finished before its moment came: its result is complete, and the new baseline
                assert proc.returncode == 0
                assert _assert_complete(out)["config"]["max_len"] == 20
                before = _files(out)
                assert began is not None
                writing, duration = began, ended  # this run's phases: the new estimate
            looks_complete = [p.parent for p in tmp_path.rglob("_SUCCESS")]
            assert out in looks_complete
            for folder in looks_complete:
                _assert_complete(folder)
            assert not list(tmp_path.glob(".out.previous-*")), "a parked previous result was left"
            if running:
                killed_while_running += 1
                break
    assert killed_while_running == len(fractions), (
        f"the job finished before its moment three times running ({fractions=}, {writing=:.1f}s, {duration=:.1f}s)"
    )

    # A re-run (in-process: the first run showed the command line) succeeds over the leftovers of the killed
    # runs and publishes the right result. Their staging folders stay (one might belong to a run still writing
    # elsewhere); the job names them as safe to delete.
    leftovers = sorted(tmp_path.glob(".out.staging-*"))
    with caplog.at_level(logging.WARNING, logger="pipelines.output"):
        build_sequences(spark, str(synth_logs), str(out), load_config(None, ["max_len=20"]))
    for folder in leftovers:
        assert folder.name in caplog.text, "a leftover staging folder was not reported"
        shutil.rmtree(folder)
    domains = sorted(synth_frame["domain"].unique())
    manifest = assert_matches_reference(out, synth_events(synth_frame), domains, max_len=20, min_len=3)
    assert manifest["config"]["max_len"] == 20
    for folder in [p.parent for p in tmp_path.rglob("_SUCCESS")]:
        assert folder == out
