#!/usr/bin/env bash
# SwiftBrush v1 at paper scale (SD 2.1-base, 65k iterations). What must be on disk first is listed at the top of projects/swiftbrush/configs/sd21_base.yaml.
#   projects/swiftbrush/reproduce.sh [--dry-run]   submit to SLURM (or print the sbatch script)
#   projects/swiftbrush/reproduce.sh --local       run on this machine
#   projects/swiftbrush/reproduce.sh embedded      the embedded MNIST benchmark behind the README's table
exec "$(dirname "$0")/../../launchers/reproduce.sh" swiftbrush projects/swiftbrush/configs/sd21_base.yaml "$@"
