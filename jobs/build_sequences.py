"""spark-submit entry point: per-domain interaction logs -> train/valid/test Parquet shards.

    spark-submit jobs/build_sequences.py --input IN --output OUT [--config conf/data/NAME.yaml]
        [--max-len 800] [--min-len 3] [--set key=value ...] [--force]

Runs on local[*] by default and unchanged on a cluster (--master spark://..., yarn, k8s://...). The
job uses native Spark functions only, so executors need no Python package from this project; the driver
imports `pipelines` (installed in the driver's environment, or shipped with --py-files).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from pyspark.sql import SparkSession

from pipelines.build import LedgerError, RejectedRowsError, build_sequences
from pipelines.config import ConfigError, DataConfig, load_config
from pipelines.output import OutputError
from pipelines.read import InputError

log = logging.getLogger("build_sequences")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="spark-submit jobs/build_sequences.py",
        description="Stitch per-domain interaction logs into timestamp-ordered cross-domain subsequences "
        "(train/valid/test Parquet shards: leave-one-out, or by sequence from a split file; item vocabulary, rejected rows, manifest).",
    )
    p.add_argument(
        "--input", required=True, help="IN: folder with one sub-folder per domain (or a single table)"
    )
    p.add_argument("--output", required=True, help="OUT: published atomically; a previous result is replaced")
    p.add_argument("--config", help="YAML data config (see conf/data/ and docs/configuration.md)")
    p.add_argument("--max-len", type=int, help="maximum subsequence length (default 800)")
    p.add_argument("--min-len", type=int, help="drop subsequences shorter than this (default 3, minimum 3)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set timestamp_unit=ms --set columns.user_id=uid (repeatable)",
    )
    p.add_argument(
        "--force", action="store_true", help="replace OUT even if it is not a previous result of this job"
    )
    p.add_argument("--master", help="Spark master when run with plain python (spark-submit's --master wins)")
    return p.parse_args(argv)


def make_config(args: argparse.Namespace) -> DataConfig:
    overrides = list(args.overrides)
    if args.max_len is not None:
        overrides.append(f"max_len={args.max_len}")
    if args.min_len is not None:
        overrides.append(f"min_len={args.min_len}")
    return load_config(args.config, overrides)


def start_spark(cfg: DataConfig, master: str | None) -> SparkSession:
    builder = (
        SparkSession.builder.appName("autocdsr-build-sequences")
        .config("spark.sql.session.timeZone", "UTC")
        # Sub-folders get no _SUCCESS of their own: the one at OUT's root is the only commit marker.
        .config("spark.hadoop.mapreduce.fileoutputcommitter.marksuccessfuljobs", "false")
        .config("spark.sql.adaptive.enabled", "true")
    )
    if master:
        builder = builder.master(master)
    if cfg.shuffle_partitions:
        builder = builder.config("spark.sql.shuffle.partitions", str(cfg.shuffle_partitions))
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    sc = spark.sparkContext
    if (
        not cfg.shuffle_partitions
        and sc.master.startswith("local")
        and not sc.getConf().contains("spark.sql.shuffle.partitions")
    ):
        # Spark's default of 200 shuffle partitions costs more in task overhead than it gains on one machine.
        spark.conf.set("spark.sql.shuffle.partitions", str(max(4, 2 * sc.defaultParallelism)))
    return spark


def summary(manifest: dict) -> str:
    c = manifest["counts"]
    lines = [
        f"input rows {c['input_rows']:>12,}   kept {c['interactions_kept']:,}   rejected {c['rejected_rows']:,}   "
        f"duplicates {c['duplicates_dropped']:,}   in short subsequences {c['interactions_in_short_subsequences']:,}",
        f"users {c['users']:,}   subsequences {c['subsequences']:,}   items {c['items']:,}",
        "length " + "  ".join(f"{k} {v:g}" for k, v in manifest["sequence_length"].items()),
        f"{'domain':<28}{'idx':>4}{'items':>10}{'interactions':>14}  item_idx range",
    ]
    for d in manifest["domains"]:
        rng = d["item_idx_range"] or ["-", "-"]
        lines.append(
            f"{d['domain']:<28}{d['domain_idx']:>4}{d['items']:>10,}{d['interactions']:>14,}  {rng[0]}..{rng[1]}"
        )
    if c["rejected_by_reason"]:
        lines.append("rejected: " + ", ".join(f"{k} {v:,}" for k, v in c["rejected_by_reason"].items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        cfg = make_config(args)
    except ConfigError as e:
        log.error("config: %s", e)
        return 2
    spark = start_spark(cfg, args.master)
    try:
        result = build_sequences(spark, args.input, args.output, cfg, force=args.force)
    except (ConfigError, InputError, OutputError, RejectedRowsError) as e:
        log.error("%s", e)
        return 2
    except LedgerError as e:
        log.error("internal consistency check failed, nothing was published: %s", e)
        return 3
    finally:
        spark.stop()
    print(summary(result.manifest))
    print(json.dumps({"output": result.output, **result.manifest["counts"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
