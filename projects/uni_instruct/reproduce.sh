#!/usr/bin/env bash
# Uni-Instruct at CIFAR-10 scale (forward KL, 300 Mimg). What must be on disk first is listed at the top of projects/uni_instruct/configs/cifar10_ddpm.yaml.
#
#   projects/uni_instruct/reproduce.sh                  submit to SLURM from the config's slurm: section
#   projects/uni_instruct/reproduce.sh --dry-run        print the sbatch script only
#   projects/uni_instruct/reproduce.sh --local          run on this machine instead
#   projects/uni_instruct/reproduce.sh embedded         the embedded MNIST benchmark (the README's table)
# Further key=value overrides (and slurm.py's --array) pass through.
set -euo pipefail
cd "$(dirname "$0")/../.."
CONFIG=projects/uni_instruct/configs/cifar10_ddpm.yaml
case "${1:-}" in
  --local) shift; exec python launchers/fit.py "$CONFIG" "$@" ;;
  embedded) shift; exec python launchers/benchmark.py uni_instruct "$@" ;;
  *) exec python launchers/slurm.py "$CONFIG" "$@" ;;
esac
