"""Benchmark: rows/second of the Spark sequence builder vs a single-process DuckDB reference doing the
same stitching (dedupe, total order, cut from the newest end, item numbering, leave-one-out arrays).

    python bench/build_sequences.py [--users 75000] [--whale 1000000] [--out bench/out/build]

Both run in the same invocation on the same generated input, so their ratio is comparable; absolute
numbers depend on the machine (printed with the results). Spark runs through spark-submit, as users run
it, so its figure includes JVM start-up (reported separately). The last line is a JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from autocdsr.synth import SynthConfig, generate, write_logs  # noqa: E402


def make_input(root: Path, users: int, whale: int) -> int:
    if root.exists():
        shutil.rmtree(root)
    frame = generate(SynthConfig(users=users, seed=1, mean_events=40))
    n = len(frame)
    if whale:
        # One user with `whale` events in one domain: the job must not need more than that user in a task.
        rng = np.random.default_rng(2)
        big = pd.DataFrame(
            {
                "user_id": "whale",
                "item_id": [f"boo{i:06d}" for i in rng.integers(0, 3000, whale)],
                "timestamp": 1_600_000_000 + np.arange(whale) // 2,
                "domain": "books",
            }
        )
        frame = pd.concat([frame, big], ignore_index=True)
        n += whale
    write_logs(frame, root, "csv")
    return n


def run_spark(inp: Path, out: Path) -> dict:
    env = dict(os.environ)
    bin_dir = Path(sys.executable).parent
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", PYSPARK_PYTHON=sys.executable)
    env["PYSPARK_DRIVER_PYTHON"] = sys.executable
    cmd = [
        str(bin_dir / "spark-submit"),
        "--master",
        f"local[{os.cpu_count()}]",
        "--driver-memory",
        "6g",
        "--conf",
        "spark.ui.enabled=false",
        "--driver-java-options",
        f"-Dlog4j2.configurationFile={REPO / 'conf/spark/log4j2.properties'}",
        str(REPO / "jobs/build_sequences.py"),
        "--input",
        str(inp),
        "--output",
        str(out),
        "--force",
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    (out.parent / "spark.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"spark job failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}")
    manifest = json.loads((out / "manifest.json").read_text())
    return {"wall_s": wall, "job_s": manifest["run"]["duration_s"], "counts": manifest["counts"]}


DUCKDB_SQL = """
CREATE TABLE raw AS
  SELECT trim(user_id) AS user_id, trim(item_id) AS item_id,
         CAST(CAST(timestamp AS DECIMAL(38,6)) * 1000 AS BIGINT) AS ts,
         regexp_extract(filename, '.*/([^/]+)/[^/]+$', 1) AS domain
  FROM read_csv('{inp}/*/*.csv', filename = true, all_varchar = true, header = true);
CREATE TABLE ev AS SELECT DISTINCT user_id, domain, item_id, ts FROM raw;
CREATE TABLE pos AS
  SELECT *, row_number() OVER w - 1 AS p, count(*) OVER (PARTITION BY user_id) AS n
  FROM ev WINDOW w AS (PARTITION BY user_id ORDER BY ts, domain, item_id);
CREATE TABLE ch AS
  SELECT *, (n - 1) // {L} - (n - 1 - p) // {L} AS raw_chunk,
         least({L}, n - ((n - 1 - p) // {L}) * {L}) AS size,
         (n % {L} != 0 AND n % {L} < {m}) AS oldest_short
  FROM pos;
CREATE TABLE kept AS
  SELECT *, raw_chunk - CASE WHEN oldest_short THEN 1 ELSE 0 END AS chunk FROM ch WHERE size >= {m};
CREATE TABLE doms AS SELECT domain, row_number() OVER (ORDER BY domain) AS domain_idx FROM (SELECT DISTINCT domain FROM raw);
CREATE TABLE items AS
  SELECT row_number() OVER (ORDER BY d.domain_idx, c.cnt DESC, c.item_id) AS item_idx, c.item_id, c.domain,
         d.domain_idx, c.cnt AS count
  FROM (SELECT domain, item_id, count(*) AS cnt FROM kept GROUP BY ALL) c JOIN doms d USING (domain);
CREATE TABLE seq AS
  SELECT k.user_id || ':' || k.chunk AS sequence_id, k.user_id, k.chunk,
         list(i.item_idx ORDER BY k.p) AS item_idx, list(i.domain_idx ORDER BY k.p) AS domain_idx,
         list(k.ts ORDER BY k.p) AS timestamp
  FROM kept k JOIN items i USING (domain, item_id) GROUP BY k.user_id, k.chunk;
COPY (SELECT * FROM seq) TO '{out}/test.parquet' (FORMAT parquet);
COPY (SELECT sequence_id, user_id, chunk, item_idx[:-2] AS item_idx, domain_idx[:-2] AS domain_idx,
      timestamp[:-2] AS timestamp FROM seq) TO '{out}/valid.parquet' (FORMAT parquet);
COPY (SELECT sequence_id, user_id, chunk, item_idx[:-3] AS item_idx, domain_idx[:-3] AS domain_idx,
      timestamp[:-3] AS timestamp FROM seq) TO '{out}/train.parquet' (FORMAT parquet);
COPY items TO '{out}/items.parquet' (FORMAT parquet);
"""


def run_duckdb(inp: Path, out: Path, max_len: int = 800, min_len: int = 3) -> dict:
    import duckdb

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    con = duckdb.connect()
    con.execute(f"SET threads = {os.cpu_count()}")
    t0 = time.perf_counter()
    con.execute(DUCKDB_SQL.format(inp=inp, out=out, L=max_len, m=min_len))
    wall = time.perf_counter() - t0
    n_seq = con.execute("SELECT count(*) FROM seq").fetchone()[0]
    kept = con.execute("SELECT count(*) FROM kept").fetchone()[0]
    return {"wall_s": wall, "subsequences": n_seq, "interactions_kept": kept}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=75_000, help="generated users (~40 events each)")
    p.add_argument(
        "--whale", type=int, default=1_000_000, help="events of one extra very long user (0: none)"
    )
    p.add_argument("--out", type=Path, default=REPO / "bench/out/build")
    args = p.parse_args()
    inp = args.out / "logs"
    t0 = time.perf_counter()
    rows = make_input(inp, args.users, args.whale)
    print(f"generated {rows:,} rows in {time.perf_counter() - t0:.0f}s", flush=True)

    spark = run_spark(inp, args.out / "spark")
    print(f"spark : {spark['wall_s']:.1f}s wall ({spark['job_s']:.1f}s in the job)", flush=True)
    duck = run_duckdb(inp, args.out / "duckdb")
    print(f"duckdb: {duck['wall_s']:.1f}s", flush=True)
    c = spark["counts"]
    agree = c["subsequences"] == duck["subsequences"] and c["interactions_kept"] == duck["interactions_kept"]
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "input_rows": rows,
        "whale_events": args.whale,
        "spark_rows_per_s": round(rows / spark["wall_s"]),
        "spark_job_rows_per_s": round(rows / spark["job_s"]),
        "duckdb_rows_per_s": round(rows / duck["wall_s"]),
        "spark_over_duckdb_time": round(spark["wall_s"] / duck["wall_s"], 2),
        "outputs_agree": agree,
    }
    print(json.dumps(result))
    if not agree:
        raise SystemExit(f"spark and duckdb disagree: {c} vs {duck}")


if __name__ == "__main__":
    main()
