"""Train from a config: ``python launchers/fit.py CONFIG [key=value ...] [--dry-run]``.

The resolved config (defaults filled in, overrides applied) is saved as ``<run.dir>/config.yaml``;
``run.resume=auto`` (default) continues from the newest readable checkpoint of ``run.dir`` when there
is one, after checking that it was written by the same target, roles and teacher, and that nothing but
the run's length and bookkeeping changed (``run.resume_changes=allow`` to apply another change). A
fresh start into a directory that holds a run needs ``run.overwrite=true`` (the old run is moved to
``<run.dir>.previous-<n>``). See common/runs.py.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from _bootstrap import bootstrap

bootstrap()

from common.config import ConfigError, load_config, to_yaml  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*", help="key=value, e.g. run.iterations=100")
    ap.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(to_yaml(cfg), end="")
        return 0
    from common import runner

    try:
        trainer, module, datamodule, ckpt = runner.build(cfg)
    except (ConfigError, FileNotFoundError, ValueError) as e:  # CheckpointError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt)
    if cfg["run"]["export"] and trainer.global_rank == 0 and hasattr(module, "export"):
        path = Path(cfg["run"]["dir"]) / cfg["run"]["export"]  # an absolute export path stays as it is
        module.export(str(path))
        print(f"exported weights to {path}")
    if trainer.global_rank == 0:
        from common.validation import summary

        print(summary(cfg["run"]["dir"]), flush=True)
    runner.close_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
