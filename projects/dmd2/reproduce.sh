#!/usr/bin/env bash
# DMD2 at paper scale (SDXL-base, 4 steps). What must be on disk first is listed at the top of projects/dmd2/configs/sdxl_4step.yaml.
#   projects/dmd2/reproduce.sh [--dry-run]   submit to SLURM (or print the sbatch script)
#   projects/dmd2/reproduce.sh --local       run on this machine
#   projects/dmd2/reproduce.sh embedded      the embedded MNIST benchmark behind the README's table
exec "$(dirname "$0")/../../launchers/reproduce.sh" dmd2 projects/dmd2/configs/sdxl_4step.yaml "$@"
