"""Quality and speed checks that are too long for the default pytest run.

  python launchers/benchmark.py teacher     the teacher's baseline table (FD, accuracy, precision,
                                            recall at 1-64 Euler steps, with and without CFG) and
                                            its acceptance figures
  python launchers/benchmark.py guidance    the CFG sweep that chose the protocol's teacher scale
  python launchers/benchmark.py toy         the 2-D toy teachers: sliced Wasserstein and mode coverage
  python launchers/benchmark.py jvp         attention JVP time and peak memory at 256, 1024, 4096 tokens
  python launchers/benchmark.py draws       the cost of the per-sample keyed random draws per iteration
  python launchers/benchmark.py tangent     the sCM tangent's cost in a student step: jvp against fd_t, fd
  python launchers/benchmark.py <method>_<claim>
                                            a paper claim a project's project.yaml lists under
                                            benchmark.claims (e.g. the efficiency of one method against
                                            another), run by the project's own function
  python launchers/benchmark.py <method>    any project whose projects/<method>/project.yaml says
                                            kind: method (swiftbrush, uni_instruct, ...): reruns its
                                            gated variants from scratch at each of its training seeds
                                            and checks the students on the last EMA weights (each step
                                            count its gates name), at the pinned and a second sampling
                                            seed (FD / teacher best, accuracy, fit time); --presets all adds
                                            the reported variants (or name the ones to run)

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
from common.project_index import projects  # noqa: E402
from common.validation import steps_label  # noqa: E402

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
        # the students' ratios use the figure recorded in protocol.yaml: it must be this baseline's
        _check("protocol.yaml teacher_best.fd vs this best FD (relative difference)",
               abs(p["teacher_best"]["fd"] - best["fd"]) / best["fd"], "<=", 1e-3),
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


def _fit(name: str, config: str, overrides: list[str], grid_to: Path | None = None,
         resume_from: Path | None = None) -> list[dict]:
    """One run of ``config`` with ``overrides``, from scratch (its directory removed first), timed; its
    results.json rows (one per step count and sampling seed, ``num_steps`` the number of sampling
    steps). The final grid of the fewest steps is copied to ``grid_to`` (the project README's picture)
    when given. ``resume_from``: start from a copy of that run directory instead (its last checkpoint;
    the overrides may change its config)."""
    run_dir = OUT / name
    shutil.rmtree(run_dir, ignore_errors=True)
    if resume_from is not None:
        shutil.copytree(resume_from, run_dir)
        (run_dir / "results.json").unlink(missing_ok=True)
        overrides = [*overrides, "run.resume_changes=allow"]
    cmd = [sys.executable, str(ROOT / "launchers" / "fit.py"), config, *overrides, f"run.dir={run_dir}",
           "trainer.enable_progress_bar=false"]
    print("$", " ".join(cmd[1:]), flush=True)
    t0 = time.time()
    with open(OUT / f"{name}.log", "w") as log:
        code = subprocess.call(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.time() - t0
    if code:
        raise SystemExit(f"{name}: fit failed (exit {code}); see {OUT / (name + '.log')}")
    rows = json.loads((run_dir / "results.json").read_text())["results"]
    def grid(steps):
        return run_dir / "samples" / f"final_{steps_label(steps)}.png"

    if grid_to is not None:
        shutil.copyfile(grid(min((r["steps"] for r in rows), key=_num_steps)), grid_to)
    return [{"name": name, "overrides": overrides, "fit_seconds": round(seconds, 1), **r,
             "num_steps": _num_steps(r["steps"]), "grid": str(grid(r["steps"]))} for r in rows]


def _num_steps(steps) -> int:
    """A validation step entry (a count, or a list of sampling times) as its number of steps."""
    return steps if isinstance(steps, int) else len(steps)


def _teacher_best() -> dict:
    """The teacher's best guided FD over 1-64 steps, recorded in the protocol by the teacher suite."""
    return evaluator.teacher_best("mnist")


def _fd_gates(gates: dict) -> dict[int, float]:
    """``fd_ratio``: one bound for the 1-step student, or ``{steps: bound}`` (e.g. ``{1: 1.5, 4: 1.2}``)."""
    g = gates["fd_ratio"]
    return {int(k): float(v) for k, v in g.items()} if isinstance(g, dict) else {1: float(g)}


def _student_checks(rows: list[dict], best: dict, gates: dict) -> list[dict]:
    """The quality gates at every gated step count and sampling seed of one fit, and its wall time once."""
    checks = []
    bounds = _fd_gates(gates)
    missing = sorted(set(bounds) - {r["num_steps"] for r in rows})
    if missing:
        raise SystemExit(f"{rows[0]['name']}: gated step count(s) {missing} were not measured (validation.steps)")
    for r in rows:
        if r["num_steps"] not in bounds:
            continue
        tag = f"{r['name']} (sampling seed {r['seed']})"
        n = r["num_steps"]
        checks += [_check(f"{tag}: {n}-step FD / teacher best FD ({best['fd']:.2f})", r["fd"] / best["fd"], "<=",
                          bounds[n]),
                   _check(f"{tag}: {n}-step class accuracy", r["accuracy"], ">=", gates["accuracy"])]
    return checks + [_check(f"{rows[0]['name']}: fit wall time (s)", rows[0]["fit_seconds"], "<=",
                            gates["fit_seconds"])]


def _student_table(rows: list[dict], best: dict, label: str) -> str:
    lines = [f"Students on the last EMA weights, {rows[0]['num_samples']} samples under the pinned "
             f"protocol at sampling seeds {sorted({r['seed'] for r in rows})}; teacher best: FD {best['fd']:.2f} "
             f"at {best['steps']} Euler steps.", "",
             f"| {label} | steps | sampling seed | FD | FD / teacher best | accuracy | precision | recall | fit time (s) |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['name']} | {steps_label(r['steps'])} | {r['seed']} | {r['fd']:.2f} | {r['fd'] / best['fd']:.2f} | "
              f"{r['accuracy']:.3f} | {r['precision']:.3f} | {r['recall']:.3f} | {r['fit_seconds']:.0f} |"
              for r in rows]
    return "\n".join(lines)


def _project_suite(project, args) -> tuple[dict, list[dict]]:
    """The project's gated variants (``--presets all``: every variant), the default (its first variant) at each
    of its training seeds and the others at the first, checked against its gates at
    ``gated_training_seeds``."""
    b = project.benchmark
    chosen = list(b.variants) if args.presets == ["all"] else (args.presets or list(b.gated))
    unknown = sorted(set(chosen) - set(b.variants))
    if unknown:
        raise SystemExit(f"{project.name}: unknown --presets {unknown}; choose from {sorted(b.variants)} or all")
    best = _teacher_best()
    rows, checks = [], []
    config = str(project.config.relative_to(ROOT))
    all_seeds, default = args.seeds or b.training_seeds, next(iter(b.variants))
    for v in chosen:
        seeds = all_seeds if v == default else all_seeds[:1]
        for seed in seeds:
            name = f"{project.name}_{v}" + (f"_seed{seed}" if seed else "")
            grid = project.dir / project.grid_name(v) if seed == b.training_seeds[0] else None
            fit = _fit(name, config, [*b.variants[v], f"run.seed={seed}"], grid)
            for r in fit:
                r.update(variant=v, training_seed=seed)
                print(json.dumps(r), flush=True)
            rows += fit
            if v in b.gated and seed in b.gated_training_seeds:
                checks += _student_checks(fit, best, b.gates)
    return {"rows": rows, "table": _student_table(rows, best, "variant (training seed)")}, checks


def suite_draws(args) -> tuple[dict, list[dict]]:
    """What the per-sample keyed draws cost per iteration at 256 samples per rank: SwiftBrush's draws (student:
    z, t, eps; critic: t, eps, label dropout) through ``StepContext``, against the same numbers of values drawn
    batch-wise from one generator (which would not be rank- or resume-invariant). Median of 20 repeats."""
    import statistics

    import torch

    from common.rng import Purpose
    from common.roles import StepContext

    shape = (1, 32, 32)
    rows = []
    for b in (32, 256):
        pos = torch.arange(b)

        def keyed():
            s, c = StepContext(0, "main", "student", pos), StepContext(0, "main", "critic", pos)
            s.randn(Purpose.LATENT, shape), s.rand(Purpose.TIME), s.randn(Purpose.NOISE, shape)
            c.rand(Purpose.TIME), c.randn(Purpose.NOISE, shape), c.rand(Purpose.DROP)

        def batched():
            g = torch.Generator().manual_seed(0)
            for sh in (shape, (), shape, (), shape, ()):
                torch.randn((b, *sh), generator=g)

        times = {}
        for name, fn in (("keyed", keyed), ("batched", batched)):
            fn()
            ts = []
            for _ in range(20):
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
            times[name] = statistics.median(ts) * 1e3
        rows.append({"samples_per_rank": b, "keyed_ms": round(times["keyed"], 3), "batched_ms": round(times["batched"], 3),
                     "overhead_ms": round(times["keyed"] - times["batched"], 3)})
    lines = ["Six draws per iteration, as a student + critic VSD method takes them (3 of 1x32x32, 3 scalars "
             "per sample), median of 20.", "",
             "| samples per rank | keyed per sample (ms) | one generator, batch-wise (ms) | overhead (ms) |",
             "|---|---|---|---|"]
    lines += [f"| {r['samples_per_rank']} | {r['keyed_ms']:.2f} | {r['batched_ms']:.2f} | {r['overhead_ms']:.2f} |"
              for r in rows]
    return {"rows": rows, "table": "\n".join(lines)}, []


def suite_tangent(args) -> tuple[dict, list[dict]]:
    """What the sCM tangent costs in a consistency student's step, side by side in one process: the
    tangent ``cos t sin t dF/dt`` of the embedded teacher seen as a TrigFlow student (``jvp`` through
    the attention-JVP kernels, or the ``fd_t`` / ``fd`` finite differences), then the grad forward and
    backward of ``F`` that every mode shares; batch 32, the modes interleaved, median of 10 (after one
    warm-up each)."""
    import statistics

    import torch

    from common import noise, scm
    from common.teachers.adapters import ConventionAdapter
    from common.teachers.embedded import load_teacher

    den = load_teacher("mnist", frozen=False)
    trig = ConventionAdapter(den, noise.TrigFlow(0.5))
    g = torch.Generator().manual_seed(0)
    b = 32
    x_t = 0.5 * torch.randn(b, 1, 32, 32, generator=g)
    t = torch.rand(b, generator=g) * 1.4 + 0.1
    y = torch.arange(b) % 10
    with torch.no_grad():
        dxdt = 0.5 * trig.predict(x_t, t, y, kind="trigflow")
    f = lambda x, tt: trig.predict(x, tt, y, kind="trigflow")  # noqa: E731

    def step(mode):
        scm.tangent(f, x_t, t, dxdt, mode)
        den.net.zero_grad(set_to_none=True)
        f(x_t, t).square().mean().backward()

    modes = ("jvp", "fd_t", "fd")
    times = {m: [] for m in modes}
    for m in modes:
        step(m)
    for _ in range(10):
        for m in modes:
            t0 = time.perf_counter()
            step(m)
            times[m].append(time.perf_counter() - t0)
    med = {m: statistics.median(v) for m, v in times.items()}
    rows = [{"mode": m, "median_s": round(med[m], 4), "vs_fd": round(med[m] / med["fd"], 3)} for m in modes]
    lines = [f"The sCM tangent plus the shared grad forward/backward of F, embedded DiT, batch {b}, CPU threads "
             f"{torch.get_num_threads()}, median of 10, interleaved.", "",
             "| tangent | time (s) | / fd |", "|---|---|---|"]
    lines += [f"| {r['mode']} | {r['median_s']:.3f} | {r['vs_fd']:.2f} |" for r in rows]
    its = _iteration_cost(("jvp", "fd"))
    lines += ["", "A whole training iteration of each project's default config (every role of one schedule cycle "
              "after the warm-up: loss, backward), batch 32, median of 5, interleaved.", "",
              "| project | tangent | iteration (s) | / fd |", "|---|---|---|---|"]
    lines += [f"| {r['project']} | {r['mode']} | {r['median_s']:.3f} | {r['vs_fd']:.2f} |" for r in its]
    return {"rows": rows, "iterations": its, "table": "\n".join(lines)}, []


def _iteration_cost(modes, repeats: int = 5) -> list[dict]:
    """Seconds per training iteration of each method project whose config has a ``module.tangent``,
    with each tangent mode: one module per mode from the project's config (``module.tangent``
    overridden), every role of the main phase's cycle stepped once (its loss and backward) at an
    iteration after the warm-up, on one batch of embedded digits."""
    import dataclasses
    import statistics

    import torch

    from common.config import build_module, load_config
    from common.data.embedded import load_tensors

    x, y = load_tensors("mnist", "train")
    batch = (x[:32], y[:32], torch.arange(32))
    rows = []
    for name, project in sorted(projects("method").items()):
        cfg_path = project.config
        if "tangent" not in load_config(cfg_path).get("module", {}):
            continue
        mods = {m: build_module(load_config(cfg_path, [f"module.tangent={m}"])) for m in modes}
        m0 = mods[modes[0]]  # the tangent warm-up counts from the end of a dense phase, when there is one
        it = max(m0.schedule.phases[-2].until if len(m0.schedule.phases) > 1 else 0,
                 getattr(m0, "dense_until", 0) + m0.hparams.tangent_warmup) + 1
        cycle = [r for group in m0.schedule.phases[-1].cycle for r in group]

        def step(m):
            for role in cycle:
                ctx = dataclasses.replace(m.step_context(role, batch[2]), iteration=it,
                                          phase=m.schedule.phases[-1].name)
                m.zero_grad(set_to_none=True)
                getattr(m, f"loss_{role}")(batch, ctx).loss.backward()

        times = {m: [] for m in modes}
        for m in modes:
            step(mods[m])
        for _ in range(repeats):
            for m in modes:
                t0 = time.perf_counter()
                step(mods[m])
                times[m].append(time.perf_counter() - t0)
        med = {m: statistics.median(v) for m, v in times.items()}
        rows += [{"project": name, "mode": m, "median_s": round(med[m], 4), "vs_fd": round(med[m] / med["fd"], 3)}
                 for m in modes]
    return rows


def _val_curve(run_dir: Path, steps) -> list[dict]:
    """The in-run validation rows of a run's metrics.csv at one step count: ``{iteration, fd, recall,
    ...}`` in order (the method's own figures, e.g. ``reward``, included)."""
    import csv

    label = steps_label(steps)
    out = []
    with open(run_dir / "metrics.csv") as f:
        for r in csv.DictReader(f):
            if r.get(f"val/fd_{label}"):
                out.append({"iteration": int(float(r["val/iteration"])),
                            **{k[4:-len(label) - 1]: float(v) for k, v in r.items()
                               if k.startswith("val/") and k.endswith(f"_{label}") and v}})
    return out


SUITES = {"teacher": suite_teacher, "guidance": suite_guidance, "toy": suite_toy, "jvp": suite_jvp,
          "draws": suite_draws, "tangent": suite_tangent}


def claim_suites() -> dict:
    """A method project's claim suites, ``<project>_<claim>`` for each entry of its project.yaml
    ``benchmark.claims``: ``{suite: "module:function", ...settings}``; the function gets the project,
    the settings and this launcher's helpers (``fit``, ``curve``, ``check``, ``fmt``, ``out``, ``root``) and
    returns ``(result with a table, checks)`` like any suite."""
    import importlib
    from types import SimpleNamespace

    helpers = SimpleNamespace(fit=_fit, curve=_val_curve, check=_check, fmt=_fmt, out=OUT, root=ROOT)
    suites = {}
    for name, project in projects("method").items():
        for claim, settings in project.benchmark.claims.items():
            module, fn = settings["suite"].split(":")

            def run(args, project=project, settings=settings, module=module, fn=fn):
                return getattr(importlib.import_module(module), fn)(project, settings, helpers)

            suites[f"{name}_{claim}"] = run
    return suites


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    methods = projects("method")
    suites = {**SUITES, **claim_suites()}
    ap.add_argument("suites", nargs="+", choices=sorted(suites) + sorted(methods))
    ap.add_argument("--steps", type=int, nargs="+", default=None,
                    help="override the step counts (jvp: the sequence lengths)")
    ap.add_argument("--repeats", type=int, default=3, help="jvp: child processes per configuration")
    ap.add_argument("--presets", nargs="+", default=None,
                    help="method suites: the variants to run (default: the gated ones; 'all': every "
                         "variant in the project's project.yaml)")
    ap.add_argument("--seeds", type=int, nargs="+", default=None,
                    help="method suites: the training seeds (default: the project's training_seeds)")
    args = ap.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    failed = []
    for name in args.suites:
        t0 = time.time()
        result, checks = suites[name](args) if name in suites else _project_suite(methods[name], args)
        result.update(checks=checks, seconds=round(time.time() - t0, 1),
                      command=f"python launchers/benchmark.py {name}")
        tag = name + "".join(f"_{k}-{'-'.join(map(str, getattr(args, k)))}" for k in ("presets", "seeds")
                             if name not in suites and getattr(args, k))
        (OUT / f"{tag}.json").write_text(json.dumps(result, indent=2))
        print(f"\n## {name}\n\n{result['table']}\n")
        for c in checks:
            print(f"{'PASS' if c['ok'] else 'FAIL'}  {c['check']}: {c['value']} {c['op']} {c['bound']}")
            if not c["ok"]:
                failed.append(f"{name}: {c['check']}")
        print(f"({result['seconds']} s; wrote {OUT / (tag + '.json')})")
    if failed:
        print(f"\n{len(failed)} acceptance figure(s) missed: " + "; ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
