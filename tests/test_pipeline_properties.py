"""Property-based tests: the pipeline's DataFrame transformations against the plain-Python reference
(tests/reference.py) on random small inputs.

Spark costs about a second per job, so each generated example is a *batch* of independent inputs, namespaced
(user ids and domain names carry the input's number) and run through one Spark pipeline; the results are
split back per input and compared with the reference one input at a time. Examples are derandomized, so a
run is reproducible in CI; a failure shrinks to a small batch that `@example` can pin.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from pipelines import split, stitch, validate, vocab
from pipelines.config import DataConfig
from tests import reference

SETTINGS = settings(
    max_examples=20,
    deadline=None,
    derandomize=True,
    print_blob=True,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
EVENT_SCHEMA = "user_id string, domain string, item_id string, ts long"
RAW_SCHEMA = (
    "user_id string, item_id string, timestamp string, raw_domain string, domain string, source_file string, "
    "malformed_record string"
)


# ------------------------------------------------------------------ stitching, cutting, numbering, splitting
@dataclass(frozen=True)
class Input:
    events: list[reference.Event]  # with duplicates, in no particular order
    domains: list[str]  # every domain of the input, possibly some without events


@st.composite
def one_input(draw: st.DrawFn, k: int) -> Input:
    """Input number k: a few users (one with ':' in its id), domains and items; timestamps from a small range,
    so that ties are common; some events repeated."""
    users = draw(st.lists(st.sampled_from(["u0", "u1", "a:b", "u 3"]), min_size=1, max_size=3, unique=True))
    domains = draw(st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=3, unique=True))
    empty = draw(st.booleans())  # a domain with no events still gets a domain_idx
    events = draw(
        st.lists(
            st.builds(
                reference.Event,
                user_id=st.sampled_from(users),
                domain=st.sampled_from(domains),
                item_id=st.sampled_from(["x0", "x1", "x2", "y"]),
                ts=st.integers(0, 3),
            ),
            min_size=4,
            max_size=25,
        )
    )
    repeated = draw(st.lists(st.sampled_from(events), max_size=6)) if events else []

    def tag(e: reference.Event) -> reference.Event:
        return reference.Event(f"e{k}|{e.user_id}", f"e{k:02d}_{e.domain}", e.item_id, e.ts)

    names = [f"e{k:02d}_{d}" for d in domains] + ([f"e{k:02d}_zz"] if empty else [])
    return Input([tag(e) for e in events + repeated], names)


@st.composite
def batches(draw: st.DrawFn) -> tuple[list[Input], int, int, int]:
    max_len = draw(st.integers(3, 7))
    min_len = draw(st.integers(3, max_len))
    n = draw(st.integers(2, 5))
    partitions = draw(st.integers(1, 4))
    return [draw(one_input(k)) for k in range(n)], max_len, min_len, partitions


def _run_pipeline(spark: SparkSession, inputs: list[Input], max_len: int, min_len: int, partitions: int):
    """The build's stages 3-6 on the union of the inputs, as `pipelines.build` wires them."""
    rows = [(e.user_id, e.domain, e.item_id, e.ts) for inp in inputs for e in inp.events]
    events = spark.createDataFrame(rows, EVENT_SCHEMA).repartition(partitions)
    chunked = stitch.assign_chunks(stitch.drop_exact_duplicates(events), max_len, min_len).persist()
    kept = chunked.filter(F.col("kept"))
    domain_idx = vocab.domain_index([d for inp in inputs for d in inp.domains])
    items = vocab.item_vocabulary(kept, vocab.domain_index_frame(spark, domain_idx)).persist()
    indexed = kept.join(items.select("domain", "item_id", "item_idx", "domain_idx"), ["domain", "item_id"])
    splits = split.leave_one_out(stitch.build_subsequences(indexed))
    by_user = {
        (r["user_id"], r["kept"]): r["n"]
        for r in chunked.groupBy("user_id", "kept").agg(F.count(F.lit(1)).alias("n")).collect()
    }
    result = {
        "items": {(r["domain"], r["item_id"]): r.asDict() for r in items.collect()},
        "by_user": by_user,
        **{name: {r["sequence_id"]: r.asDict() for r in df.collect()} for name, df in splits.items()},
    }
    chunked.unpersist()
    items.unpersist()
    return result, domain_idx


def _check_one(inp: Input, k: int, got: dict, domain_idx: dict[str, int], max_len: int, min_len: int) -> None:
    ref = reference.build(inp.events, inp.domains, max_len, min_len)
    prefix = f"e{k}|"
    # Domains: the input's names in sorted order, after those of the inputs before it.
    offset_d = min(domain_idx[d] for d in inp.domains) - 1
    assert {d: domain_idx[d] - offset_d for d in inp.domains} == ref.domain_idx
    # Items: the input's items occupy one contiguous block, numbered as the reference numbers them alone.
    mine = {key: v for key, v in got["items"].items() if key[0] in inp.domains}
    assert set(mine) == set(ref.items)
    offset_i = min((v["item_idx"] for v in mine.values()), default=1) - 1
    for key, want in ref.items.items():
        have = mine[key]
        assert (have["item_idx"] - offset_i, have["domain_idx"] - offset_d, have["count"]) == (
            want["item_idx"],
            want["domain_idx"],
            want["count"],
        ), key
    # Subsequences: the same ids, items, domains and timestamps in the same order; train/valid hold out the
    # last two / last one.
    test = {sid: r for sid, r in got["test"].items() if sid.startswith(prefix)}
    assert set(test) == set(ref.sequences)
    for sid, want in ref.sequences.items():
        row = test[sid]
        assert (row["user_id"], row["chunk"]) == (want["user_id"], want["chunk"]), sid
        assert [i - offset_i for i in row["item_idx"]] == want["item_idx"], sid
        assert [d - offset_d for d in row["domain_idx"]] == want["domain_idx"], sid
        assert row["timestamp"] == want["timestamp"], sid
        for name, cut in (("valid", 1), ("train", 2)):
            held = got[name][sid]
            for col in ("item_idx", "domain_idx", "timestamp"):
                assert held[col] == row[col][:-cut], (name, sid, col)
    # The ledger of this stage: input = kept + duplicates + short.
    users = {u for u, _ in got["by_user"] if u.startswith(prefix)}
    kept = sum(got["by_user"].get((u, True), 0) for u in users)
    short = sum(got["by_user"].get((u, False), 0) for u in users)
    assert (kept, short, len(inp.events) - kept - short) == (ref.kept, ref.short, ref.duplicates)


@SETTINGS
@given(batch=batches())
def test_stitching_matches_the_reference(spark, batch: tuple[list[Input], int, int, int]) -> None:
    inputs, max_len, min_len, partitions = batch
    got, domain_idx = _run_pipeline(spark, inputs, max_len, min_len, partitions)
    assert set(domain_idx) == {d for inp in inputs for d in inp.domains}
    for k, inp in enumerate(inputs):
        _check_one(inp, k, got, domain_idx, max_len, min_len)
    assert sum(len(inp.events) for inp in inputs) == sum(got["by_user"].values()) + sum(
        reference.build(inp.events, inp.domains, max_len, min_len).duplicates for inp in inputs
    )


# ------------------------------------------------------------------ validation and timestamp parsing
def _numbers() -> st.SearchStrategy[str]:
    """Number-like text: realistic epochs, every shape the grammar allows, and near misses."""
    digits = st.text("0123456789", min_size=0, max_size=36)
    shaped = st.builds(
        lambda sign, whole, frac, exp, pad: f"{pad}{sign}{whole}{frac}{exp}{pad[::-1]}",
        st.sampled_from(["", "+", "-"]),
        digits,
        st.one_of(st.just(""), st.builds(lambda d: "." + d, st.text("0123456789", max_size=9))),
        st.one_of(
            st.just(""),
            st.builds(lambda e, s, d: f"{e}{s}{d}", st.sampled_from("eE"), st.sampled_from(["", "+", "-"]), st.integers(0, 40)),
        ),
        st.sampled_from(["", " ", "\t", " \n"]),
    )  # fmt: skip
    long = st.integers(20, 40).flatmap(lambda n: st.text("0123456789", min_size=n, max_size=n))
    epochs = st.one_of(
        st.integers(-(10**4), 10**5), st.integers(10**8, 2 * 10**9), st.integers(10**11, 4 * 10**12)
    ).map(str)
    garbage = st.text("0123456789.eE+- x", max_size=8)
    return st.one_of(epochs, shaped, long, garbage, st.sampled_from(BOUNDARIES))


# Texts at the edges of the rules, in s and in ms: min_timestamp (1971-01-01 and 2001-09-09T01:46:40Z), the
# future limit (reference time 1_800_000_000 s, plus 0 or 86_400 s), +-2**62 ms, rounding to 6 decimals.
BOUNDARIES = [
    "31536000", "31535999", "31535999.9995", "31535999.9994", "1000000000", "999999999.999",
    "31536000000", "31535999999", "1000000000000", "999999999999",
    "1800000000", "1800000001", "1800086400", "1800086401", "1800000000000", "1800000000001",
    "1800086400000", "1800086400001", "4611686018427387904", "4611686018427387905", "4611686018427387.904",
    "4611686018427387.905", "-4611686018427387904", "-0.0000005", "0.0000004", "-0", "", "  ", "NaN", "1_000",
    "0x10", "Infinity", "9" * 31, "9" * 32 + ".9999995",
]  # fmt: skip


# Mostly good ids and domains, so that most rows reach the timestamp rules.
IDS = st.sampled_from(["u"] * 8 + ["v", " u ", "", "   ", "u\ufffd", None])
RAW_ROWS = st.fixed_dictionaries(
    {
        "user_id": IDS,
        "item_id": IDS,
        "timestamp": st.one_of(_numbers(), st.none()),
        "raw_domain": st.sampled_from(["a"] * 12 + ["dropped", " ", "", None]),
        "malformed_record": st.sampled_from([None] * 15 + ["u,i"]),
    }
)


@SETTINGS
@given(
    rows=st.lists(RAW_ROWS, min_size=30, max_size=80),
    unit=st.sampled_from(["s", "ms", "ordinal"]),
    min_timestamp=st.sampled_from([None, "1971-01-01T00:00:00Z", "2001-09-09T01:46:40Z"]),
    max_future_s=st.sampled_from([0, 86_400]),
)
def test_validation_matches_the_reference(
    spark, rows: list[dict], unit: str, min_timestamp: str | None, max_future_s: int
) -> None:
    reference_ms = 1_800_000_000_000
    cfg = DataConfig(timestamp_unit=unit, min_timestamp=min_timestamp, max_future_s=max_future_s)
    for r in rows:  # the config drops the raw domain "dropped"
        r["domain"] = None if r["raw_domain"] == "dropped" else r["raw_domain"]
    raw = spark.createDataFrame(
        [
            (r["user_id"], r["item_id"], r["timestamp"], r["raw_domain"], r["domain"], f"f{n}", r["malformed_record"])
            for n, r in enumerate(rows)
        ],
        RAW_SCHEMA,
    )  # fmt: skip
    parsed = validate.parse_events(raw, cfg, reference_ms)
    got = {r["source_file"]: (r["reject_reason"], r["ts"]) for r in parsed.collect()}
    for n, r in enumerate(rows):
        want_reason, want_ts = reference.reject_reason(
            r, unit, reference_ms, max_future_s, cfg.min_timestamp_ms()
        )
        reason, ts = got[f"f{n}"]
        assert (reason, ts) == (want_reason, want_ts), r  # ts is parsed for every row, whatever its reason
    # Every row is either valid or rejected with one reason: nothing is lost between the two tables.
    reasons = Counter(reason for reason, _ in got.values())
    assert validate.valid_events(parsed).count() == reasons[None]
    assert validate.rejected_rows(parsed).count() == len(rows) - reasons[None]
