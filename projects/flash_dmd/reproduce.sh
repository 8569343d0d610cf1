#!/usr/bin/env bash
# Flash-DMD at paper scale. What must be on disk first is listed at the top of each config.
#   projects/flash_dmd/reproduce.sh [--dry-run]            SDXL-base, 4 steps: submit to SLURM (or print the sbatch script)
#   projects/flash_dmd/reproduce.sh --local                run it on this machine
#   CONFIG=projects/flash_dmd/configs/sd3_medium_4step.yaml projects/flash_dmd/reproduce.sh [...]   the SD3-Medium flow variant
#   projects/flash_dmd/reproduce.sh embedded               the embedded MNIST benchmark behind the README's table
exec "$(dirname "$0")/../../launchers/reproduce.sh" flash_dmd "${CONFIG:-projects/flash_dmd/configs/sdxl_4step.yaml}" "$@"
