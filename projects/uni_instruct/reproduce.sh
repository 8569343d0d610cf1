#!/usr/bin/env bash
# Uni-Instruct at CIFAR-10 scale (forward KL, 300 Mimg). What must be on disk first is listed at the top of projects/uni_instruct/configs/cifar10_ddpm.yaml.
#   projects/uni_instruct/reproduce.sh [--dry-run]   submit to SLURM (or print the sbatch script)
#   projects/uni_instruct/reproduce.sh --local       run on this machine
#   projects/uni_instruct/reproduce.sh embedded      the embedded MNIST benchmark behind the README's table
exec "$(dirname "$0")/../../launchers/reproduce.sh" uni_instruct projects/uni_instruct/configs/cifar10_ddpm.yaml "$@"
