"""Quality and speed checks that are too long for the default pytest run.

  python launchers/benchmark.py teacher     the teacher's baseline table (FD, accuracy, precision,
                                            recall at 1-64 Euler steps, with and without CFG) and
                                            its acceptance figures
  python launchers/benchmark.py guidance    the CFG sweep that chose the protocol's teacher scale
  python launchers/benchmark.py toy         the 2-D toy teachers: sliced Wasserstein and mode coverage
  python launchers/benchmark.py jvp         attention JVP time and peak memory at 256, 1024, 4096 tokens
  python launchers/benchmark.py swiftbrush  reruns projects/swiftbrush/config.yaml from scratch and
                                            checks its 1-step student against the teacher's best FD,
                                            plus the fake-branch CFG, alpha_bar DSM weighting and SDS
                                            variants (reported, not gated; --presets to choose)
  python launchers/benchmark.py uni_instruct  the same for projects/uni_instruct/config.yaml (forward
                                            KL) and the reverse-KL (SiD) preset, plus the table of
                                            the five divergences and fkl with the official code's
                                            ratio (--presets to choose)

Each suite prints a Markdown table, writes ``runs/benchmark/<suite>.json`` and exits non-zero
when an acceptance figure is missed.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from _bootstrap import ROOT, bootstrap

bootstrap()

from common.checkpoints import load_generator  # noqa: E402
from common.evaluation import draw, measure  # noqa: E402
from common.images import save_grid, save_scatter  # noqa: E402
from common.metrics import evaluator  # noqa: E402

OUT = Path("runs/benchmark")


def _check(name: str, value: float, op: str, bound: float) -> dict:
    ok = value <= bound if op == "<=" else value >= bound
    return {"check": name, "value": round(value, 4), "op": op, "bound": round(bound, 4), "ok": bool(ok)}


def _fmt(v, nd=2):
    return "-" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def suite_teacher(args) -> tuple[dict, list[dict]]:
    p = evaluator.protocol("mnist")
    gen = load_generator("teacher:mnist")
    scale = p["teacher_guidance"]
    steps = args.steps or p["step_counts"]
    rows = []
    for guidance in (scale, None):
        for n in steps:
            r = measure(gen, n, guidance, progress=True)
            rows.append(r)
            print(json.dumps(r), flush=True)
    ref = evaluator.load_reference()
    guided = [r for r in rows if r["guidance"] is not None]
    best = min(guided, key=lambda r: r["fd"])
    one = next(r for r in guided if r["steps"] == min(steps))
    clf_acc = float(ref["heldout_accuracy"])
    checks = [
        _check("classifier held-out accuracy", clf_acc, ">=", 0.98),
        _check("best guided FD / real-vs-real floor", best["fd"] / float(ref["fd_floor"]), "<=", 10.0),
        _check(f"{min(steps)}-step FD / best FD", one["fd"] / best["fd"], ">=", 10.0),
        _check(f"guided accuracy at best FD ({best['steps']} steps)", best["accuracy"], ">=", 0.90),
    ]
    x, _ = draw(gen, best["steps"], scale, num_samples=100)
    grid = save_grid(x, OUT / "teacher_grid.png", nrow=10)
    lines = [f"Embedded teacher `{gen.denoiser.source['path']}` (sha256 {gen.denoiser.source['sha256'][:12]}), "
             f"{p['num_samples']} samples, seed {p['seed']}, Euler; CFG `{p['guidance_mode']}` scale {scale}.",
             f"Real-vs-real floor ({p['num_samples']} held-out digits vs the training reference): "
             f"FD {float(ref['fd_floor']):.3f}, precision {float(ref['floor_precision']):.3f}, "
             f"recall {float(ref['floor_recall']):.3f}; classifier held-out accuracy {clf_acc:.4f}.", "",
             "| steps | FD (CFG) | FD / floor | acc (CFG) | prec | recall | FD (no CFG) | acc (no CFG) |",
             "|---|---|---|---|---|---|---|---|"]
    for n in steps:
        g = next(r for r in rows if r["steps"] == n and r["guidance"] is not None)
        u = next(r for r in rows if r["steps"] == n and r["guidance"] is None)
        lines.append(f"| {n} | {g['fd']:.3f} | {g['fd_over_floor']:.2f} | {g['accuracy']:.3f} | {g['precision']:.3f} "
                     f"| {g['recall']:.3f} | {u['fd']:.3f} | {u['accuracy']:.3f} |")
    return {"rows": rows, "table": "\n".join(lines), "grid": str(grid),
            "teacher_meta": {k: v for k, v in gen.denoiser.meta.items() if k != "hparams"}}, checks


def suite_guidance(args) -> tuple[dict, list[dict]]:
    gen = load_generator("teacher:mnist")
    steps = args.steps[0] if args.steps else 16
    rows = []
    for scale in (1.0, 1.5, 2.0, 3.0):
        r = measure(gen, steps, scale, progress=True)
        rows.append(r)
        print(json.dumps(r), flush=True)
    best = min(rows, key=lambda r: r["fd"])
    lines = [f"CFG sweep (standard convention) at {steps} Euler steps; best FD at scale {best['guidance']}.", "",
             "| scale | FD | accuracy | precision | recall |", "|---|---|---|---|---|"]
    lines += [f"| {r['guidance']} | {r['fd']:.3f} | {r['accuracy']:.3f} | {r['precision']:.3f} | {r['recall']:.3f} |"
              for r in rows]
    pinned = evaluator.protocol("mnist")["teacher_guidance"]
    checks = [_check("pinned scale is the sweep's best", float(pinned == best["guidance"]), ">=", 1.0)]
    return {"rows": rows, "table": "\n".join(lines), "best_scale": best["guidance"]}, checks


def suite_toy(args) -> tuple[dict, list[dict]]:
    rows, checks = [], []
    for name in ("8gaussians", "checkerboard"):
        gen = load_generator(f"teacher:{name}")
        for n in args.steps or (1, 4, 16, 64):
            r = {"dataset": name, **measure(gen, n, None, dataset=name)}
            rows.append(r)
            print(json.dumps(r), flush=True)
        best = min((r for r in rows if r["dataset"] == name), key=lambda r: r["swd"])
        checks.append(_check(f"{name}: modes covered", best["modes_covered"], ">=", best["num_modes"]))
        checks.append(_check(f"{name}: share of points on modes", best["share_on_modes"], ">=", 0.9))
        x, _ = draw(gen, best["steps"], None)
        save_scatter(x, OUT / f"toy_{name}.png", title=f"{name} teacher, {best['steps']} Euler steps")
    lines = ["| toy | steps | SWD | modes covered | share on modes |", "|---|---|---|---|---|"]
    lines += [f"| {r['dataset']} | {r['steps']} | {r['swd']:.4f} | {r['modes_covered']}/{r['num_modes']} "
              f"| {r['share_on_modes']:.3f} |" for r in rows]
    return {"rows": rows, "table": "\n".join(lines)}, checks


def suite_jvp(args) -> tuple[dict, list[dict]]:
    """Attention JVP at batch 1, 8 heads, head dim 64, fp32: each configuration in a fresh child
    process (peak RSS above its baseline); the three methods alternate, repeated, medians taken."""
    import statistics
    import subprocess

    lengths = args.steps or (256, 1024, 4096)
    methods = ("sdpa_forward", "efficient_jvp", "math_func_jvp")
    raw = {(m, n): [] for m in methods for n in lengths}
    for _ in range(args.repeats):
        for n in lengths:
            for m in methods:
                p = subprocess.run([sys.executable, "-m", "common.kernels.bench_child", m, str(n)], cwd=ROOT,
                                   capture_output=True, text=True, check=True)
                raw[m, n].append(json.loads(p.stdout.strip().splitlines()[-1]))
    rows = []
    for n in lengths:
        med = {m: {k: statistics.median(r[k] for r in raw[m, n]) for k in ("seconds", "peak_mib")} for m in methods}
        rows.append({"n": n, **{f"{m}_{k}": round(v, 4) for m in methods for k, v in med[m].items()},
                     "time_jvp_over_sdpa": med["efficient_jvp"]["seconds"] / med["sdpa_forward"]["seconds"],
                     "time_jvp_over_math_jvp": med["efficient_jvp"]["seconds"] / med["math_func_jvp"]["seconds"],
                     "mem_jvp_over_math_jvp": med["efficient_jvp"]["peak_mib"] / max(med["math_func_jvp"]["peak_mib"], 1e-9)})
    lines = [f"Attention JVP, batch 1, 8 heads, head dim 64, fp32, median of {args.repeats} child processes per "
             "configuration (each: 1 warm-up + 3 timed calls); memory = peak RSS above the child's baseline.", "",
             "| tokens | SDPA fwd s | efficient JVP s | math func.jvp s | JVP / SDPA time | JVP / math-JVP time "
             "| SDPA MiB | efficient JVP MiB | math func.jvp MiB | JVP / math-JVP memory |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['n']} | {r['sdpa_forward_seconds']:.4f} | {r['efficient_jvp_seconds']:.4f} | "
                     f"{r['math_func_jvp_seconds']:.4f} | {r['time_jvp_over_sdpa']:.2f} | "
                     f"{r['time_jvp_over_math_jvp']:.2f} | {r['sdpa_forward_peak_mib']:.0f} | "
                     f"{r['efficient_jvp_peak_mib']:.0f} | {r['math_func_jvp_peak_mib']:.0f} | "
                     f"{r['mem_jvp_over_math_jvp']:.3f} |")
    last = rows[-1]
    checks = [_check(f"JVP time / SDPA forward at {last['n']} tokens", last["time_jvp_over_sdpa"], "<=", 3.5),
              _check(f"JVP peak memory / math func.jvp at {last['n']} tokens", last["mem_jvp_over_math_jvp"], "<=",
                     1 / 8)]
    return {"rows": rows, "table": "\n".join(lines)}, checks


FIT_BUDGET_S = 600.0  # the default distillation configs must finish in 10 minutes on the 2-core machine


def _fit(name: str, config: str, overrides: list[str], grid_to: Path | None = None) -> dict:
    """One run of ``config`` with ``overrides``, from scratch (its directory removed first); its results.json,
    timed. The final one-step grid is copied to ``grid_to`` (the project README's picture) when given."""
    run_dir = OUT / name
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, str(ROOT / "launchers" / "fit.py"), config, *overrides, f"run.dir={run_dir}"]
    print("$", " ".join(cmd[1:]), flush=True)
    t0 = time.time()
    with open(OUT / f"{name}.log", "w") as log:
        code = subprocess.call(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.time() - t0
    if code:
        raise SystemExit(f"{name}: fit failed (exit {code}); see {OUT / (name + '.log')}")
    res = json.loads((run_dir / "results.json").read_text())["results"][0]
    if grid_to is not None:
        shutil.copyfile(run_dir / "samples" / "final_1step.png", grid_to)
    return {"name": name, "overrides": overrides, "fit_seconds": round(seconds, 1), **res,
            "grid": str(run_dir / "samples" / "final_1step.png")}


def _teacher_best() -> dict:
    """The teacher's best guided FD over 1-64 steps, from ``python launchers/benchmark.py teacher``."""
    rows = json.loads((ROOT / "projects" / "teacher" / "baseline.json").read_text())["rows"]
    return min((r for r in rows if r["guidance"] is not None), key=lambda r: r["fd"])


def _student_checks(r: dict, best: dict) -> list[dict]:
    return [_check(f"{r['name']}: 1-step FD / teacher best FD ({best['fd']:.2f})", r["fd"] / best["fd"], "<=", 1.5),
            _check(f"{r['name']}: 1-step class accuracy", r["accuracy"], ">=", 0.90),
            _check(f"{r['name']}: fit wall time (s)", r["fit_seconds"], "<=", FIT_BUDGET_S)]


def _student_table(rows: list[dict], best: dict, label: str) -> str:
    lines = [f"One-step students, {rows[0]['num_samples']} samples under the pinned protocol; teacher best: "
             f"FD {best['fd']:.2f} at {best['steps']} Euler steps (CFG {best['guidance']}).", "",
             f"| {label} | FD | FD / teacher best | accuracy | precision | recall | fit time (s) |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['fd']:.2f} | {r['fd'] / best['fd']:.2f} | {r['accuracy']:.3f} | "
              f"{r['precision']:.3f} | {r['recall']:.3f} | {r['fit_seconds']:.0f} |" for r in rows]
    return "\n".join(lines)


# Each variant is one run from scratch of the project's config.yaml with these overrides; the gated ones
# must pass the F2 bars (FD / teacher best <= 1.5, accuracy >= 0.9, fit <= 600 s), the others are reported.
SWIFT_VARIANTS = {
    "default": [],
    "fake_cfg": ["module.fake_cfg=same_as_teacher"],  # the official code's guidance on the fake branch too
    "alpha_bar": ["module.fake_loss_weight=alpha_bar"],  # the official code's fake-score DSM weighting
    # SDS (eps_fake = the injected noise): no critic, so one optimizer step per iteration; same 650 iterations
    "sds": ["module.objective=sds", "module.schedule=[{until: null, cycle: [[student]]}]", "trainer.max_steps=650"],
}
# rkl runs as SiD (no GAN term, data-free): with a_f = 1 the discriminator would only add SiDA's GAN
UNI_PRESETS = {"fkl": [], "rkl": ["module.preset=rkl", "module.gan=false"], "jeffrey": ["module.preset=jeffrey"],
               "js": ["module.preset=js"], "chi2": ["module.preset=chi2"],
               "fkl_code_bce": ["module.density_ratio=code_bce"]}  # the official code's ratio (r ~ 1)
PROJECTS = {  # suite -> (variants, gated variants, README grid name per variant)
    "swiftbrush": (SWIFT_VARIANTS, ("default",), lambda v: "samples.png" if v == "default" else f"samples_{v}.png"),
    "uni_instruct": (UNI_PRESETS, ("fkl", "rkl"), lambda v: f"samples_{v}.png"),
}


def _project_suite(project: str, args) -> tuple[dict, list[dict]]:
    variants, gated, grid_name = PROJECTS[project]
    chosen = args.presets or list(variants)
    unknown = sorted(set(chosen) - set(variants))
    if unknown:
        raise SystemExit(f"{project}: unknown --presets {unknown}; choose from {sorted(variants)}")
    best = _teacher_best()
    rows, checks = [], []
    for v in chosen:
        grid = ROOT / "projects" / project / grid_name(v)
        r = _fit(f"{project}_{v}", f"projects/{project}/config.yaml", variants[v], grid)
        rows.append(r)
        print(json.dumps(r), flush=True)
        if v in gated:
            checks += _student_checks(r, best)
    return {"rows": rows, "table": _student_table(rows, best, "variant")}, checks


def suite_swiftbrush(args) -> tuple[dict, list[dict]]:
    return _project_suite("swiftbrush", args)


def suite_uni_instruct(args) -> tuple[dict, list[dict]]:
    return _project_suite("uni_instruct", args)


SUITES = {"teacher": suite_teacher, "guidance": suite_guidance, "toy": suite_toy, "jvp": suite_jvp,
          "swiftbrush": suite_swiftbrush, "uni_instruct": suite_uni_instruct}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("suites", nargs="+", choices=sorted(SUITES))
    ap.add_argument("--steps", type=int, nargs="+", default=None,
                    help="override the step counts (jvp: the sequence lengths)")
    ap.add_argument("--repeats", type=int, default=3, help="jvp: child processes per configuration")
    ap.add_argument("--presets", nargs="+", default=None,
                    help=f"swiftbrush / uni_instruct: the variants to run (default: all), from "
                         f"{sorted(SWIFT_VARIANTS)} / {sorted(UNI_PRESETS)}")
    args = ap.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    failed = []
    for name in args.suites:
        t0 = time.time()
        result, checks = SUITES[name](args)
        result.update(checks=checks, seconds=round(time.time() - t0, 1),
                      command=f"python launchers/benchmark.py {name}")
        (OUT / f"{name}.json").write_text(json.dumps(result, indent=2))
        print(f"\n## {name}\n\n{result['table']}\n")
        for c in checks:
            print(f"{'PASS' if c['ok'] else 'FAIL'}  {c['check']}: {c['value']} {c['op']} {c['bound']}")
            if not c["ok"]:
                failed.append(f"{name}: {c['check']}")
        print(f"({result['seconds']} s; wrote {OUT / (name + '.json')})")
    if failed:
        print(f"\n{len(failed)} acceptance figure(s) missed: " + "; ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
