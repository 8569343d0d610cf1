"""``python tests/fault_worker.py FAULT ITERATION CONFIG [overrides ...]``: ``launchers/fit.py``, killed
with SIGKILL by itself at one point of iteration ITERATION (tests/test_runs.py):

  step        inside the iteration, after its first role's optimizer step and before the next role's
  checkpoint  while the checkpoint of that iteration is being written (half of the file on disk)
  validation  while the in-run validation after that iteration is measuring
"""
import os
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "launchers")]


def die():
    sys.stdout.flush(), sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def main():
    fault, at, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    import fit  # noqa: E402 - after the path set-up

    from common import runner, validation
    from common.module import DistillationModule

    if fault == "step":
        original = DistillationModule._optimize
        done = []

        def optimize(self, name, ctx, batch):
            if self.iteration == at and done:
                die()
            out = original(self, name, ctx, batch)
            if self.iteration == at:
                done.append(name)
            return out

        DistillationModule._optimize = optimize
    elif fault == "checkpoint":
        original = runner.AtomicCheckpointIO.save_checkpoint

        def save(self, checkpoint, path, storage_options=None):
            if checkpoint.get("distill", {}).get("iteration") == at:
                tmp = Path(path).with_name(Path(path).name + ".tmp")
                original(self, checkpoint, tmp.with_name("whole.tmp"))
                data = tmp.with_name("whole.tmp").read_bytes()
                tmp.write_bytes(data[: len(data) // 2])  # the write is cut half-way
                tmp.with_name("whole.tmp").unlink()
                die()
            return original(self, checkpoint, path, storage_options)

        runner.AtomicCheckpointIO.save_checkpoint = save
    elif fault == "validation":
        original = validation.Validation._measure

        def measure(self, module, steps, num_samples, seed):
            if module.iteration == at:
                die()
            return original(self, module, steps, num_samples, seed)

        validation.Validation._measure = measure
    else:
        raise SystemExit(f"unknown fault {fault!r}")
    sys.exit(fit.main(argv))


if __name__ == "__main__":
    main()
