"""Read raw interaction logs into one DataFrame of strings.

Output columns (all strings; nothing is parsed or dropped here, so every input row is counted):
``user_id, item_id, timestamp, raw_domain, domain, source_file, malformed_record``. ``domain`` is the named
domain after the config's mapping, NULL where the config drops the raw domain. ``malformed_record`` is the raw
text of a CSV or JSON record the parser could not split into the expected fields (a CSV row with more or fewer
fields than the header, an unterminated quote, a line that is not JSON or not UTF-8), NULL otherwise.

Spark reports some input problems only when the data is scanned (a corrupt or truncated file, a column whose
type differs between the Parquet files of a folder, a CSV file whose header differs from the folder's first):
`read_failures` turns those into an InputError naming the file.

Paths go through Hadoop's FileSystem API, so ``s3a://``, ``gs://``, ``hdfs://`` and local paths work alike.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from py4j.protocol import Py4JJavaError
from pyspark.errors import PySparkException
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from pipelines.config import DataConfig, check_domain_name
from pipelines.fs import HadoopFS

log = logging.getLogger(__name__)

EXTENSIONS = {
    ".csv": "csv",
    ".csv.gz": "csv",
    ".tsv": "csv",
    ".parquet": "parquet",
    ".snappy.parquet": "parquet",
    ".json": "json",
    ".jsonl": "json",
    ".ndjson": "json",
    ".json.gz": "json",
    ".jsonl.gz": "json",
}
CONTRACT_FIELDS = ("user_id", "item_id", "timestamp")
# Where the CSV/JSON parser puts the text of a record it could not parse (an unlikely name: the reader's
# schema holds it next to the file's own columns).
CORRUPT_COLUMN = "_autocdsr_malformed_record"
# Spark error conditions that mean "this input file cannot be read as it is".
READ_FAILURES = ("FAILED_READ_FILE", "PARQUET_TYPE_ILLEGAL", "CANNOT_READ_FILE_FOOTER")
READ_FAILURE_HINTS = {
    "PARQUET_TYPE_ILLEGAL": "Spark cannot read Parquet timestamps in nanoseconds (pandas' default): write them "
    "as microseconds (pyarrow: coerce_timestamps='us') or as numbers",
    "CSV header does not conform": "Every CSV file of a domain folder must have the header of its first file",
    "Number of column in CSV header": "Every CSV file of a domain folder must have the header of its first file",
}
TIME_TYPES = (T.TimestampType, T.TimestampNTZType, T.DateType)


class InputError(ValueError):
    """The input cannot be read as interaction logs; the message names the path and the problem."""


@dataclass
class InputReport:
    """What was found in the input, for the manifest and the logs."""

    domains: dict[str, list[str]] = field(default_factory=dict)  # raw domain -> files
    empty_domains: list[str] = field(default_factory=list)
    formats: dict[str, str] = field(default_factory=dict)  # raw domain -> format


def detect_format(path: str) -> str | None:
    name = path.rsplit("/", 1)[-1].lower()
    for ext in sorted(EXTENSIONS, key=len, reverse=True):
        if name.endswith(ext):
            return EXTENSIONS[ext]
    return None


def _data_files(fs: HadoopFS, folder: str) -> list[str]:
    """Data files below ``folder``, skipping hidden and marker files (``_SUCCESS``, ``.crc``)."""
    return sorted(p for p in fs.list_files(folder, recursive=True) if not _is_hidden(p, folder))


def _is_hidden(path: str, root: str) -> bool:
    rel = path[len(root.rstrip("/")) + 1 :] if path.startswith(root.rstrip("/")) else path
    return any(part.startswith(("_", ".")) for part in rel.split("/"))


def _files_format(files: list[str], cfg: DataConfig, where: str) -> str:
    if cfg.format != "auto":
        return "json" if cfg.format == "json" else cfg.format
    formats: dict[str, list[str]] = {}
    for f in files:
        fmt = detect_format(f)
        if fmt is None:
            raise InputError(
                f"{where}: cannot tell the format of {f!r} (known extensions: "
                f"{', '.join(sorted(EXTENSIONS))}); rename it, remove it, or set format= in the config"
            )
        formats.setdefault(fmt, []).append(f)
    if len(formats) > 1:
        examples = "; ".join(f"{k}: {v[0]}" for k, v in sorted(formats.items()))
        raise InputError(
            f"{where}: files of several formats in one folder ({examples}); keep one format per folder"
        )
    return next(iter(formats))


def _read_files(
    spark: SparkSession, files: list[str], fmt: str, cfg: DataConfig, wanted: list[str]
) -> DataFrame:
    """Read files as a DataFrame holding the ``wanted`` columns (and CORRUPT_COLUMN for CSV and JSON), checking
    the columns exist.

    CSV: every file must have the header of the folder's first file (Spark checks each file's header when it
    reads it; a file that differs fails the job, see `read_failures`), rows that do not split into the header's
    fields get CORRUPT_COLUMN. JSON lines: unparseable lines get CORRUPT_COLUMN. Parquet: a timestamp column of
    a time type needs ``timestamp_unit=iso``, one of a numeric type the other units.
    """
    where = f"{files[0]}{f' (and {len(files) - 1} other files)' if len(files) > 1 else ''}"
    with read_failures(where):
        if fmt == "csv":
            delimiter = "\t" if all(f.endswith(".tsv") for f in files) else cfg.csv_delimiter
            reader = (
                spark.read.option("header", True)
                .option("sep", delimiter)
                .option("multiLine", cfg.csv_multiline)
                .option("escape", cfg.csv_escape)
                .option("mode", "PERMISSIVE")
                .option("inferSchema", False)
            )
            # The header of the first file (by name) that has one; Spark then checks every file's against it.
            header = next((cols for f in files if (cols := reader.csv(f).columns)), [])
            _check_columns(header, wanted, where)
            schema = _string_schema([*header, CORRUPT_COLUMN])
            df = (
                reader.schema(schema)
                .option("enforceSchema", False)
                .option("columnNameOfCorruptRecord", CORRUPT_COLUMN)
                .csv(files)
            )
        elif fmt == "parquet":
            df = spark.read.parquet(*files)
            _check_columns(df.columns, wanted, where)
            _check_timestamp_type(df, cfg.columns.timestamp, cfg.timestamp_unit, where)
        else:
            # An explicit string schema keeps numbers' text as written and skips a schema-inference pass;
            # a key missing from every record then shows up as NULLs, which are rejected with a reason.
            df = (
                spark.read.schema(_string_schema([*wanted, CORRUPT_COLUMN]))
                .option("mode", "PERMISSIVE")
                .option("columnNameOfCorruptRecord", CORRUPT_COLUMN)
                .json(files)
            )
    return df


def _string_schema(columns: list[str]) -> T.StructType:
    return T.StructType([T.StructField(c, T.StringType()) for c in columns])


def _check_columns(found: list[str], wanted: list[str], where: str) -> None:
    missing = [c for c in wanted if c not in found]
    if not missing:
        return
    hint = ""
    renamed = [f for f in found for c in missing if f.lower().startswith(c.lower()) and f[len(c) :].isdigit()]
    if renamed:
        hint = (
            f" ({', '.join(renamed)}: Spark appends a column's position to header names that occur more than "
            f"once, ignoring case)"
        )
    raise InputError(
        f"{where}: missing column(s) {', '.join(missing)}; found {', '.join(found) or 'none (empty file?)'}"
        f"{hint}. Map names with columns.<field> in the config"
    )


def _check_timestamp_type(df: DataFrame, column: str, unit: str, where: str) -> None:
    dtype = df.schema[column].dataType
    if isinstance(dtype, TIME_TYPES) and unit != "iso":
        raise InputError(
            f"{where}: column {column} has type {dtype.simpleString()}, but timestamp_unit={unit} expects "
            f"numbers; set timestamp_unit=iso to read a time column"
        )
    if isinstance(dtype, T.NumericType) and unit == "iso":
        raise InputError(
            f"{where}: column {column} has type {dtype.simpleString()}, but timestamp_unit=iso expects "
            f"ISO-8601 times; set timestamp_unit to s, ms or ordinal"
        )


def read_failure(error: BaseException) -> str | None:
    """What Spark could not read, if ``error`` is Spark failing to read an input file (the message names the
    file and, from the root cause, what is wrong with it); None for any other error."""
    throwable: Any = getattr(error, "java_exception", None) or getattr(error, "_origin", None)
    messages: list[str] = []
    while throwable is not None and len(messages) < 32:
        text = str(throwable.getMessage() or "").strip()
        messages.append(text or str(throwable.getClass().getSimpleName()))
        throwable = throwable.getCause()
    if not messages and isinstance(error, PySparkException):
        messages.append(str(error).split("\n\nJVM stacktrace:", 1)[0].strip())
    prefixes = tuple(f"[{c}" for c in READ_FAILURES)
    failure = next((m for m in messages if m.startswith(prefixes)), None)
    if failure is None:
        return None
    parts = [_clean(failure)]
    root = messages[-1]
    if root is not failure and _clean(root) not in parts[0]:
        parts.append(_clean(root))
    parts += [hint for key, hint in READ_FAILURE_HINTS.items() if any(key in m for m in messages)]
    return " ".join(p if p.endswith(".") else p + "." for p in parts)


def _clean(message: str) -> str:
    """A Spark error message on one line, without its ``[CONDITION]`` prefix and ``SQLSTATE`` suffix."""
    if message.startswith("[") and "] " in message:
        message = message.split("] ", 1)[1]
    message = message.split("SQLSTATE:", 1)[0]
    return " ".join(line.strip() for line in message.splitlines() if line.strip())


@contextmanager
def read_failures(where: str) -> Iterator[None]:
    """Raise InputError (naming ``where`` and the file) for Spark's input-file read failures inside the block."""
    try:
        yield
    except (Py4JJavaError, PySparkException) as e:
        reason = read_failure(e)
        if reason is None:
            raise
        raise InputError(f"{where}: cannot read the input: {reason} Fix or remove the file") from None


def _as_string(col: str) -> Column:
    return F.col(f"`{col}`").cast("string")


def _malformed(df: DataFrame) -> Column:
    return F.col(CORRUPT_COLUMN) if CORRUPT_COLUMN in df.columns else F.lit(None).cast("string")


def _source_file(df: DataFrame) -> Column:
    # The hidden metadata column, even where the files have a column of their own named _metadata.
    return df.metadataColumn("_metadata").getField("file_path")


def read_logs(spark: SparkSession, input_path: str, cfg: DataConfig) -> tuple[DataFrame, InputReport]:
    """Read every log under ``input_path`` as configured; raise InputError on unreadable layouts."""
    fs = HadoopFS(spark, input_path)
    if not fs.exists(input_path):
        raise InputError(f"input {input_path} does not exist")
    if cfg.layout == "single_table":
        return _read_single_table(spark, fs, input_path, cfg)
    return _read_per_domain(spark, fs, input_path, cfg)


def _read_per_domain(
    spark: SparkSession, fs: HadoopFS, input_path: str, cfg: DataConfig
) -> tuple[DataFrame, InputReport]:
    report = InputReport()
    folders = sorted(d for d in fs.list_dirs(input_path) if not d.rsplit("/", 1)[-1].startswith(("_", ".")))
    stray = [f for f in fs.list_files(input_path, recursive=False) if not _is_hidden(f, input_path)]
    if stray:
        raise InputError(
            f"{input_path}: layout per_domain expects one folder per domain, found file(s) at top level "
            f"(e.g. {stray[0]}); move them into a domain folder or use layout=single_table"
        )
    if not folders:
        raise InputError(
            f"{input_path}: no domain folders found (layout per_domain expects IN/<domain>/files)"
        )
    cols = cfg.columns
    wanted = [cols.user_id, cols.item_id, cols.timestamp]
    parts: list[DataFrame] = []
    for folder in folders:
        raw = folder.rstrip("/").rsplit("/", 1)[-1]
        named = cfg.named_domain(raw)
        if named is not None:
            check_domain_name(named, where=f"input folder {folder}")
        files = _data_files(fs, folder)
        report.domains[raw] = files
        if not files:
            log.warning("domain folder %s holds no data files; domain %r has no interactions", folder, raw)
            report.empty_domains.append(raw)
            continue
        fmt = _files_format(files, cfg, where=folder)
        report.formats[raw] = fmt
        df = _read_files(spark, files, fmt, cfg, wanted)
        parts.append(
            df.select(
                _as_string(cols.user_id).alias("user_id"),
                _as_string(cols.item_id).alias("item_id"),
                _as_string(cols.timestamp).alias("timestamp"),
                F.lit(raw).alias("raw_domain"),
                F.lit(named).cast("string").alias("domain"),
                _source_file(df).alias("source_file"),
                _malformed(df).alias("malformed_record"),
            )
        )
    if not parts:
        raise InputError(f"{input_path}: every domain folder is empty; nothing to build")
    out = parts[0]
    for p in parts[1:]:
        out = out.unionByName(p)
    return out, report


def _read_single_table(
    spark: SparkSession, fs: HadoopFS, input_path: str, cfg: DataConfig
) -> tuple[DataFrame, InputReport]:
    report = InputReport()
    files = _data_files(fs, input_path) if fs.is_dir(input_path) else [input_path]
    if not files:
        raise InputError(f"{input_path}: no data files found")
    fmt = _files_format(files, cfg, where=input_path)
    cols = cfg.columns
    df = _read_files(spark, files, fmt, cfg, [cols.user_id, cols.item_id, cols.timestamp, cols.domain])
    raw = _as_string(cols.domain)
    mapping = (
        F.create_map(*[F.lit(x) for kv in cfg.domain_map.items() for x in kv]) if cfg.domain_map else None
    )
    mapped = mapping[raw] if mapping is not None else F.lit(None).cast("string")
    if cfg.other_domain == "keep":
        named = F.coalesce(mapped, raw)
    elif cfg.other_domain == "drop":
        named = mapped
    else:
        named = F.coalesce(mapped, F.lit(cfg.other_domain))
    out = df.select(
        _as_string(cols.user_id).alias("user_id"),
        _as_string(cols.item_id).alias("item_id"),
        _as_string(cols.timestamp).alias("timestamp"),
        raw.alias("raw_domain"),
        named.alias("domain"),
        _source_file(df).alias("source_file"),
        _malformed(df).alias("malformed_record"),
    )
    report.domains["*"] = files
    report.formats["*"] = fmt
    return out, report


SPLIT_FILE_COLUMNS = ("user_id", "split")


def read_split_file(spark: SparkSession, path: str) -> DataFrame:
    """The split file of ``split=by_sequence``: a CSV with header (tab-separated if it ends in ``.tsv``) and
    columns ``user_id, split``, as strings ``user_id, split`` trimmed of surrounding whitespace (like the input's
    ids). Nothing is checked here but that the file exists and has the columns (`pipelines.split.assignments`)."""
    fs = HadoopFS(spark, path)
    if not fs.exists(path):
        raise InputError(f"split_file {path} does not exist")
    df = (
        spark.read.option("header", True)
        .option("inferSchema", False)
        .option("sep", "\t" if path.endswith(".tsv") else ",")
        .option("mode", "PERMISSIVE")
        .csv(path)
    )
    missing = [c for c in SPLIT_FILE_COLUMNS if c not in df.columns]
    if missing:
        raise InputError(
            f"split_file {path}: missing column(s) {', '.join(missing)}; found {', '.join(df.columns) or 'none'} "
            f"(expected a CSV with header and columns user_id, split)"
        )
    return df.select(*(F.trim(_as_string(c)).alias(c) for c in SPLIT_FILE_COLUMNS))
