#!/usr/bin/env bash
# SwiftBrush v1 at paper scale (SD 2.1-base, 65k iterations). What must be on disk first is listed at the top of projects/swiftbrush/configs/sd21_base.yaml.
#
#   projects/swiftbrush/reproduce.sh                  submit to SLURM from the config's slurm: section
#   projects/swiftbrush/reproduce.sh --dry-run        print the sbatch script only
#   projects/swiftbrush/reproduce.sh --local          run on this machine instead
#   projects/swiftbrush/reproduce.sh embedded         the embedded MNIST benchmark (the README's table)
# Further key=value overrides (and slurm.py's --array) pass through.
set -euo pipefail
cd "$(dirname "$0")/../.."
CONFIG=projects/swiftbrush/configs/sd21_base.yaml
case "${1:-}" in
  --local) shift; exec python launchers/fit.py "$CONFIG" "$@" ;;
  embedded) shift; exec python launchers/benchmark.py swiftbrush "$@" ;;
  *) exec python launchers/slurm.py "$CONFIG" "$@" ;;
esac
