"""Measure quality under the pinned protocol (common/metrics/protocol.yaml) and write the figures as JSON.

  python launchers/evaluate.py teacher:mnist --steps 1 4 16 --out runs/eval/results.json
  python launchers/evaluate.py runs/rcm/config/checkpoints/last.ckpt --times 1.5708,1.3,1.0,0.6 --seed 7   (a few-step
      student at the listed times, from pi/2 down: one comma-separated list per sampler)
  python launchers/evaluate.py runs/swiftbrush/config/checkpoints/last.ckpt --steps 1   (-> runs/swiftbrush/config/eval/last-steps1-n1000-nocfg.json)
  python launchers/evaluate.py runs/sana_sprint/config/checkpoints/last.ckpt --raw --steps 1   (the raw student
      weights, not the EMA that runs sample: -> .../eval/last-raw-steps1-n1000-nocfg.json)
  python launchers/evaluate.py runs/sana_sprint/config/checkpoints/last.ckpt --set module.guidance_sample=1.25
      (how the checkpoint's module samples: the student's guidance input; only module.* keys)
  python launchers/evaluate.py --samples runs/x/samples.npz          (images and labels in an .npz)
  python launchers/evaluate.py --build-reference                     (after retraining the classifier)

Teachers are guided with the protocol's scale unless ``--guidance`` (a scale) or ``--no-guidance``
is given; students (``multistep`` samplers) are unguided by default.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from _bootstrap import bootstrap

bootstrap()

import numpy as np  # noqa: E402
import torch  # noqa: E402

from common.checkpoints import load_generator  # noqa: E402
from common.evaluation import check_request, default_guidance, measure  # noqa: E402
from common.metrics import evaluator  # noqa: E402
from common.validation import steps_label  # noqa: E402


def default_out(checkpoint: str, steps: list, num_samples: int, guidance: float | None,
                seed: int | None = None, raw: bool = False, sets: tuple | list = ()) -> Path:
    """``<run>/eval/<checkpoint>-steps1-4-n1000-cfg1.5.json``: a name that carries the settings, beside
    the run's own results.json (never over it); teachers under runs/eval/."""
    cfg = "nocfg" if guidance is None else f"cfg{guidance:g}"
    if checkpoint.startswith("teacher:"):
        where, stem = Path("runs/eval"), checkpoint.replace(":", "_")
    else:
        ck = Path(checkpoint)
        where, stem = (ck.parent.parent if ck.suffix == ".ckpt" else ck.parent) / "eval", ck.stem
    label = "-".join(str(n) if isinstance(n, int) else steps_label(n) for n in steps)
    stem += ("-raw" if raw else "") + "".join(f"-{o.partition('.')[2]}" for o in sets)
    return where / f"{stem}-steps{label}-n{num_samples}-{cfg}{'' if seed is None else f'-seed{seed}'}.json"


def time_list(text: str) -> list[float]:
    """``"1.5708,1.3,1.0,0.6"`` -> the sampling times of a few-step sampler."""
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--times takes comma-separated numbers, got {text!r}") from None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", nargs="?", help="teacher:<name>, a weights .pt or a run .ckpt")
    ap.add_argument("--steps", type=int, nargs="+", default=None, help="step counts (default: protocol's)")
    ap.add_argument("--times", type=time_list, nargs="+", default=None,
                    help="sampling-time lists of a few-step student, each comma-separated (after --steps)")
    ap.add_argument("--seed", type=int, default=None, help="sampling seed (default: the protocol's)")
    ap.add_argument("--raw", action="store_true", help="a run checkpoint's raw student weights, not its EMA")
    ap.add_argument("--set", nargs="+", default=[], metavar="module.KEY=VALUE",
                    help="change how a run checkpoint's module samples, e.g. module.guidance_sample=1.25")
    ap.add_argument("--guidance", type=float, default=None)
    ap.add_argument("--guidance-mode", default=None, choices=["standard", "offset"])
    ap.add_argument("--no-guidance", action="store_true")
    ap.add_argument("--sampler", default=None, help="euler, heun or multistep (default: the model's)")
    ap.add_argument("--num-samples", type=int, default=None, help="default: the protocol's (changes the floor!)")
    ap.add_argument("--dataset", default="mnist", help="for 2-D toys: 8gaussians or checkerboard")
    ap.add_argument("--samples", help="evaluate an .npz with 'images' (N,1,32,32 in [-1,1]) and 'labels'")
    ap.add_argument("--build-reference", action="store_true")
    ap.add_argument("--out", default=None, help="results path (default: <run>/eval/<checkpoint>-<settings>.json; "
                                                "a run's own results.json is never overwritten)")
    args = ap.parse_args(argv)

    try:
        if args.build_reference:
            print(json.dumps(evaluator.build_reference(), indent=2))
            return 0
        if args.samples:
            if not Path(args.samples).is_file():
                raise FileNotFoundError(f"samples file not found: {args.samples}")
            if args.num_samples is not None or args.steps:
                raise ValueError("--num-samples and --steps apply to a checkpoint, not to --samples")
            d = np.load(args.samples)
            res = evaluator.evaluate_images(torch.from_numpy(d["images"]).float(),
                                            torch.from_numpy(d["labels"]) if "labels" in d else None)
            results = {"source": args.samples, "results": [res]}
            out = Path(args.out or Path(args.samples).with_suffix(".results.json"))
        else:
            if not args.checkpoint:
                ap.error("give a checkpoint, --samples or --build-reference")
            note = check_request(args.steps, args.num_samples, args.dataset)
            if note:
                print(note, file=sys.stderr)
            gen = load_generator(args.checkpoint, raw=args.raw, overrides=args.set)
            p = evaluator.protocol("mnist")
            if args.no_guidance:
                guidance = None
            elif args.guidance is not None:
                guidance = args.guidance
            else:
                guidance = default_guidance(gen)
            mode = args.guidance_mode or p["guidance_mode"]
            steps = (args.steps or ([] if args.times else p["step_counts"])) + (args.times or [])
            rows = []
            for n in steps:
                r = measure(gen, n, guidance, dataset=args.dataset, mode=mode, sampler=args.sampler,
                            num_samples=args.num_samples, seed=args.seed, progress=True)
                rows.append(r)
                print(json.dumps(r))
            results = {"source": args.checkpoint, "guidance_mode": mode, "seed": p["seed"] if args.seed is None
                       else args.seed, "results": rows}
            out = Path(args.out) if args.out else default_out(args.checkpoint, steps, args.num_samples or
                                                              p["num_samples"], guidance, args.seed, args.raw, args.set)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=2))
    tmp.replace(out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
