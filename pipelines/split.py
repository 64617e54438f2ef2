"""Train / valid / test splits of whole subsequences, by one of two protocols (``split`` in the config).

``leave_one_out``: ``test`` rows hold the whole subsequence (last item = test target), ``valid`` rows drop the
last item (last = validation target), ``train`` rows drop the last two. Every subsequence appears in all three,
so a model trained on ``train`` never sees either target.

``by_sequence``: a split file assigns each user to one split, and every subsequence of the user goes whole to
that split (``valid``/``test`` rows: the last item is the target, the items before it the history). The
splits then hold different sequence_ids. `assignments` and `check_coverage` check the file against the
config and the data before anything is written.
"""

from __future__ import annotations

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from pipelines.read import InputError

SEQUENCE_COLUMNS = ("item_idx", "domain_idx", "timestamp")
SPLITS = ("train", "valid", "test")
EXAMPLES = 5


class SplitFileError(InputError):
    """The split file does not fit the config or the data; the message names the file, the problem, how many
    rows or users it concerns and examples. Nothing was written."""


def _drop_last(col: str, k: int) -> Column:
    return F.slice(F.col(col), 1, F.size(F.col(col)) - k).alias(col)


def _output_columns(subsequences: DataFrame) -> list[str]:
    keys = [c for c in subsequences.columns if c not in SEQUENCE_COLUMNS]
    return [*keys, *SEQUENCE_COLUMNS]


def leave_one_out(subsequences: DataFrame) -> dict[str, DataFrame]:
    """Map split name -> DataFrame with the same columns as ``subsequences``."""
    keys = [c for c in subsequences.columns if c not in SEQUENCE_COLUMNS]
    out = {}
    for split, k in (("test", 0), ("valid", 1), ("train", 2)):
        out[split] = subsequences.select(*keys, *(_drop_last(c, k) for c in SEQUENCE_COLUMNS))
    return out


def by_sequence(subsequences: DataFrame, assignments: DataFrame) -> dict[str, DataFrame]:
    """Map split name -> the whole subsequences of the users that ``assignments`` (``user_id, split``, one row
    per user, split in SPLITS; see `assignments`) puts in that split, with the columns of `leave_one_out`.

    A user missing from ``assignments`` would lose their subsequences: run `check_coverage` first."""
    tagged = subsequences.join(
        assignments.select("user_id", F.col("split").alias("_split")), "user_id", "inner"
    )
    columns = _output_columns(subsequences)
    return {name: tagged.filter(F.col("_split") == name).select(*columns) for name in SPLITS}


def _row(r) -> str:
    return f"user_id={r['user_id']!r} split={r['split']!r}"


def assignments(rows: DataFrame, split_names: dict[str, str], source: str) -> DataFrame:
    """The split file's rows (``user_id, split`` strings, as `pipelines.read.read_split_file` reads them) ->
    ``user_id, split`` with our split names (``split_names`` maps the file's values to them).

    Raises SplitFileError, naming ``source``, the count and example rows, if a row has no user_id, if a split
    value is not a key of ``split_names``, or if a user_id appears more than once."""
    known = sorted(split_names)
    blank = F.col("user_id").isNull() | (F.col("user_id") == "")
    unknown = F.col("split").isNull() | ~F.col("split").isin(known)
    stats = rows.agg(
        F.count(F.lit(1)).alias("rows"),
        F.count(F.when(blank, 1)).alias("blank"),
        F.count(F.when(unknown, 1)).alias("unknown"),
        F.countDistinct("user_id").alias("users"),
    ).first()
    if stats["blank"]:
        ex = rows.filter(blank).limit(EXAMPLES).collect()
        raise SplitFileError(
            f"split_file {source}: {stats['blank']} of {stats['rows']} rows have no user_id, e.g. "
            + "; ".join(_row(r) for r in ex)
        )
    if stats["unknown"]:
        values = (
            rows.filter(unknown)
            .groupBy("split")
            .agg(F.count(F.lit(1)).alias("n"), F.min("user_id").alias("user_id"))
            .orderBy(F.desc("n"), F.asc_nulls_first("split"))
            .limit(EXAMPLES)
            .collect()
        )
        found = ", ".join(f"{v['split']!r} ({v['n']} rows, e.g. {_row(v)})" for v in values)
        raise SplitFileError(
            f"split_file {source}: {stats['unknown']} of {stats['rows']} rows have a split value that is not in "
            f"split_names ({', '.join(map(repr, known))}): {found}. Map it with split_names.<value>=train|valid|test"
        )
    if stats["users"] != stats["rows"]:
        dup = (
            rows.groupBy("user_id")
            .agg(F.count(F.lit(1)).alias("n"), F.sort_array(F.collect_list("split")).alias("splits"))
            .filter(F.col("n") > 1)
        )
        n_dup = dup.count()
        ex = dup.orderBy("user_id").limit(EXAMPLES).collect()
        raise SplitFileError(
            f"split_file {source}: {n_dup} user_id(s) appear more than once ({stats['rows']} rows, "
            f"{stats['users']} users); each user must be in exactly one split. E.g. "
            + "; ".join(
                f"user_id={r['user_id']!r} in {r['n']} rows (split {', '.join(r['splits'])})" for r in ex
            )
        )
    mapping = F.create_map(*(F.lit(x) for kv in sorted(split_names.items()) for x in kv))
    return rows.select("user_id", mapping[F.col("split")].alias("split"))


def check_coverage(assigned: DataFrame, subsequences: DataFrame, source: str) -> int:
    """Every user with a subsequence must be in ``assigned`` (else SplitFileError with the count and the first
    user ids); returns how many users of ``assigned`` have no subsequence (absent from the input, or every
    event rejected or in a dropped short subsequence)."""
    users = subsequences.select("user_id").distinct().withColumn("_in_data", F.lit(True))
    listed = assigned.select("user_id").withColumn("_in_file", F.lit(True))
    joined = users.join(listed, "user_id", "full_outer")
    missing = F.col("_in_file").isNull()
    stats = joined.agg(
        F.count(F.when(missing, 1)).alias("missing"),
        F.count(F.when(F.col("_in_data").isNull(), 1)).alias("not_in_data"),
        F.count(F.col("_in_data")).alias("users"),
    ).first()
    if stats["missing"]:
        ex = [r["user_id"] for r in joined.filter(missing).orderBy("user_id").limit(EXAMPLES).collect()]
        raise SplitFileError(
            f"split_file {source}: {stats['missing']} of the {stats['users']} users in the data are not in the "
            f"file, so their subsequences would be in no split; e.g. {', '.join(map(repr, ex))}"
        )
    return int(stats["not_in_data"])
