#!/usr/bin/env bash
# DMD2. The SDXL paper-scale config is not built yet (README): only the embedded benchmark runs.
#   projects/dmd2/reproduce.sh embedded      the embedded MNIST benchmark behind the README's table
set -euo pipefail
if [ "${1:-}" != embedded ]; then
  echo "projects/dmd2/reproduce.sh: the SDXL paper-scale config is not built yet; run 'embedded'" >&2
  exit 2
fi
shift
exec "$(dirname "$0")/../../launchers/reproduce.sh" dmd2 projects/dmd2/config.yaml embedded "$@"
