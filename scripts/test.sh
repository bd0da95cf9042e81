#!/usr/bin/env bash
# The test command (README command 2, and what CI runs): set up .venv, lint, check the
# import boundaries, run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh job,operator,test
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/lint-imports
.venv/bin/python -m pytest -q -ra "$@"
