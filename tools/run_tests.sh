#!/usr/bin/env bash
# Set up (or reuse) .venv, then run the whole test suite. Extra arguments go to pytest.
#
#   bash tools/run_tests.sh            # everything
#   bash tools/run_tests.sh tests/ops  # a part
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash tools/setup_env.sh
exec "$ROOT/.venv/bin/python" -m pytest -q -ra --durations=15 "$@"
