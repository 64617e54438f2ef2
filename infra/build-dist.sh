#!/usr/bin/env bash
# Build what ships the project's code to cluster machines (`make wheel` runs this):
#
#   OUT/autocdsr-VERSION-py3-none-any.whl   pip-installable: container images (infra/docker/Dockerfile),
#                                            cluster venvs
#   OUT/autocdsr-VERSION-py-files.zip       the packages `autocdsr` and `pipelines` only, for
#                                            spark-submit --py-files (Spark puts .zip/.egg/.jar on the
#                                            executors' sys.path, but not .whl)
#
#   infra/build-dist.sh [OUT]                (OUT defaults to dist/ in the repository root)
#
# The sources are copied to a temporary folder first, so a build never writes into the working tree
# (no build/ or egg-info races with a parallel build), and nothing but pyproject.toml, README.md,
# autocdsr/ and pipelines/ can end up in the artifacts. Needs no network: builds with the setuptools
# of the project's Python (AUTOCDSR_PYTHON, default REPO/.venv/bin/python).
set -euo pipefail
SCRIPT=build-dist.sh
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-$REPO/dist}"

die() {
  echo "$SCRIPT: error: $*" >&2
  exit 1
}

PY="${AUTOCDSR_PYTHON:-$REPO/.venv/bin/python}"
[[ -x "$PY" ]] || PY="$(command -v python3)" || die "no Python found: run 'make venv' or set AUTOCDSR_PYTHON"
"$PY" -c 'import setuptools, sys; sys.exit(int(setuptools.__version__.split(".")[0]) < 77)' 2>/dev/null ||
  die "$PY needs setuptools>=77 to build the wheel (pip install 'setuptools>=77')"

mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
SRC="$(mktemp -d "${TMPDIR:-/tmp}/autocdsr-build.XXXXXX")"
trap 'rm -rf "$SRC"' EXIT

# Sources without caches or compiled files.
tar -C "$REPO" --exclude=__pycache__ --exclude='*.pyc' --exclude='*.egg-info' \
  -cf - pyproject.toml README.md autocdsr pipelines | tar -C "$SRC" -xf -

"$PY" -m pip wheel --quiet --no-deps --no-build-isolation --disable-pip-version-check \
  --wheel-dir "$SRC/wheel" "$SRC" >"$SRC/pip.log" 2>&1 || {
  cat "$SRC/pip.log" >&2
  die "building the wheel failed"
}
shopt -s nullglob
wheels=("$SRC"/wheel/autocdsr-*.whl)
((${#wheels[@]} == 1)) || die "expected one wheel, got: ${wheels[*]:-none}"
wheel="${wheels[0]}"
version="$(basename "$wheel" | cut -d- -f2)"

# The --py-files zip: the wheel's packages without its .dist-info (same bytes, other container name).
"$PY" - "$wheel" "$SRC/py-files.zip" <<'EOF'
import sys
import zipfile

src, dst = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(src) as whl, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as out:
    names = [n for n in whl.namelist() if n.split("/")[0] in ("autocdsr", "pipelines")]
    for top in ("autocdsr/__init__.py", "pipelines/__init__.py"):
        if top not in names:
            sys.exit(f"build-dist.sh: error: {top} missing from {src}")
    for name in names:
        out.writestr(whl.getinfo(name), whl.read(name))
EOF

rm -f "$OUT"/autocdsr-*.whl "$OUT"/autocdsr-*-py-files.zip
cp "$wheel" "$OUT/"
cp "$SRC/py-files.zip" "$OUT/autocdsr-$version-py-files.zip"
echo "$OUT/$(basename "$wheel")"
echo "$OUT/autocdsr-$version-py-files.zip"
