#!/usr/bin/env bash
# Developer entry point: creates .venv with every package on first use, then runs one job.
#   ./dev.sh demo     the whole dispatcher on an embedded PostgreSQL, no set-up
#   ./dev.sh test     the test suite (starts its own PostgreSQL unless DISPATCHER_TEST_DSN is set)
#   ./dev.sh check    ruff and mypy --strict
#   ./dev.sh bench    the benchmarks (bench/README.md)
#   ./dev.sh shell    a shell with the venv active
set -euo pipefail
cd "$(dirname "$0")"

pick_python() {
  for py in python3.13 python3.12 python3.11 python3; do
    if command -v "$py" >/dev/null 2>&1 &&
       "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      echo "$py"; return
    fi
  done
  echo "dev.sh: error: Python 3.11 or newer is required" >&2
  exit 1
}

ensure_venv() {
  local stamp=.venv/.installed
  if [ ! -x .venv/bin/python ]; then
    "$(pick_python)" -m venv .venv
  fi
  # Reinstall only when the dependency list changed.
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/python -m pip install --quiet --upgrade pip >/dev/null
    .venv/bin/python -m pip install --quiet -e '.[dev]'
    touch "$stamp"
  fi
}

job=${1:-}
shift || true
case "$job" in
  demo)  ensure_venv; exec .venv/bin/dispatcher demo "$@" ;;
  test)  ensure_venv; exec .venv/bin/python -m pytest "$@" ;;
  check) ensure_venv; .venv/bin/ruff check . && .venv/bin/ruff format --check . && exec .venv/bin/mypy ;;
  bench) ensure_venv; exec .venv/bin/python -m bench "$@" ;;
  shell) ensure_venv; exec bash --rcfile <(echo '. ~/.bashrc 2>/dev/null; . .venv/bin/activate') ;;
  *) sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
