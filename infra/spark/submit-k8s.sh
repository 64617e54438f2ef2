#!/usr/bin/env bash
# Build the sequence shards with Spark on Kubernetes (cluster mode: driver and executors run as pods).
#
#   make wheel          # dist/autocdsr-VERSION-py-files.zip: the driver's `pipelines` + `autocdsr`
#   K8S_MASTER=k8s://https://API-SERVER:6443 SPARK_IMAGE=REGISTRY/spark:4.3.0-py311 \
#   INPUT=s3a://BUCKET/raw/amazon5 OUTPUT=s3a://BUCKET/autocdsr/sequences/amazon5 \
#   UPLOAD_PATH=s3a://BUCKET/spark-uploads infra/spark/submit-k8s.sh [extra job flags, e.g. --max-len 200]
#
# DRY_RUN=1 prints the spark-submit command instead of running it.
#
# Required environment:
#   K8S_MASTER      the API server, as k8s://https://HOST:PORT
#   SPARK_IMAGE     driver/executor image: Spark 4.3 (the pyspark version in pyproject.toml), Java 17,
#                   Python >= 3.11 with PyYAML (the driver imports pipelines/, which reads YAML configs)
#   INPUT, OUTPUT   s3a:// (or gs://, hdfs://) folders; OUTPUT is published atomically, _SUCCESS last
#   UPLOAD_PATH     where spark-submit uploads the job file, the --py-files zip and the config for the
#                   driver pod (spark.kubernetes.file.upload.path)
# Optional environment (default):
#   NAMESPACE (autocdsr)  SERVICE_ACCOUNT (spark: may create executor pods; IRSA/Workload Identity role)
#   EXECUTORS (8)  EXECUTOR_CORES (4)  EXECUTOR_MEMORY (8g)  DRIVER_MEMORY (4g)
#   CONFIG (conf/data/amazon5.yaml)   PY_FILES (dist/autocdsr-*-py-files.zip)   SPARK_SUBMIT (spark-submit)
#   HADOOP_AWS_PACKAGE (org.apache.hadoop:hadoop-aws:3.5.0, matching the Hadoop client of Spark 4.3; set
#                       it empty when the image already has hadoop-aws and its AWS SDK)
#   OBJECT_STORE_SECRET  a Kubernetes Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, mounted as
#                        environment variables in the driver and executors (when no IRSA role is used)
#
# Credentials never travel on the command line (it shows in `ps` and in the Spark UI): pods get them
# from the service account's role or from OBJECT_STORE_SECRET; this machine (which uploads to
# UPLOAD_PATH) from its own environment (AWS_* variables, ~/.aws, instance role), all through the AWS SDK's
# default provider chain.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

die() {
  echo "submit-k8s.sh: error: $*" >&2
  exit 1
}

for var in K8S_MASTER SPARK_IMAGE INPUT OUTPUT UPLOAD_PATH; do
  [[ -n "${!var:-}" ]] || die "$var is not set (see the header of $0)"
done
[[ "$K8S_MASTER" == k8s://* ]] || die "K8S_MASTER must look like k8s://https://HOST:PORT, got '$K8S_MASTER'"

NAMESPACE="${NAMESPACE:-autocdsr}"
SERVICE_ACCOUNT="${SERVICE_ACCOUNT:-spark}"
EXECUTORS="${EXECUTORS:-8}"
EXECUTOR_CORES="${EXECUTOR_CORES:-4}"
EXECUTOR_MEMORY="${EXECUTOR_MEMORY:-8g}"
DRIVER_MEMORY="${DRIVER_MEMORY:-4g}"
CONFIG="${CONFIG:-$REPO/conf/data/amazon5.yaml}"
HADOOP_AWS_PACKAGE="${HADOOP_AWS_PACKAGE-org.apache.hadoop:hadoop-aws:3.5.0}"
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
  --master "$K8S_MASTER" --deploy-mode cluster
  --name autocdsr-build-sequences
  --conf "spark.kubernetes.namespace=$NAMESPACE"
  --conf "spark.kubernetes.authenticate.driver.serviceAccountName=$SERVICE_ACCOUNT"
  --conf "spark.kubernetes.container.image=$SPARK_IMAGE"
  --conf "spark.kubernetes.file.upload.path=$UPLOAD_PATH"
  --conf "spark.executor.instances=$EXECUTORS"
  --conf "spark.executor.cores=$EXECUTOR_CORES"
  --conf "spark.executor.memory=$EXECUTOR_MEMORY"
  --conf "spark.driver.memory=$DRIVER_MEMORY"
  # About three tasks per core in each shuffle; AQE coalesces small ones.
  --conf "spark.sql.shuffle.partitions=$((EXECUTORS * EXECUTOR_CORES * 3))"
  # The SDK's default chain: environment, web identity (IRSA), profile, container and instance roles.
  --conf "spark.hadoop.fs.s3a.aws.credentials.provider=software.amazon.awssdk.auth.credentials.DefaultCredentialsProvider"
)
if [[ -n "$HADOOP_AWS_PACKAGE" ]]; then
  cmd+=(--packages "$HADOOP_AWS_PACKAGE")
fi
if [[ -n "${OBJECT_STORE_SECRET:-}" ]]; then
  for key in AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY; do
    cmd+=(--conf "spark.kubernetes.driver.secretKeyRef.$key=$OBJECT_STORE_SECRET:$key")
    cmd+=(--conf "spark.kubernetes.executor.secretKeyRef.$key=$OBJECT_STORE_SECRET:$key")
  done
fi
# --files puts the config in the driver pod's working directory, hence the bare file name below.
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
