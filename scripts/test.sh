#!/usr/bin/env bash
# The whole test suite.  PostgreSQL tests run when a server is reachable
# (scripts/setup.sh starts one when run as root).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
if [ -z "${BOOTHERD_TEST_PG_URL:-}" ] && command -v pg_isready >/dev/null \
    && pg_isready -q -h 127.0.0.1 2>/dev/null; then
  export BOOTHERD_TEST_PG_URL="postgresql+psycopg://bootherd:bootherd@127.0.0.1/postgres"
fi
exec "$VENV/bin/pytest" -q -p no:cacheprovider "$@"
