"""DMD2's figure on the embedded benchmark, a claim suite of ``launchers/benchmark.py`` (project.yaml
``benchmark.claims``; ``python launchers/benchmark.py dmd2_grad_conflict``).

* ``grad_conflict``: the frozen default from scratch with ``module.grad_cos_every`` on, so every
  ``every``-th iteration with a student turn logs the cosine between the DM term's and the GAN term's
  gradients on the student's parameters at each student step (common/dmd.py ``grad_cosines``, on that
  batch). This is the motivation of Flash-DMD's split (papers/flash_dmd.md section 7.8). It is a
  figure with no bar. The probe reuses the turn's keyed draws, so the run trains exactly as the
  default does.
"""
from __future__ import annotations

import csv
from pathlib import Path


def cosine_rows(run_dir: Path) -> list[dict]:
    """The logged ``student/grad_cos_k<k>`` rows of a run's metrics.csv: ``{iteration, cos: {k: value}}``
    in order, ``iteration`` the 0-based index of the iteration that logged them (its row's
    ``progress/iteration`` counts the iterations done, that one included)."""
    rows = {}
    with open(run_dir / "metrics.csv") as f:
        for r in csv.DictReader(f):
            cos = {int(k.rsplit("_k", 1)[1]): float(v) for k, v in r.items() if k.startswith("student/grad_cos_k") and v}
            if cos:
                rows.setdefault(int(float(r["progress/iteration"])) - 1, {}).update(cos)
    return [{"iteration": i, "cos": rows[i]} for i in sorted(rows)]


def grad_conflict(project, settings: dict, h):
    every = int(settings.get("every", 25))
    cfg = str(project.config.relative_to(project.dir.parents[1]))
    h.fit("grad_conflict", cfg, [f"module.grad_cos_every={every}", "trainer.log_every_n_steps=1"])
    rows = cosine_rows(h.out / "grad_conflict")
    if not rows:
        raise SystemExit("grad_conflict: the run logged no gradient cosine (student/grad_cos_k*)")
    ks = sorted({k for r in rows for k in r["cos"]})
    mean = {k: sum(r["cos"][k] for r in rows) / len(rows) for k in ks}
    lines = [f"{project.name}'s default; every {every}-th iteration with a student turn, on that turn's batch: "
             "the cosine between the DM and the GAN generator gradients at each student step k.", "",
             "| iteration | " + " | ".join(f"k = {k}" for k in ks) + " |", "|---" * (len(ks) + 1) + "|"]
    lines += [f"| {r['iteration']} | " + " | ".join(h.fmt(r["cos"].get(k), 3) for k in ks) + " |" for r in rows]
    lines += [f"| mean | " + " | ".join(f"{mean[k]:.3f}" for k in ks) + " |"]
    return {"rows": rows, "mean": mean, "table": "\n".join(lines)}, []
