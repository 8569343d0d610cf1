#!/usr/bin/env bash
# SANA-Sprint at paper scale (SANA 1.6B, 1024 px). What must be on disk first is listed at the top of projects/sana_sprint/configs/sana_1.6b_1024px.yaml.
#   projects/sana_sprint/reproduce.sh [--dry-run]   submit to SLURM (or print the sbatch script)
#   projects/sana_sprint/reproduce.sh --local       run on this machine
#   projects/sana_sprint/reproduce.sh embedded      the embedded MNIST benchmark behind the README's table
exec "$(dirname "$0")/../../launchers/reproduce.sh" sana_sprint projects/sana_sprint/configs/sana_1.6b_1024px.yaml "$@"
