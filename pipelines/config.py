"""Configuration of the sequence builder: one dataclass, loaded from YAML, overridden from the command line.

Every key is read here and nowhere else; `docs/configuration.md` lists them. Loading and type checks are
shared with the trainer (``autocdsr.configtools``).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from autocdsr import configtools
from autocdsr.configtools import ConfigError

__all__ = ["ConfigError", "DataConfig", "load_config"]

LAYOUTS = ("per_domain", "single_table")
FORMATS = ("auto", "csv", "parquet", "json")
TIMESTAMP_UNITS = ("s", "ms", "iso", "ordinal")
SPLIT_PROTOCOLS = ("leave_one_out", "by_sequence")
SPLIT_NAMES = ("train", "valid", "test")
# Domain names become metric keys, file names and MLflow tags: keep them to a safe alphabet.
DOMAIN_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")


@dataclass(frozen=True)
class Columns:
    """Names of the raw input columns that hold each contract field."""

    user_id: str = "user_id"
    item_id: str = "item_id"
    timestamp: str = "timestamp"
    domain: str = "domain"  # only read with layout=single_table


@dataclass(frozen=True)
class DataConfig:
    layout: str = "per_domain"
    format: str = "auto"
    columns: Columns = field(default_factory=Columns)
    timestamp_unit: str = "s"
    # raw domain name -> named domain; unlisted raw domains keep their name unless other_domain is set.
    domain_map: dict[str, str] = field(default_factory=dict)
    # where raw domains missing from domain_map go: a name (e.g. "other"), "keep" (own name) or "drop".
    other_domain: str = "keep"
    max_len: int = 800
    min_len: int = 3
    max_rejected_fraction: float = 0.01
    # rows later than reference_time + max_future_s are rejected as "future_timestamp".
    max_future_s: int = 86_400
    reference_time: str | None = None  # ISO-8601; default: the job's start time
    # rows earlier than this (ISO-8601) are rejected as "early_timestamp": epoch-0 placeholders, and epoch
    # seconds in a column read as milliseconds (they land in January 1970). None: no lower bound.
    min_timestamp: str | None = "1971-01-01T00:00:00Z"
    csv_delimiter: str = ","
    csv_multiline: bool = False  # True reads quoted embedded newlines, at the cost of unsplittable files
    # escapes a quote inside a quoted field: '"' as RFC 4180, pandas and Excel write them ("a ""b"""), or '\\'.
    csv_escape: str = '"'
    rows_per_shard: int = 20_000  # subsequences per Parquet file of train/valid/test
    # subsequences per Parquet row group of train/valid/test (each file's last group holds the rest): the
    # unit petastorm shards by (cur_shard/shard_count), so many equal groups balance its readers.
    rows_per_row_group: int = 1_000
    shuffle_partitions: int | None = None
    # leave_one_out: every subsequence in all three splits, the last two items held out (docs/data-contract.md);
    # by_sequence: each user's subsequences go whole to the split that split_file names for the user.
    split: str = "leave_one_out"
    # CSV with header and columns user_id, split: required with by_sequence, an error otherwise.
    split_file: str | None = None
    # split_file value -> our split name (train, valid or test); replaced as a whole when set.
    split_names: dict[str, str] = field(
        default_factory=lambda: {"training": "train", "evaluation": "valid", "testing": "test"}
    )

    def __post_init__(self) -> None:
        _check_choice("layout", self.layout, LAYOUTS)
        _check_choice("format", self.format, FORMATS)
        _check_choice("timestamp_unit", self.timestamp_unit, TIMESTAMP_UNITS)
        if self.min_len < 3:
            raise ConfigError(
                f"min_len must be >= 3 (leave-one-out needs a test target, a validation target and at least "
                f"one training item), got {self.min_len}"
            )
        if self.max_len < self.min_len:
            raise ConfigError(f"max_len ({self.max_len}) must be >= min_len ({self.min_len})")
        if not 0.0 <= self.max_rejected_fraction <= 1.0:
            raise ConfigError(f"max_rejected_fraction must be in [0, 1], got {self.max_rejected_fraction}")
        if self.max_future_s < 0:
            raise ConfigError(f"max_future_s must be >= 0, got {self.max_future_s}")
        if self.min_timestamp is not None:
            try:
                epoch_ms(self.min_timestamp)
            except ValueError as e:
                raise ConfigError(f"min_timestamp must be an ISO-8601 time or null: {e}") from e
        if len(self.csv_escape) != 1:
            raise ConfigError(f"csv_escape must be one character, got {self.csv_escape!r}")
        if self.rows_per_shard < 1:
            raise ConfigError(f"rows_per_shard must be >= 1, got {self.rows_per_shard}")
        if self.rows_per_row_group < 1:
            raise ConfigError(f"rows_per_row_group must be >= 1, got {self.rows_per_row_group}")
        if self.shuffle_partitions is not None and self.shuffle_partitions < 1:
            raise ConfigError(f"shuffle_partitions must be >= 1, got {self.shuffle_partitions}")
        if self.other_domain not in ("keep", "drop"):
            check_domain_name(self.other_domain, where="other_domain")
        for raw, named in self.domain_map.items():
            check_domain_name(named, where=f"domain_map[{raw!r}]")
        self._check_split()

    def _check_split(self) -> None:
        _check_choice("split", self.split, SPLIT_PROTOCOLS)
        if self.split == "by_sequence" and not self.split_file:
            raise ConfigError(
                "split=by_sequence needs split_file, the CSV (columns user_id, split) that assigns each user to a "
                "split; pass it with --set split_file=/path/to/split.csv"
            )
        if self.split != "by_sequence" and self.split_file is not None:
            raise ConfigError(
                f"split_file is only read with split=by_sequence, but split={self.split!r}; "
                f"remove split_file or set split=by_sequence"
            )
        if not self.split_names:
            raise ConfigError(
                f"split_names must map split_file values to {', '.join(SPLIT_NAMES)}; it is empty"
            )
        for value, name in self.split_names.items():
            if not value.strip() or value != value.strip():
                raise ConfigError(
                    f"split_names: key {value!r} must be a non-empty split_file value without surrounding "
                    f"whitespace (the file's values are trimmed)"
                )
            if name not in SPLIT_NAMES:
                raise ConfigError(
                    f"split_names[{value!r}] must be one of {', '.join(SPLIT_NAMES)}; got {name!r}"
                )

    def named_domain(self, raw: str) -> str | None:
        """The named domain of a raw domain, or None when the config drops it."""
        if raw in self.domain_map:
            return self.domain_map[raw]
        if self.other_domain == "keep":
            return raw
        if self.other_domain == "drop":
            return None
        return self.other_domain

    def min_timestamp_ms(self) -> int | None:
        """``min_timestamp`` in epoch milliseconds (None: no lower bound)."""
        return None if self.min_timestamp is None else epoch_ms(self.min_timestamp)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def epoch_ms(iso: str) -> int:
    """Epoch milliseconds of an ISO-8601 time; no zone means UTC. Raises ValueError if it does not parse."""
    t = datetime.fromisoformat(iso)
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    return int(t.timestamp() * 1000)


def check_domain_name(name: str, where: str) -> None:
    if not DOMAIN_NAME_RE.match(name):
        raise ConfigError(
            f"{where}: domain name {name!r} is not valid; use letters, digits, '_', '.', '-' "
            f"(at most 64, starting with a letter or digit), or map it with domain_map"
        )


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(choices)}; got {value!r}")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> DataConfig:
    """Load a YAML file (or the defaults) and apply ``key=value`` overrides (dotted keys for nesting)."""
    return configtools.load(DataConfig, path, overrides)
