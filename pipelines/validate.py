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
    "missing_user_id",
    "missing_item_id",
    "invalid_encoding",
    "missing_timestamp",
    "unparseable_timestamp",
    "negative_timestamp",
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
        num = num * F.lit(1000)
    return F.when(num.between(-(2**62), 2**62), F.floor(num).cast("long"))


def parse_events(raw: DataFrame, cfg: DataConfig, reference_ms: int) -> DataFrame:
    """Typed events with ``reject_reason``.

    Output columns: ``user_id, item_id, domain, raw_domain, ts, timestamp_raw, source_file, reject_reason``.
    Ids are trimmed of surrounding whitespace. ``ts`` is epoch ms (or the ordinal for ``ordinal``).
    """
    user = F.trim(F.col("user_id"))
    item = F.trim(F.col("item_id"))
    ts_raw = F.trim(F.col("timestamp"))
    ts = parse_timestamp_ms(ts_raw, cfg.timestamp_unit)
    future_limit = reference_ms + cfg.max_future_s * 1000
    checks: list[tuple[str, Column]] = [
        ("missing_user_id", _blank(user)),
        ("missing_item_id", _blank(item)),
        (
            "invalid_encoding",
            F.contains(user, F.lit(REPLACEMENT_CHAR)) | F.contains(item, F.lit(REPLACEMENT_CHAR)),
        ),
        ("missing_timestamp", _blank(ts_raw)),
        ("unparseable_timestamp", ts.isNull()),
        ("negative_timestamp", ts < 0),
        ("future_timestamp", F.lit(cfg.timestamp_unit != "ordinal") & (ts > F.lit(future_limit))),
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
        reason.alias("reject_reason"),
    )


def valid_events(parsed: DataFrame) -> DataFrame:
    """The good rows: ``user_id, item_id, domain, ts``."""
    return parsed.filter(F.col("reject_reason").isNull()).select("user_id", "item_id", "domain", "ts")


def rejected_rows(parsed: DataFrame) -> DataFrame:
    """The bad rows with their raw fields, where they came from, and the reason."""
    return parsed.filter(F.col("reject_reason").isNotNull()).select(
        "user_id",
        "item_id",
        F.col("timestamp_raw").alias("timestamp"),
        "raw_domain",
        "domain",
        "source_file",
        F.col("reject_reason").alias("reason"),
    )
