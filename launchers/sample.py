"""Draw samples: ``python launchers/sample.py CHECKPOINT --steps 4 --out runs/samples/x`` writes
``x.png`` (a grid, one column per class) and ``x.npz`` (images in [-1, 1] and labels).

CHECKPOINT is ``teacher:<name>``, a weights .pt or a run .ckpt (see common/checkpoints.py).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from _bootstrap import bootstrap

bootstrap()

import numpy as np  # noqa: E402

from common.checkpoints import load_generator  # noqa: E402
from common.evaluation import check_request, default_guidance, draw, is_image_model  # noqa: E402
from common.images import save_grid, save_scatter  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--num-samples", type=int, default=100)
    ap.add_argument("--guidance", type=float, default=None, help="CFG scale (default: protocol's for teachers)")
    ap.add_argument("--no-guidance", action="store_true")
    ap.add_argument("--guidance-mode", default="standard", choices=["standard", "offset"])
    ap.add_argument("--sampler", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/samples/samples", help="output path without extension")
    args = ap.parse_args(argv)
    try:
        check_request([args.steps], args.num_samples, minimum=1)
        gen = load_generator(args.checkpoint)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    guidance = None if args.no_guidance else (args.guidance if args.guidance is not None else default_guidance(gen))
    x, labels = draw(gen, args.steps, guidance, num_samples=args.num_samples, seed=args.seed,
                     mode=args.guidance_mode, sampler=args.sampler, progress=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if is_image_model(gen.denoiser):
        save_grid(x, out.with_suffix(".png"), nrow=gen.denoiser.net.num_classes)
        np.savez(out.with_suffix(".npz"), images=x.numpy(), labels=labels.numpy())
    else:
        save_scatter(x, out.with_suffix(".png"), title=f"{args.checkpoint} {args.steps} steps")
        np.savez(out.with_suffix(".npz"), points=x.numpy())
    print(f"wrote {out.with_suffix('.png')} and {out.with_suffix('.npz')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
