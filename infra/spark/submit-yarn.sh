#!/usr/bin/env bash
# Build the sequence shards with Spark on YARN (cluster mode: the driver runs in the application master).
#
#   make wheel          # dist/autocdsr-VERSION-py-files.zip: the driver's `pipelines` + `autocdsr`
#   HADOOP_CONF_DIR=/etc/hadoop/conf \
#   INPUT=s3a://BUCKET/raw/amazon5 OUTPUT=s3a://BUCKET/autocdsr/sequences/amazon5 \
#   infra/spark/submit-yarn.sh [extra job flags, e.g. --max-len 200]
#
# DRY_RUN=1 prints the spark-submit command instead of running it.
#
# Required environment:
#   HADOOP_CONF_DIR (or YARN_CONF_DIR)  the cluster's client configuration
#   INPUT, OUTPUT   s3a://, gs:// or hdfs:// folders; OUTPUT is published atomically, _SUCCESS last
# Optional environment (default):
#   QUEUE (default)  EXECUTORS (8)  EXECUTOR_CORES (4)  EXECUTOR_MEMORY (8g)  DRIVER_MEMORY (4g)
#   CONFIG (conf/data/amazon5.yaml)   PY_FILES (dist/autocdsr-*-py-files.zip)   SPARK_SUBMIT (spark-submit)
#   PYTHON_ENV_ARCHIVE  a packed Python >= 3.11 environment with PyYAML (venv-pack / conda-pack .tar.gz)
#                       for clusters whose nodes lack one; shipped with --archives and used as ./env/bin/python
#   HADOOP_AWS_PACKAGE  e.g. org.apache.hadoop:hadoop-aws:3.5.0 when the cluster has no hadoop-aws (empty)
#   CREDENTIAL_PROVIDER_PATH  a Hadoop credential store holding fs.s3a.access.key/secret.key, e.g.
#                       jceks://hdfs/user/autocdsr/s3.jceks (`hadoop credential create ...`)        (empty)
#
# Credentials never travel on the command line: s3a finds them through the AWS SDK's default chain
# (instance role of the node, AWS_* variables) or in CREDENTIAL_PROVIDER_PATH.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

die() {
  echo "submit-yarn.sh: error: $*" >&2
  exit 1
}

for var in INPUT OUTPUT; do
  [[ -n "${!var:-}" ]] || die "$var is not set (see the header of $0)"
done
[[ -n "${HADOOP_CONF_DIR:-}${YARN_CONF_DIR:-}" ]] ||
  die "HADOOP_CONF_DIR or YARN_CONF_DIR must point at the cluster's client configuration"

QUEUE="${QUEUE:-default}"
EXECUTORS="${EXECUTORS:-8}"
EXECUTOR_CORES="${EXECUTOR_CORES:-4}"
EXECUTOR_MEMORY="${EXECUTOR_MEMORY:-8g}"
DRIVER_MEMORY="${DRIVER_MEMORY:-4g}"
CONFIG="${CONFIG:-$REPO/conf/data/amazon5.yaml}"
SPARK_SUBMIT="${SPARK_SUBMIT:-spark-submit}"

if [[ -z "${PY_FILES:-}" ]]; then
  shopt -s nullglob
  zips=("$REPO"/dist/autocdsr-*-py-files.zip)
  ((${#zips[@]} == 1)) || die "expected one dist/autocdsr-*-py-files.zip, found ${#zips[@]}: run 'make wheel' (or set PY_FILES)"
  PY_FILES="${zips[0]}"
fi
[[ -f "$PY_FILES" ]] || die "PY_FILES=$PY_FILES does not exist"
[[ -f "$CONFIG" ]] || die "CONFIG=$CONFIG does not exist"

cmd=(
  "$SPARK_SUBMIT"
  --master yarn --deploy-mode cluster
  --name autocdsr-build-sequences
  --queue "$QUEUE"
  --num-executors "$EXECUTORS"
  --executor-cores "$EXECUTOR_CORES"
  --executor-memory "$EXECUTOR_MEMORY"
  --driver-memory "$DRIVER_MEMORY"
  # About three tasks per core in each shuffle; AQE coalesces small ones.
  --conf "spark.sql.shuffle.partitions=$((EXECUTORS * EXECUTOR_CORES * 3))"
  --conf "spark.hadoop.fs.s3a.aws.credentials.provider=software.amazon.awssdk.auth.credentials.DefaultCredentialsProvider"
)
if [[ -n "${HADOOP_AWS_PACKAGE:-}" ]]; then
  cmd+=(--packages "$HADOOP_AWS_PACKAGE")
fi
if [[ -n "${CREDENTIAL_PROVIDER_PATH:-}" ]]; then
  cmd+=(--conf "spark.hadoop.hadoop.security.credential.provider.path=$CREDENTIAL_PROVIDER_PATH")
fi
if [[ -n "${PYTHON_ENV_ARCHIVE:-}" ]]; then
  [[ -f "$PYTHON_ENV_ARCHIVE" ]] || die "PYTHON_ENV_ARCHIVE=$PYTHON_ENV_ARCHIVE does not exist"
  cmd+=(
    --archives "$PYTHON_ENV_ARCHIVE#env"
    --conf spark.yarn.appMasterEnv.PYSPARK_PYTHON=./env/bin/python
    --conf spark.executorEnv.PYSPARK_PYTHON=./env/bin/python
  )
fi
# --files localises the config into the driver's container working directory: hence its bare name.
cmd+=(
  --py-files "$PY_FILES"
  --files "$CONFIG"
  "$REPO/jobs/build_sequences.py"
  --input "$INPUT" --output "$OUTPUT" --config "$(basename "$CONFIG")"
  "$@"
)

if [[ "${DRY_RUN:-}" == 1 ]]; then
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi
exec "${cmd[@]}"
