#!/usr/bin/env bash
# Creates .venv (if missing) and installs kquant with the given extras, torch pinned to the
# local CPU wheel through constraints.txt. Usage: scripts/setup.sh job,operator,test
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-job,operator,test}"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
stamp=".venv/.kquant-installed-$(echo "$extras" | tr ',' '-')"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q -c constraints.txt -e ".[$extras]"
  touch "$stamp"
fi
