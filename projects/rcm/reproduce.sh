#!/usr/bin/env bash
# rCM at paper scale (Wan2.1 T2V 1.3B, 480p). What must be on disk first is listed at the top of projects/rcm/configs/wan2.1_t2v_1.3b.yaml.
#   projects/rcm/reproduce.sh [--dry-run]   submit to SLURM (or print the sbatch script)
#   projects/rcm/reproduce.sh --local       run on this machine
#   projects/rcm/reproduce.sh embedded      the embedded MNIST benchmark behind the README's table
exec "$(dirname "$0")/../../launchers/reproduce.sh" rcm projects/rcm/configs/wan2.1_t2v_1.3b.yaml "$@"
