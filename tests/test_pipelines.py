"""Unit tests of each DataFrame transformation in pipelines/, on tiny local DataFrames."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from pyspark.sql import functions as F

from pipelines import read, split, stitch, validate, vocab
from pipelines.config import ConfigError, DataConfig, load_config

REF_MS = 1_800_000_000_000  # 2027-01-15


# ---------------------------------------------------------------- config
def test_config_overrides_and_validation(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("timestamp_unit: ms\ncolumns:\n  user_id: uid\n")
    cfg = load_config(f, ["max_len=50", "columns.item_id=iid", "domain_map.a=alpha"])
    assert cfg.timestamp_unit == "ms" and cfg.max_len == 50
    assert cfg.columns.user_id == "uid" and cfg.columns.item_id == "iid"
    assert cfg.named_domain("a") == "alpha" and cfg.named_domain("b") == "b"
    with pytest.raises(ConfigError, match="unknown config key"):
        load_config(None, ["max_lenn=3"])
    with pytest.raises(ConfigError, match="min_len must be >= 3"):
        load_config(None, ["min_len=2"])
    with pytest.raises(ConfigError, match="timestamp_unit must be one of"):
        load_config(None, ["timestamp_unit=days"])
    with pytest.raises(ConfigError, match="not valid"):
        DataConfig(domain_map={"x": "bad/name"})
    with pytest.raises(ConfigError, match="max_len: expected an integer, got 'abc'"):
        load_config(None, ["max_len=abc"])
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) columns.userid"):
        load_config(None, ["columns.userid=x"])
    with pytest.raises(ConfigError, match="csv_multiline: expected true or false"):
        load_config(None, ["csv_multiline=3"])
    assert load_config(None, ["reference_time=null"]).reference_time is None
    assert DataConfig(other_domain="drop").named_domain("zzz") is None
    assert DataConfig(other_domain="other").named_domain("zzz") == "other"


# ---------------------------------------------------------------- read
def _write_domain(
    root: Path, domain: str, rows: list[tuple], fmt: str, cols=("user_id", "item_id", "timestamp")
):
    folder = root / domain
    folder.mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame(rows, columns=list(cols))
    if fmt == "csv":
        df.to_csv(folder / "part-0.csv", index=False)
    elif fmt == "parquet":
        df.to_parquet(folder / "part-0.parquet", index=False)
    else:
        df.to_json(folder / "part-0.jsonl", orient="records", lines=True)


def test_read_per_domain_mixed_formats(spark, tmp_path: Path) -> None:
    _write_domain(tmp_path, "a", [("u1", "i1", 10), ("u2", "i2", 20)], "csv")
    _write_domain(tmp_path, "b", [("u1", 7, 30)], "parquet")  # int item ids: read as strings
    _write_domain(tmp_path, "c", [("u3", "i9", 40)], "jsonl")
    (tmp_path / "d").mkdir()  # an empty domain folder
    df, report = read.read_logs(spark, str(tmp_path), DataConfig())
    rows = sorted((r.user_id, r.item_id, r.timestamp, r.domain) for r in df.collect())
    assert rows == [
        ("u1", "7", "30", "b"),
        ("u1", "i1", "10", "a"),
        ("u2", "i2", "20", "a"),
        ("u3", "i9", "40", "c"),
    ]
    assert report.empty_domains == ["d"]
    assert report.formats == {"a": "csv", "b": "parquet", "c": "json"}
    assert all(r.source_file.endswith(("part-0.csv", "part-0.parquet", "part-0.jsonl")) for r in df.collect())


def test_read_rejects_unknown_format_missing_column_and_stray_files(spark, tmp_path: Path) -> None:
    (tmp_path / "in1" / "a").mkdir(parents=True)
    (tmp_path / "in1" / "a" / "data.xlsx").write_text("x")
    with pytest.raises(read.InputError, match=r"cannot tell the format of .*data\.xlsx"):
        read.read_logs(spark, str(tmp_path / "in1"), DataConfig())

    _write_domain(tmp_path / "in2", "a", [("u1", "i1")], "csv", cols=("user_id", "item_id"))
    with pytest.raises(
        read.InputError, match=r"part-0\.csv.*missing column\(s\) timestamp; found user_id, item_id"
    ):
        read.read_logs(spark, str(tmp_path / "in2"), DataConfig())

    _write_domain(tmp_path / "in3", "a", [("u1", "i1", 1)], "csv")
    (tmp_path / "in3" / "loose.csv").write_text("user_id,item_id,timestamp\n")
    with pytest.raises(read.InputError, match=r"found file.*at top level"):
        read.read_logs(spark, str(tmp_path / "in3"), DataConfig())

    with pytest.raises(read.InputError, match="does not exist"):
        read.read_logs(spark, str(tmp_path / "nope"), DataConfig())
    (tmp_path / "in4").mkdir()
    with pytest.raises(read.InputError, match="no domain folders"):
        read.read_logs(spark, str(tmp_path / "in4"), DataConfig())


def test_read_single_table_with_domain_map(spark, tmp_path: Path) -> None:
    (tmp_path / "t").mkdir()
    pd.DataFrame(
        {"uid": ["u1", "u1", "u2"], "iid": ["x", "y", "z"], "when": [1, 2, 3], "cat": ["m9", "m4", "m1"]}
    ).to_parquet(tmp_path / "t" / "log.parquet")
    cfg = load_config(
        None,
        [
            "layout=single_table",
            "columns.user_id=uid",
            "columns.item_id=iid",
            "columns.timestamp=when",
            "columns.domain=cat",
            "domain_map.m9=type_a",
            "domain_map.m4=type_b",
            "other_domain=other",
        ],
    )
    df, _ = read.read_logs(spark, str(tmp_path / "t"), cfg)
    assert sorted((r.item_id, r.raw_domain, r.domain) for r in df.collect()) == [
        ("x", "m9", "type_a"),
        ("y", "m4", "type_b"),
        ("z", "m1", "other"),
    ]


# ---------------------------------------------------------------- validate
def _raw(spark, rows):
    """Rows as `read.read_logs` gives them; a domain of None stands for a raw domain the config drops."""
    return spark.createDataFrame(
        [(u, i, t, d if d is not None else "unlisted", d, "f.csv", None) for u, i, t, d in rows],
        "user_id string, item_id string, timestamp string, raw_domain string, domain string, source_file string, "
        "malformed_record string",
    )


@pytest.mark.parametrize(
    ("unit", "text", "expected_ms"),
    [
        ("s", "1700000000", 1_700_000_000_000),
        ("s", "1700000000.5", 1_700_000_000_500),
        ("s", "1.7E9", 1_700_000_000_000),
        ("ms", "1700000000123", 1_700_000_000_123),
        ("iso", "2023-11-14T22:13:20Z", 1_700_000_000_000),
        ("iso", "2023-11-15T00:13:20+02:00", 1_700_000_000_000),
        ("iso", "2023-11-14 22:13:20", 1_700_000_000_000),
        ("ordinal", "42", 42),
    ],
)
def test_timestamp_units(spark, unit: str, text: str, expected_ms: int) -> None:
    parsed = validate.parse_events(
        _raw(spark, [("u", "i", text, "a")]), DataConfig(timestamp_unit=unit), REF_MS
    )
    row = parsed.first()
    assert row.reject_reason is None and row.ts == expected_ms


def test_every_reject_reason(spark) -> None:
    rows = [
        (None, "i", "1", "a"),
        ("  ", "i", "1", "a"),
        ("u", "", "1", "a"),
        ("u\ufffd", "i", "1", "a"),
        ("u", "i", None, "a"),
        ("u", "i", "yesterday", "a"),
        ("u", "i", "-5", "a"),
        ("u", "i", str(REF_MS // 1000 + 2 * 86_400), "a"),  # two days after the reference time
        ("u", "i", "1600000000", None),
        (" u ", " i ", " 100000000 ", "a"),  # fine once trimmed
    ]
    parsed = validate.parse_events(_raw(spark, rows), DataConfig(timestamp_unit="s"), REF_MS).collect()
    reasons = [r.reject_reason for r in parsed]
    assert reasons == [
        "missing_user_id",
        "missing_user_id",
        "missing_item_id",
        "invalid_encoding",
        "missing_timestamp",
        "unparseable_timestamp",
        "negative_timestamp",
        "future_timestamp",
        "unmapped_domain",
        None,
    ]
    assert (parsed[-1].user_id, parsed[-1].item_id, parsed[-1].ts) == ("u", "i", 100_000_000_000)
    df = validate.parse_events(_raw(spark, rows), DataConfig(timestamp_unit="s"), REF_MS)
    assert validate.rejected_rows(df).count() == 9 and validate.valid_events(df).count() == 1
    assert set(validate.rejected_rows(df).columns) >= {"source_file", "reason", "timestamp", "raw_domain"}


def test_ordinal_timestamps_are_never_future(spark) -> None:
    parsed = validate.parse_events(
        _raw(spark, [("u", "i", str(10**15), "a")]), DataConfig(timestamp_unit="ordinal"), REF_MS
    )
    assert parsed.first().reject_reason is None


# ---------------------------------------------------------------- stitch
def _events(spark, rows):
    return spark.createDataFrame(rows, "user_id string, domain string, item_id string, ts long")


def test_drop_exact_duplicates(spark) -> None:
    ev = _events(spark, [("u", "a", "i", 1), ("u", "a", "i", 1), ("u", "b", "i", 1), ("u", "a", "i", 2)])
    assert stitch.drop_exact_duplicates(ev).count() == 3


def test_chunks_are_cut_from_the_newest_end(spark) -> None:
    # 8 events, max_len 3: chunks of sizes 2 | 3 | 3 from oldest; the oldest (2 < min_len 3) is dropped.
    ev = _events(spark, [("u", "a", f"i{k}", k) for k in range(8)] + [("v", "a", "x", 5), ("v", "a", "y", 6)])
    out = stitch.assign_chunks(ev, max_len=3, min_len=3).orderBy("user_id", "pos").collect()
    u = [(r.item_id, r.pos, r.chunk, r.kept) for r in out if r.user_id == "u"]
    assert u == [
        ("i0", 0, None, False),
        ("i1", 1, None, False),
        ("i2", 2, 0, True),
        ("i3", 3, 0, True),
        ("i4", 4, 0, True),
        ("i5", 5, 1, True),
        ("i6", 6, 1, True),
        ("i7", 7, 1, True),
    ]
    assert [r.kept for r in out if r.user_id == "v"] == [False, False]  # a whole user below min_len
    # An oldest chunk that is short but long enough is kept and numbered 0.
    kept = stitch.assign_chunks(ev.filter("user_id = 'u'"), max_len=3, min_len=2).filter("kept")
    assert sorted({r.chunk for r in kept.collect()}) == [0, 1, 2]


def test_ties_follow_the_documented_order(spark) -> None:
    # Same timestamp: domain name first, then item id; input order must not matter.
    rows = [("u", "b", "a1", 5), ("u", "a", "z9", 5), ("u", "a", "b2", 5), ("u", "a", "q", 1)]
    for order in (rows, rows[::-1]):
        out = stitch.assign_chunks(_events(spark, order).repartition(3), 10, 3).orderBy("pos").collect()
        assert [(r.domain, r.item_id) for r in out] == [("a", "q"), ("a", "b2"), ("a", "z9"), ("b", "a1")]


def test_build_subsequences_orders_by_position(spark) -> None:
    rows = [("u:x", 0, p, 10 + p, (p % 2) + 1, 100 * p) for p in (3, 0, 2, 1)]
    df = spark.createDataFrame(
        rows, "user_id string, chunk int, pos int, item_idx int, domain_idx short, ts long"
    )
    out = stitch.build_subsequences(df)
    row = out.first()
    assert row.sequence_id == "u:x:0" == stitch.sequence_id("u:x", 0)
    assert (
        row.item_idx == [10, 11, 12, 13]
        and row.domain_idx == [1, 2, 1, 2]
        and row.timestamp == [0, 100, 200, 300]
    )
    types = dict(out.dtypes)
    assert types == {
        "sequence_id": "string",
        "user_id": "string",
        "chunk": "int",
        "item_idx": "array<int>",
        "domain_idx": "array<smallint>",
        "timestamp": "array<bigint>",
    }


# ---------------------------------------------------------------- split
def test_leave_one_out(spark) -> None:
    df = spark.createDataFrame(
        [("s", "u", 0, [1, 2, 3, 4], [1, 1, 2, 2], [10, 20, 30, 40])],
        "sequence_id string, user_id string, chunk int, item_idx array<int>, domain_idx array<smallint>, "
        "timestamp array<bigint>",
    )
    out = {k: v.first() for k, v in split.leave_one_out(df).items()}
    assert out["test"].item_idx == [1, 2, 3, 4]
    assert out["valid"].item_idx == [1, 2, 3] and out["valid"].timestamp == [10, 20, 30]
    assert out["train"].item_idx == [1, 2] and out["train"].domain_idx == [1, 1]


SUBSEQUENCE_SCHEMA = (
    "sequence_id string, user_id string, chunk int, item_idx array<int>, domain_idx array<smallint>, "
    "timestamp array<bigint>"
)


def _subsequences(spark, spec: dict[str, list[int]]):
    """user -> lengths of their subsequences (chunk 0, 1, ...), items numbered so every row is distinct."""
    rows, item = [], 0
    for user, lengths in spec.items():
        for chunk, n in enumerate(lengths):
            items = list(range(item + 1, item + n + 1))
            item += n
            rows.append(
                (f"{user}:{chunk}", user, chunk, items, [1 + i % 2 for i in items], [10 * i for i in items])
            )
    return spark.createDataFrame(rows, SUBSEQUENCE_SCHEMA)


def _split_file(tmp_path: Path, lines: list[str], name: str = "split.csv") -> str:
    f = tmp_path / name
    f.write_text("user_id,split\n" + "".join(line + "\n" for line in lines))
    return str(f)


def test_by_sequence_puts_whole_subsequences_in_the_users_split(spark, tmp_path: Path) -> None:
    subs = _subsequences(spark, {"a": [4, 3], "b": [5], "c": [3, 6, 4], "d": [3]})
    # Ids are trimmed like the input's; "ghost" has no subsequence; names mapped by the default split_names.
    path = _split_file(
        tmp_path, [" a ,training", "b,evaluation", "c, testing", "d,training", "ghost,testing"]
    )
    assigned = split.assignments(read.read_split_file(spark, path), DataConfig().split_names, path)
    assert split.check_coverage(assigned, subs, path) == 1
    out = split.by_sequence(subs, assigned)
    full = {r.sequence_id: r for r in subs.collect()}
    got = {name: {r.sequence_id: r for r in df.collect()} for name, df in out.items()}
    assert {k: sorted(v) for k, v in got.items()} == {
        "train": ["a:0", "a:1", "d:0"],
        "valid": ["b:0"],
        "test": ["c:0", "c:1", "c:2"],
    }
    for rows in got.values():
        for sid, r in rows.items():
            assert r == full[sid]  # whole: every column as built, the last item is the target
    loo = split.leave_one_out(subs)
    for name in split.SPLITS:  # the same columns, in the same order, with the same types
        assert out[name].dtypes == loo[name].dtypes
    # Extra key columns (the build's _file) are carried like leave_one_out carries them.
    extra = subs.withColumn("_file", F.lit(0))
    assert split.by_sequence(extra, assigned)["test"].columns == split.leave_one_out(extra)["test"].columns


def test_split_file_errors_name_the_problem(spark, tmp_path: Path) -> None:
    names = DataConfig().split_names

    def check(lines: list[str]):
        path = _split_file(tmp_path, lines, name=f"s{len(list(tmp_path.iterdir()))}.csv")
        return path, split.assignments(read.read_split_file(spark, path), names, path)

    with pytest.raises(
        split.SplitFileError,
        match=r"s\d\.csv: 2 of 4 rows have a split value that is not in split_names \('evaluation', 'testing', "
        r"'training'\): None \(1 rows, e\.g\. user_id='c' split=None\), 'dev' \(1 rows, e\.g\. user_id='b'",
    ):
        check(["a,training", "b,dev", "c,", "d,testing"])
    with pytest.raises(
        split.SplitFileError,
        match=r"1 user_id\(s\) appear more than once.*user_id='a' in 2 rows \(split testing, training\)",
    ):
        check(["a,training", "b,testing", " a,testing"])
    with pytest.raises(split.SplitFileError, match=r"1 of 2 rows have no user_id, e\.g\. user_id=None"):
        check(["a,training", ",testing"])
    # Users with subsequences but no row: how many, and the first few.
    path, assigned = check(["a,training", "b,testing"])
    subs = _subsequences(spark, {u: [3] for u in ("a", "b", "x3", "x1", "x2", "x4", "x5", "x6", "x7")})
    with pytest.raises(
        split.SplitFileError,
        match=r"7 of the 9 users in the data are not in the file.*e\.g\. 'x1', 'x2', 'x3', 'x4', 'x5'$",
    ):
        split.check_coverage(assigned, subs, path)
    # The file itself: missing, or without the columns.
    with pytest.raises(read.InputError, match=r"split_file .*nope\.csv does not exist"):
        read.read_split_file(spark, str(tmp_path / "nope.csv"))
    bad = tmp_path / "cols.csv"
    bad.write_text("uid,split\na,training\n")
    with pytest.raises(read.InputError, match=r"cols\.csv: missing column\(s\) user_id; found uid, split"):
        read.read_split_file(spark, str(bad))
    # Other names for the file's values.
    path = _split_file(tmp_path, ["a,TR", "b,TE"], name="custom.csv")
    assigned = split.assignments(read.read_split_file(spark, path), {"TR": "train", "TE": "test"}, path)
    assert sorted((r.user_id, r.split) for r in assigned.collect()) == [("a", "train"), ("b", "test")]


def test_split_config_keys() -> None:
    assert DataConfig().split == "leave_one_out" and DataConfig().split_file is None
    cfg = load_config(None, ["split=by_sequence", "split_file=/data/split.csv"])
    assert cfg.split_names == {"training": "train", "evaluation": "valid", "testing": "test"}
    assert load_config(
        None, ["split=by_sequence", "split_file=s.csv", "split_names={a: train}"]
    ).split_names == {"a": "train"}
    with pytest.raises(ConfigError, match="split must be one of leave_one_out, by_sequence; got 'random'"):
        load_config(None, ["split=random"])
    with pytest.raises(ConfigError, match=r"split=by_sequence needs split_file.*--set split_file="):
        load_config(None, ["split=by_sequence"])
    with pytest.raises(ConfigError, match="split_file is only read with split=by_sequence"):
        load_config(None, ["split_file=/data/split.csv"])
    with pytest.raises(
        ConfigError, match=r"split_names\['dev'\] must be one of train, valid, test; got 'validation'"
    ):
        load_config(None, ["split=by_sequence", "split_file=s.csv", "split_names.dev=validation"])
    with pytest.raises(ConfigError, match="split_names must map"):
        load_config(None, ["split=by_sequence", "split_file=s.csv", "split_names={}"])
    json.dumps(cfg.to_dict())


# ---------------------------------------------------------------- vocab
def test_global_index_matches_a_sort_on_many_partitions(spark) -> None:
    df = spark.range(0, 5000, numPartitions=7).select(((F.col("id") * 7919) % 5000).alias("k"))
    out = vocab.with_global_index(df, (F.col("k").desc(),), "rank", start=1)
    got = sorted((r.k, r.rank) for r in out.collect())
    assert got == [(k, 5000 - k) for k in range(5000)]


def test_item_vocabulary_is_contiguous_per_domain_by_popularity(spark) -> None:
    ev = _events(
        spark,
        [
            ("u", "b", "x", 1),
            ("v", "b", "x", 1),
            ("u", "b", "y", 2),
            ("u", "a", "z", 3),
            ("u", "a", "w", 4),
            ("v", "a", "w", 9),
        ],
    )
    domains = vocab.domain_index_frame(spark, vocab.domain_index(["b", "a", "empty"]))
    items = vocab.item_vocabulary(ev, domains)
    got = [
        (r.item_idx, r.domain, r.item_id, r.domain_idx, r["count"])
        for r in items.orderBy("item_idx").collect()
    ]
    assert got == [(1, "a", "w", 1, 2), (2, "a", "z", 1, 1), (3, "b", "x", 2, 2), (4, "b", "y", 2, 1)]
    assert vocab.check_item_index(items) == 4
    with pytest.raises(vocab.VocabularyError):
        vocab.check_item_index(items.withColumn("item_idx", F.col("item_idx") * 2))


def test_domain_index_rejects_bad_names() -> None:
    assert vocab.domain_index(["z", "a"]) == {"a": 1, "z": 2}
    with pytest.raises(ConfigError, match="not valid"):
        vocab.domain_index(["ok", "../etc"])


def test_manifest_is_json_serialisable_config() -> None:
    json.dumps(DataConfig().to_dict())
