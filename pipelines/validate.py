"""Parse raw string rows into typed events and tag each bad row with the reason it is rejected.

Nothing is dropped here: ``parse_events`` keeps every row and adds ``reject_reason`` (NULL for good rows),
so that input = kept + rejected + duplicates + short holds by construction downstream.
Spark 4 runs in ANSI mode, where a failed cast raises; every parse here is a ``try_*`` whose NULL
becomes a reason instead.
"""

from __future__ import annotations

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from pipelines.config import DataConfig

# Reasons in the order they are checked; a row gets the first that applies.
REASONS = (
    "malformed_record",
    "missing_user_id",
    "missing_item_id",
    "missing_domain",
    "invalid_encoding",
    "missing_timestamp",
    "unparseable_timestamp",
    "negative_timestamp",
    "early_timestamp",
    "future_timestamp",
    "unmapped_domain",
)
# Rows of raw domains the config drops on purpose are listed in rejected/ but are not data errors.
DELIBERATE_REASONS = frozenset({"unmapped_domain"})

REPLACEMENT_CHAR = "\ufffd"  # what a UTF-8 decoder puts in place of invalid bytes


def _blank(c: Column) -> Column:
    return c.isNull() | (F.length(c) == 0)


def parse_timestamp_ms(raw: Column, unit: str) -> Column:
    """Timestamp in epoch milliseconds (``ordinal``: the integer as is); NULL when it does not parse."""
    if unit == "iso":
        return F.unix_millis(F.try_to_timestamp(raw))
    # Decimal accepts "1700000000", "1700000000.5" and "1.7E9"; bigint alone would reject the latter two.
    num = raw.try_cast("decimal(38,6)")
    if unit == "s":
        # try_multiply: a number too large for decimal(38,6) once in ms is unparseable, not an ANSI overflow
        # error that would stop the job.
        num = F.try_multiply(num, F.lit(1000))
    return F.when(num.between(-(2**62), 2**62), F.floor(num).cast("long"))


def _bad_text(c: Column) -> Column:
    """Text that is not valid UTF-8: bytes a decoder replaced with U+FFFD (CSV, JSON), or left as they were
    (Parquet binary and string columns are not decoded)."""
    return F.contains(c, F.lit(REPLACEMENT_CHAR)) | ~F.is_valid_utf8(c)


def parse_events(raw: DataFrame, cfg: DataConfig, reference_ms: int) -> DataFrame:
    """Typed events with ``reject_reason``.

    Input: the columns of `pipelines.read.read_logs`. Output columns: ``user_id, item_id, domain, raw_domain,
    ts, timestamp_raw, source_file, malformed_record, reject_reason``. Ids are trimmed of surrounding
    whitespace. ``ts`` is epoch ms (or the ordinal for ``ordinal``).
    """
    user = F.trim(F.col("user_id"))
    item = F.trim(F.col("item_id"))
    ts_raw = F.trim(F.col("timestamp"))
    ts = parse_timestamp_ms(ts_raw, cfg.timestamp_unit)
    clock = cfg.timestamp_unit != "ordinal"  # ordinals are positions: never early, never future
    future_limit = reference_ms + cfg.max_future_s * 1000
    min_ms = cfg.min_timestamp_ms()
    checks: list[tuple[str, Column]] = [
        ("malformed_record", F.col("malformed_record").isNotNull()),
        ("missing_user_id", _blank(user)),
        ("missing_item_id", _blank(item)),
        ("missing_domain", _blank(F.trim(F.col("raw_domain")))),
        ("invalid_encoding", _bad_text(user) | _bad_text(item)),
        ("missing_timestamp", _blank(ts_raw)),
        ("unparseable_timestamp", ts.isNull()),
        ("negative_timestamp", ts < 0),
        ("early_timestamp", F.lit(clock and min_ms is not None) & (ts < F.lit(min_ms or 0))),
        ("future_timestamp", F.lit(clock) & (ts > F.lit(future_limit))),
        ("unmapped_domain", F.col("domain").isNull()),
    ]
    assert tuple(name for name, _ in checks) == REASONS
    reason: Column = F.lit(None).cast("string")
    for name, cond in reversed(checks):
        reason = F.when(cond, F.lit(name)).otherwise(reason)
    return raw.select(
        user.alias("user_id"),
        item.alias("item_id"),
        F.col("domain"),
        F.col("raw_domain"),
        ts.alias("ts"),
        F.col("timestamp").alias("timestamp_raw"),
        F.col("source_file"),
        F.col("malformed_record"),
        reason.alias("reject_reason"),
    )


def valid_events(parsed: DataFrame) -> DataFrame:
    """The good rows: ``user_id, item_id, domain, ts``."""
    return parsed.filter(F.col("reject_reason").isNull()).select("user_id", "item_id", "domain", "ts")


def rejected_rows(parsed: DataFrame) -> DataFrame:
    """The bad rows with their raw fields (bytes that are not UTF-8 replaced by U+FFFD, so that the table reads
    as text), where they came from, the reason, and the raw record of a ``malformed_record``."""
    return parsed.filter(F.col("reject_reason").isNotNull()).select(
        F.make_valid_utf8("user_id").alias("user_id"),
        F.make_valid_utf8("item_id").alias("item_id"),
        F.make_valid_utf8("timestamp_raw").alias("timestamp"),
        F.make_valid_utf8("raw_domain").alias("raw_domain"),
        "domain",
        "source_file",
        F.col("reject_reason").alias("reason"),
        "malformed_record",
    )
