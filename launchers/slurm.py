"""Submit a config to SLURM: ``python launchers/slurm.py CONFIG [key=value ...] [--array KEY=V1,V2 ...] [--dry-run]``.

Writes ``<run.dir>/slurm/submit.sh`` from the config's ``slurm:`` section and submits it with
``sbatch``. Every task runs ``srun python launchers/fit.py CONFIG ...`` with ``--ntasks-per-node``
tasks per node (Lightning's SLURMEnvironment reads them; DDP over NCCL on GPUs, gloo on CPUs).
``--array`` takes one or more ``key=v1,v2,...``; their product gives one array task per
combination, each with its own run directory ``<run.dir>/<key=value,...>``, resolved config and
log ``<run.dir>/slurm/<job>_<task>.out``.

Preemption: the job asks for ``SIGUSR1`` before its time limit and is requeueable; on the signal
Lightning's SLURMEnvironment writes an ``hpc_ckpt`` (atomically, through the run's checkpoint IO)
and requeues the job, which resumes from the newest checkpoint of its run directory.
"""
from __future__ import annotations

import argparse
import itertools
import shlex
import subprocess
import sys
from pathlib import Path

from _bootstrap import ROOT, bootstrap

bootstrap()

from common.config import ConfigError, load_config  # noqa: E402


def parse_array(specs: list[str]) -> list[list[str]]:
    """``["module.seed=0,1", "module.lr=1e-3,1e-4"]`` -> one override list per combination."""
    axes = []
    for spec in specs:
        key, eq, values = spec.partition("=")
        if not eq or not values:
            raise ConfigError(f"--array {spec!r} is not of the form key=v1,v2,...")
        axes.append([f"{key}={v}" for v in values.split(",")])
    return [list(c) for c in itertools.product(*axes)] if axes else [[]]


def task_dir(base: Path, overrides: list[str]) -> Path:
    name = ",".join(o.split(".")[-1] for o in overrides) or "task0"
    return base / name.replace("/", "_")


def render(cfg_path: str, overrides: list[str], cfg: dict, tasks: list[list[str]], run_base: Path,
           python: str = sys.executable) -> str:
    s = cfg["slurm"]
    n_tasks = len(tasks)
    log_dir = run_base / "slurm"
    lines = ["#!/bin/bash",
             f"#SBATCH --job-name={run_base.parent.name}-{run_base.name}",
             f"#SBATCH --nodes={s['nodes']}",
             f"#SBATCH --ntasks-per-node={s['ntasks_per_node']}",
             f"#SBATCH --cpus-per-task={s['cpus_per_task']}",
             f"#SBATCH --time={s['time']}",
             f"#SBATCH --output={log_dir}/%x_%A_%a.out" if n_tasks > 1 else f"#SBATCH --output={log_dir}/%x_%j.out",
             "#SBATCH --signal=USR1@90",
             "#SBATCH --requeue",
             "#SBATCH --open-mode=append"]
    if s["gpus_per_node"]:
        lines.append(f"#SBATCH --gpus-per-node={s['gpus_per_node']}")
    if s["mem"]:
        lines.append(f"#SBATCH --mem={s['mem']}")
    if s["partition"]:
        lines.append(f"#SBATCH --partition={s['partition']}")
    if s["account"]:
        lines.append(f"#SBATCH --account={s['account']}")
    if n_tasks > 1:
        lines.append(f"#SBATCH --array=0-{n_tasks - 1}")
    lines += [f"#SBATCH {x}" for x in s["extra"]]
    lines += ["set -euo pipefail", *s["setup"], f"cd {shlex.quote(str(ROOT))}", "case \"${SLURM_ARRAY_TASK_ID:-0}\" in"]
    world = ["trainer.num_nodes=" + str(s["nodes"]), "trainer.devices=" + str(s["ntasks_per_node"])]
    if s["nodes"] * s["ntasks_per_node"] > 1:
        world.append("trainer.strategy=ddp")
    if s["gpus_per_node"]:
        world.append("trainer.accelerator=gpu")
    for k, extra in enumerate(tasks):
        args = [*overrides, *extra, *world, f"run.dir={task_dir(run_base, extra) if n_tasks > 1 else run_base}"]
        lines.append(f"  {k}) ARGS=({' '.join(shlex.quote(a) for a in args)}) ;;")
    lines += ["  *) echo \"no such array task: ${SLURM_ARRAY_TASK_ID}\" >&2; exit 2 ;;", "esac",
              f"srun {shlex.quote(python)} launchers/fit.py {shlex.quote(cfg_path)} \"${{ARGS[@]}}\""]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--array", nargs="+", default=[], metavar="KEY=V1,V2", help="one array task per combination")
    ap.add_argument("--dry-run", action="store_true", help="print the sbatch script, submit nothing")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        tasks = parse_array(args.array)
        for extra in tasks:  # every task's config must validate before anything is submitted
            load_config(args.config, [*args.overrides, *extra])
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    run_base = Path(cfg["run"]["dir"]).resolve()
    script = render(args.config, args.overrides, cfg, tasks, run_base)
    if args.dry_run:
        print(script, end="")
        return 0
    (run_base / "slurm").mkdir(parents=True, exist_ok=True)
    path = run_base / "slurm" / "submit.sh"
    path.write_text(script)
    p = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True)
    if p.returncode:
        print(f"error: sbatch failed: {p.stderr.strip()}", file=sys.stderr)
        return p.returncode
    job = p.stdout.strip().split(";")[0]
    print(f"submitted job {job}: {path} ({len(tasks)} task(s)); logs in {run_base / 'slurm'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
