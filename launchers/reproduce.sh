#!/usr/bin/env bash
# Shared body of projects/<name>/reproduce.sh: launchers/reproduce.sh PROJECT CONFIG [ARGS...]
#   (no flag)   submit CONFIG to SLURM from its slurm: section (launchers/slurm.py; --dry-run, --array pass)
#   --local     run CONFIG on this machine (launchers/fit.py)
#   embedded    the project's embedded-benchmark suite (launchers/benchmark.py PROJECT)
# Further key=value overrides pass through.
set -euo pipefail
cd "$(dirname "$0")/.."
PROJECT=$1 CONFIG=$2
shift 2
case "${1:-}" in
  --local) shift; exec python launchers/fit.py "$CONFIG" "$@" ;;
  embedded) shift; exec python launchers/benchmark.py "$PROJECT" "$@" ;;
  *) exec python launchers/slurm.py "$CONFIG" "$@" ;;
esac
