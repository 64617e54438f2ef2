"""Read raw interaction logs into one DataFrame of strings.

Output columns (all strings; nothing is parsed or dropped here, so every input row is counted):
``user_id, item_id, timestamp, raw_domain, domain, source_file``. ``domain`` is the named domain after
the config's mapping, NULL where the config drops the raw domain.

Paths go through Hadoop's FileSystem API, so ``s3a://``, ``gs://``, ``hdfs://`` and local paths work alike.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

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
    """Read files as a DataFrame whose ``wanted`` columns are strings, checking the columns exist."""
    reader = spark.read
    if fmt == "csv":
        delimiter = "\t" if all(f.endswith(".tsv") for f in files) else cfg.csv_delimiter
        df = (
            reader.option("header", True)
            .option("inferSchema", False)
            .option("sep", delimiter)
            .option("multiLine", cfg.csv_multiline)
            .option("mode", "PERMISSIVE")
            .csv(files)
        )
    elif fmt == "parquet":
        df = reader.parquet(*files)
    else:
        # An explicit string schema keeps numbers' text as written and skips a schema-inference pass;
        # a key missing from every record then shows up as NULLs, which are rejected with a reason.
        schema = T.StructType([T.StructField(c, T.StringType()) for c in wanted])
        df = reader.schema(schema).json(files)
    missing = [c for c in wanted if c not in df.columns]
    if missing:
        raise InputError(
            f"{files[0]}{' (and others)' if len(files) > 1 else ''}: missing column(s) {', '.join(missing)}; "
            f"found {', '.join(df.columns) or 'none'}. Map names with columns.<field> in the config"
        )
    return df


def _as_string(col: str) -> Column:
    return F.col(f"`{col}`").cast("string")


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
                F.col("_metadata.file_path").alias("source_file"),
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
        F.col("_metadata.file_path").alias("source_file"),
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
