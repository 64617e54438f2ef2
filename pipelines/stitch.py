"""Stitch per-domain events into per-user cross-domain histories and cut them into subsequences.

Order of a user's history (the tie rule, documented in docs/data-contract.md): ascending timestamp,
then domain name, then item id. It is a total order on deduplicated events, so two runs give the same
output whatever the partitioning.

Cutting: subsequences are cut from the newest end. The newest holds the last ``max_len`` events, the
next the ``max_len`` before them, and so on; only the oldest may be shorter, and it is dropped (and
counted) when shorter than ``min_len``. ``chunk`` numbers the kept subsequences from 0 = oldest.

Scale: the per-user order comes from a window sort, which Spark runs with an external (spilling) sorter
one user at a time, so a user with millions of events needs no more than that user's rows in a task;
arrays are only ever built per subsequence (at most ``max_len`` elements).
"""

from __future__ import annotations

from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

EVENT_KEY = ("user_id", "domain", "item_id", "ts")
HISTORY_ORDER = ("ts", "domain", "item_id")


def drop_exact_duplicates(events: DataFrame) -> DataFrame:
    """Drop rows equal in (user, domain, item, timestamp); they carry no information."""
    return events.dropDuplicates(list(EVENT_KEY))


def assign_chunks(events: DataFrame, max_len: int, min_len: int) -> DataFrame:
    """Add each event's place in its user's history and the subsequence it falls into.

    Adds ``pos`` (0 = oldest event of the user), ``chunk`` (0 = oldest kept subsequence; NULL for events
    of a dropped short subsequence) and ``kept`` (boolean).
    """
    by_user = Window.partitionBy("user_id").orderBy(*HISTORY_ORDER)
    whole_user = by_user.rowsBetween(Window.unboundedPreceding, Window.unboundedFollowing)
    n = F.count(F.lit(1)).over(whole_user)
    pos = F.row_number().over(by_user) - 1
    with_pos = events.withColumn("pos", pos).withColumn("_n", n)

    rev = F.col("_n") - 1 - F.col("pos")  # 0 = newest
    from_newest = F.floor(rev / max_len).cast("long")
    oldest_from_newest = F.floor((F.col("_n") - 1) / max_len).cast("long")
    chunk_size = F.least(F.lit(max_len).cast("long"), F.col("_n") - from_newest * max_len)
    remainder = F.col("_n") % max_len
    oldest_is_short = (remainder != 0) & (remainder < min_len)
    kept = chunk_size >= min_len
    raw_chunk = oldest_from_newest - from_newest  # 0 = oldest cut, whether kept or not
    chunk = F.when(kept, raw_chunk - F.when(oldest_is_short, 1).otherwise(0)).cast("int")
    return with_pos.withColumn("kept", kept).withColumn("chunk", chunk).drop("_n")


def sequence_id(user_id: str, chunk: int) -> str:
    """The Python twin of the ``sequence_id`` column: unique because ``chunk`` has no ':'."""
    return f"{user_id}:{chunk}"


def build_subsequences(kept_events: DataFrame) -> DataFrame:
    """One row per subsequence with its items in history order.

    Input: kept events with ``user_id, chunk, pos, item_idx, domain_idx, ts``.
    Output: ``sequence_id, user_id, chunk, item_idx: array<int>, domain_idx: array<smallint>,
    timestamp: array<bigint>``.
    """
    ev = F.struct(
        F.col("pos"),
        F.col("item_idx").cast("int").alias("item_idx"),
        F.col("domain_idx").cast("short").alias("domain_idx"),
        F.col("ts").cast("long").alias("ts"),
    )
    grouped = kept_events.groupBy("user_id", "chunk").agg(F.array_sort(F.collect_list(ev)).alias("ev"))
    return grouped.select(
        F.concat_ws(":", "user_id", F.col("chunk").cast("string")).alias("sequence_id"),
        "user_id",
        F.col("chunk").cast("int").alias("chunk"),
        F.col("ev.item_idx").alias("item_idx"),
        F.col("ev.domain_idx").alias("domain_idx"),
        F.col("ev.ts").alias("timestamp"),
    )
