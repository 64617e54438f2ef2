"""Leave-one-out splits of whole subsequences.

``test`` rows hold the whole subsequence (last item = test target), ``valid`` rows drop the last item
(last = validation target), ``train`` rows drop the last two. Every subsequence appears in all three, so a
model trained on ``train`` never sees either target.
"""

from __future__ import annotations

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

SEQUENCE_COLUMNS = ("item_idx", "domain_idx", "timestamp")
SPLITS = ("train", "valid", "test")


def _drop_last(col: str, k: int) -> Column:
    return F.slice(F.col(col), 1, F.size(F.col(col)) - k).alias(col)


def leave_one_out(subsequences: DataFrame) -> dict[str, DataFrame]:
    """Map split name -> DataFrame with the same columns as ``subsequences``."""
    keys = [c for c in subsequences.columns if c not in SEQUENCE_COLUMNS]
    out = {}
    for split, k in (("test", 0), ("valid", 1), ("train", 2)):
        out[split] = subsequences.select(*keys, *(_drop_last(c, k) for c in SEQUENCE_COLUMNS))
    return out
