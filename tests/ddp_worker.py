"""One rank of the 2-process gloo runs of tests/test_ddp.py (started by torch.distributed.run): a toy
two-role distillation module in which only ``--nan-rank`` sees a non-finite student loss at
``--nan-at``. Each rank writes what it did to ``<out>/rank<r>.json``."""
import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import lightning as L  # noqa: E402
import torch  # noqa: E402

from common.runner import RunLength, close_process_group, max_steps  # noqa: E402
from test_module import Recorder, Stream  # noqa: E402


class OneRankNaN(Recorder):
    def __init__(self, nan_rank, nan_at, **kw):
        super().__init__({"student": "full", "critic": "full"}, schedule=[{"cycle": [["student", "critic"]]}], **kw)
        self.nan_rank, self.nan_at_it = nan_rank, nan_at

    def loss_student(self, batch, ctx):
        step = super().loss_student(batch, ctx)
        # the ranks' gradients differ in direction: equal weights afterwards need synced gradients
        step.loss = step.loss + 0.1 * self.global_rank * sum(p.sum() for p in self.roles["student"].net.parameters())
        if ctx.iteration == self.nan_at_it and self.global_rank == self.nan_rank:
            step.loss = step.loss * float("nan")
        return step


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--nan-rank", type=int, default=1)
    ap.add_argument("--nan-at", type=int, default=2)
    ap.add_argument("--iterations", type=int, default=5)
    a = ap.parse_args()
    torch.set_num_threads(1)
    m = OneRankNaN(a.nan_rank, a.nan_at)
    cfg = {"run": {"iterations": a.iterations}, "data": {"batch_size": 8}}
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_find_unused_parameters_true", max_steps=max_steps(cfg, m), logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False, callbacks=[RunLength(cfg)])
    trainer.fit(m, datamodule=Stream())
    rank = trainer.global_rank
    params = torch.cat([p.detach().flatten() for p in m.roles["student"].net.parameters()])
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / f"rank{rank}.json").write_text(json.dumps({
        "rank": rank, "world": trainer.world_size, "skipped": m.nonfinite["skipped"], "iteration": m.iteration,
        "global_step": trainer.global_step, "ema_step": int(m.ema.step.item()), "params": params.tolist(),
        "pid": os.getpid()}))
    close_process_group()


if __name__ == "__main__":
    main()
