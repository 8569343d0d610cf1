"""Flash-DMD's paper claims on the embedded benchmark, as claim suites of ``launchers/benchmark.py``
(listed in project.yaml under ``benchmark.claims``; ``python launchers/benchmark.py flash_dmd_<claim>``).

* ``efficiency``: the baseline's (DMD2's, frozen) and Flash-DMD's defaults from scratch, both validated
  (4 steps, the in-run sample count and seed) every 1/20 of the baseline's run. The iteration at which
  Flash-DMD's validation FD first reaches the baseline's final one, over the baseline's iterations, at
  most 1/2; the wall-clock ratio beside it (Flash-DMD's fit time up to that iteration, pro rata, over
  the baseline's whole fit; the paper: 2.1 % of DMD2's cost).
* ``rl``: Flash-DMD's default (stage 1, its config's iterations), then the joint reward fine-tuning
  (distillation running on) and the reward-only control (``rl_distill: false``), each resumed from
  the same stage-1 checkpoint for ``iterations`` more, validated (4 steps) every 1/10 of that with the
  held-out reward (the validation draws, never a training one). Gates: the joint run's reward gain at
  least half the control's; its FD at the end at most 10 % above, its recall at most 0.05 below, the
  same run's at the start of stage 2.
"""
from __future__ import annotations

from common.config import load_config
from common.project_index import projects

FOUR = [1.0, 0.75, 0.5, 0.25]


def _config(project) -> str:
    return str(project.config.relative_to(project.dir.parents[1]))


def efficiency(project, settings: dict, h):
    baseline = projects("method")[settings.get("baseline", "dmd2")]
    cfgs = {"baseline": _config(baseline), "flash": _config(project)}
    iters = {n: int(load_config(str(h.root / c))["run"]["iterations"]) for n, c in cfgs.items()}
    every = iters["baseline"] // 20
    val = [f"trainer.val_check_interval={every}", f"validation.steps=[{FOUR}]"]
    runs = {}
    for n in ("baseline", "flash"):
        fit = h.fit(f"efficiency_{n}", cfgs[n], val)
        runs[n] = {"curve": h.curve(h.out / f"efficiency_{n}", FOUR), "fit_seconds": fit[0]["fit_seconds"]}
    target = runs["baseline"]["curve"][-1]["fd"]
    hit = next((r["iteration"] for r in runs["flash"]["curve"] if r["fd"] <= target), None)
    ratio = hit / iters["baseline"] if hit is not None else float("inf")
    wall = (runs["flash"]["fit_seconds"] * hit / iters["flash"]) / runs["baseline"]["fit_seconds"] \
        if hit is not None else float("inf")
    fl = {r["iteration"]: r["fd"] for r in runs["flash"]["curve"]}
    lines = [f"In-run validation (4 steps, the config's sample count, the pinned seed) every {every} iterations; "
             f"{baseline.name}'s final validation FD {target:.2f}.", "",
             f"| iteration | {baseline.name} FD | Flash-DMD FD |", "|---|---|---|"]
    lines += [f"| {r['iteration']} | {r['fd']:.2f} | {h.fmt(fl.get(r['iteration']))} |"
              for r in runs["baseline"]["curve"]]
    lines += ["", f"Flash-DMD first at or under {target:.2f}: iteration {hit} ({h.fmt(ratio, 3)} of "
              f"{baseline.name}'s {iters['baseline']}); wall clock {h.fmt(wall, 3)} of its "
              f"{runs['baseline']['fit_seconds']:.0f} s (Flash-DMD's {runs['flash']['fit_seconds']:.0f} s for "
              f"{iters['flash']} iterations, pro rata)."]
    checks = [h.check(f"Flash-DMD iterations to {baseline.name}'s final validation FD / its iterations", ratio,
                      "<=", 0.5)]
    return {"runs": runs, "target_fd": target, "hit_iteration": hit, "iteration_ratio": ratio, "wall_ratio": wall,
            "table": "\n".join(lines)}, checks


def rl(project, settings: dict, h):
    cfg = _config(project)
    start = int(load_config(str(h.root / cfg))["run"]["iterations"])
    length = int(settings.get("iterations", start // 2))
    every = max(length // 10, 1)
    stage2 = [*settings.get("overrides", ["module.rl_mode=step_dpo"]), f"module.rl_start={start}"]
    val = [f"trainer.val_check_interval={every}", f"validation.steps=[{FOUR}]"]
    # stage 1 validated once, at its end (the start of stage 2 is the runs' first row)
    h.fit("rl_stage1", cfg, [*stage2, f"trainer.val_check_interval={start}", f"validation.steps=[{FOUR}]",
                             f"run.iterations={start}"])
    curves = {}
    for name, extra in (("joint", []), ("control", ["module.rl_distill=false"])):
        h.fit(f"rl_{name}", cfg, [*stage2, *extra, *val, f"run.iterations={start + length}"],
              resume_from=h.out / "rl_stage1")
        curves[name] = [r for r in h.curve(h.out / f"rl_{name}", FOUR) if r["iteration"] >= start]
    first, last = curves["joint"][0], curves["joint"][-1]
    gain = {n: c[-1]["reward"] - c[0]["reward"] for n, c in curves.items()}
    lines = [f"Stage 2 from iteration {start} for {length} iterations ({' '.join(stage2)}); in-run validation "
             f"(4 steps) every {every}: held-out reward (validation draws), FD, recall.", "",
             "| iteration | joint reward | joint FD | joint recall | control reward | control FD | control recall |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {a['iteration']} | {a['reward']:.3f} | {a['fd']:.2f} | {a['recall']:.3f} | {b['reward']:.3f} | "
              f"{b['fd']:.2f} | {b['recall']:.3f} |" for a, b in zip(curves["joint"], curves["control"])]
    checks = [h.check("joint reward gain / reward-only control's gain",
                      gain["joint"] / gain["control"] if gain["control"] > 0 else float("-inf"), ">=", 0.5),
              h.check("joint FD at the end / at the start of stage 2", last["fd"] / first["fd"], "<=", 1.1),
              h.check("joint recall at the end - at the start of stage 2", last["recall"] - first["recall"], ">=",
                      -0.05)]
    return {"curves": curves, "gain": gain, "table": "\n".join(lines)}, checks
