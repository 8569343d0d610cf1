"""Validation of a distillation run as a Lightning callback: sample the EMA student at the configured
step counts, measure with the metric set of the data set's protocol, save PNG grids, and at the end
write ``results.json`` with the final figures at the protocol's sample count, at the pinned sampling
seed and a second one.

The module only says how to sample (``generator_denoiser()``, ``sampler``); nothing here runs during
training steps, so the metric networks never see a training batch. A module may add figures of its own
networks on the same samples: ``sample_metrics(x, labels) -> dict`` (logged as ``val/<name>_<steps>``
for the names in ``sample_metric_names``, and written to results.json), e.g. Flash-DMD's held-out reward.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from lightning.pytorch.callbacks import Callback
from torch import Tensor


@dataclass
class ValidationConfig:
    """The config's ``validation:`` section."""

    steps: list = field(default_factory=lambda: [1])  # step counts, or lists of sampling times; []: off
    num_samples: int = 500  # in-run figures (noisier than the final ones; not on the floor's footing)
    final_seeds: list = field(default_factory=lambda: [0, 7])  # the protocol's pinned seed first, then others
    dataset: str = "mnist"  # the protocol whose metric set applies: mnist | 8gaussians | checkerboard


def steps_label(steps) -> str:
    """``4`` -> ``4step``; a time list ``[1.3, 1.0, 0.6]`` -> ``t1.3-1.0-0.6``."""
    return f"{steps}step" if isinstance(steps, int) else "t" + "-".join(f"{float(t):g}" for t in steps)


class Validation(Callback):
    def __init__(self, config: ValidationConfig, run_dir: str):
        self.cfg, self.run_dir = config, Path(run_dir)

    def _measure(self, module, steps, num_samples: int | None, seed: int | None) -> tuple[dict, Tensor]:
        from common.checkpoints import Generator
        from common.evaluation import draw
        from common.metrics import evaluator

        gen = Generator(module.generator_denoiser().eval(), module.sampler, "training", False)
        x, labels = draw(gen, steps, None, num_samples=num_samples, seed=seed)
        res = evaluator.evaluate(x, labels, self.cfg.dataset)
        extra = getattr(module, "sample_metrics", None)  # a method's own figures of the samples (not the judge's)
        return ({**res, **extra(x, labels)} if extra is not None else res), x

    def on_validation_epoch_end(self, trainer, module):
        if trainer.sanity_checking or trainer.global_rank != 0 or not self.cfg.steps:
            return
        module.log("val/iteration", float(module.iteration), rank_zero_only=True)  # the row's iteration
        for i, n in enumerate(self.cfg.steps):
            res, x = self._measure(module, n, self.cfg.num_samples, None)
            label = steps_label(n)
            keys = ("fd", "accuracy", "precision", "recall") if "fd" in res else ("swd", "modes_covered")
            keys += tuple(getattr(module, "sample_metric_names", ()))
            for k in keys:
                if k in res:  # the first step count's main figure is shown on the progress bar
                    module.log(f"val/{k}_{label}", float(res[k]), rank_zero_only=True,
                               prog_bar=(i == 0 and k == keys[0]))
            save_samples(x, self.run_dir / "samples" / f"it{module.iteration:07d}_{label}.png",
                         f"iteration {module.iteration}, {label}")

    def on_train_end(self, trainer, module):
        """Final figures on the last EMA weights under the full protocol (its sample count, so the floor
        applies), at each of ``final_seeds``: results.json, and the grid of the first seed."""
        if trainer.global_rank != 0 or not self.cfg.steps:
            return
        rows = []
        for n in self.cfg.steps:
            for j, seed in enumerate(self.cfg.final_seeds):
                res, x = self._measure(module, n, None, seed)
                rows.append({"steps": n, "seed": seed, **res})
                if j == 0:
                    save_samples(x, self.run_dir / "samples" / f"final_{steps_label(n)}.png",
                                 f"iteration {module.iteration}, {steps_label(n)}")
        path = self.run_dir / "results.json"
        tmp = path.with_name("results.json.tmp")
        tmp.write_text(json.dumps({"iteration": module.iteration, "results": rows}, indent=2))
        tmp.replace(path)


def save_samples(x: Tensor, path, title: str = "") -> Path:
    """A PNG: the first 100 images as a 10x10 grid (one column per class), or a 2-D scatter."""
    from common.images import save_grid, save_scatter

    if x.ndim == 4:
        return save_grid(x[:100], path, nrow=10)
    return save_scatter(x, path, title=title)


def summary(run_dir: str | Path) -> str:
    """The end-of-run lines: final figures (FD and its ratio to the teacher's best, accuracy, precision,
    recall) per step count and seed, and where the grids and the last checkpoint are."""
    from common.metrics import evaluator

    run_dir = Path(run_dir)
    lines = []
    res_file = run_dir / "results.json"
    res = json.loads(res_file.read_text()) if res_file.is_file() else None
    if res is not None and not res["results"]:
        lines.append(f"no final figures at iteration {res['iteration']} (validation.final_seeds is empty)")
    elif res is not None:
        best = evaluator.teacher_best()
        lines.append(f"final figures at iteration {res['iteration']} (last EMA weights, "
                     f"{res['results'][0].get('num_samples', '?')} samples):")
        for r in res["results"]:
            head = f"  {steps_label(r['steps'])}, seed {r['seed']}:"
            if "fd" in r:
                ratio = f" ({r['fd'] / best['fd']:.2f}x the teacher's best {best['fd']:.2f})" if best else ""
                acc = f", accuracy {r['accuracy']:.3f}" if "accuracy" in r else ""
                lines.append(f"{head} FD {r['fd']:.2f}{ratio}{acc}, precision {r['precision']:.3f}, "
                             f"recall {r['recall']:.3f}")
            else:
                lines.append(f"{head} SWD {r['swd']:.4f}, modes {r['modes_covered']}/{r['num_modes']}")
        grids = sorted((run_dir / "samples").glob("final_*.png"))
        lines += [f"  grid: {g}" for g in grids]
    last = run_dir / "checkpoints" / "last.ckpt"
    if last.is_file():
        lines.append(f"  checkpoint: {last}")
    return "\n".join(lines)
