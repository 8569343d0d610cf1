"""Uni-Instruct's trained discriminator head (``module.discriminator=head``, role ``discriminator``):
what each step trains, the fresh pairs of its repeated steps, and the held-out separation a run
reports."""
import dataclasses
import json

import pytest
import torch

from projects.uni_instruct.method import UniInstruct

HEAD_SCHEDULE = ["schedule.1.cycle=[[critic,discriminator,student]]",
                 "schedule.2.cycle=[[critic,discriminator,discriminator,student]]"]


def _perturbed(m, *roles):
    """Off the zero inits (the head's last layer, the DiT's gates and output): every gradient path open."""
    with torch.no_grad():
        for r in roles:
            for p in m.roles[r].net.parameters():
                p.add_(0.05 * torch.randn_like(p))


def _grads(m, role, batch, **ctx_kw):
    for r in m.roles.values():
        r.net.zero_grad(set_to_none=True)
    getattr(m, f"loss_{role}")(batch, dataclasses.replace(m.step_context(role, batch[2]), **ctx_kw)).loss.backward()
    return {r: [p.grad for p in m.roles[r].net.parameters()] for r in m.roles}


@pytest.mark.parametrize("features", ["teacher", "fake"])
def test_the_heads_step_trains_the_head_alone_and_the_critics_step_leaves_it_out(tiny_teacher, features):
    """The head's GAN loss reaches its own weights only, on the frozen teacher's features or on the
    fake score's (read, not changed); the fake score's step is its DSM loss, without the head."""
    torch.manual_seed(0)
    m = UniInstruct(teacher=tiny_teacher, discriminator="head", disc_features=features, sigma_d=0.55)
    _perturbed(m, "critic", "teacher", "discriminator")
    batch = (torch.rand(4, *m.sample_shape) * 2 - 1, torch.tensor([1, 2, 3, 4]), torch.arange(4))
    g = _grads(m, "discriminator", batch)
    assert all(p is not None and p.abs().sum() > 0 for p in g["discriminator"])
    assert all(p is None for r in ("critic", "teacher", "student") for p in g[r])
    g = _grads(m, "critic", batch)
    assert all(p is None for p in g["discriminator"])
    assert sum(p.abs().sum() for p in g["critic"] if p is not None) > 0


def test_the_generator_step_gets_the_heads_gradient_through_the_frozen_teacher(tiny_teacher):
    """With teacher features, the GAN term reaches the generator through the teacher's forward (the
    teacher's weights stay without gradient)."""
    torch.manual_seed(0)
    m = UniInstruct(teacher=tiny_teacher, discriminator="head", sigma_d=0.55, gan_weight=1.0, g_scale=0.0)
    _perturbed(m, "critic", "teacher", "student", "discriminator")
    batch = (torch.zeros(4, *m.sample_shape), torch.tensor([1, 2, 3, 4]), torch.arange(4))
    g = _grads(m, "student", batch, phase="main")  # the GAN term's phase
    assert all(p is None for p in g["teacher"])
    assert m.roles["student"].net.patch_embed.weight.grad.abs().sum() > 0


def test_each_of_the_heads_steps_in_an_iteration_draws_a_fresh_pair(tiny_teacher):
    """``[critic, discriminator, discriminator, student]``: the second step's generator samples, noise
    levels and noise differ from the first's, and each repeat draws the same again (keyed: a resumed run
    repeats them)."""
    m = UniInstruct(teacher=tiny_teacher, discriminator="head", sigma_d=0.55)
    batch = (torch.rand(4, *m.sample_shape) * 2 - 1, torch.tensor([1, 2, 3, 4]), torch.arange(4))
    ctx = lambda k: m.step_context("discriminator", batch[2], repeat=k)  # noqa: E731
    first, second, again = m._pair(batch, ctx(0)), m._pair(batch, ctx(1)), m._pair(batch, ctx(1))
    for a, b, c in zip(first[1:4], second[1:4], again[1:4]):  # x_g, n, sigma
        assert not torch.equal(a, b) and torch.equal(b, c)


def test_a_run_with_a_discriminator_reports_its_held_out_separation(tiny_teacher, tmp_path, capsys):
    """A head the schedule never steps is a config error. discriminator.json: AUC and ratio CV over
    the 1,000 held-out digits, and by band of sigma; the same figures as ``separation`` recomputed from
    the last checkpoint."""
    import fit

    from common.config import build_module
    from common.data.embedded import load_tensors
    from common.serialization import read
    from omegaconf import OmegaConf

    d = tmp_path / "run"
    args = ["projects/uni_instruct/config.yaml", f"module.teacher={tiny_teacher}", f"run.dir={d}",
            "run.iterations=3", "schedule.0.until=1", "schedule.1.until=2", "data.batch_size=4",
            "validation.steps=[]", "trainer.enable_progress_bar=false", "module.discriminator=head"]
    assert fit.main(args) == 2
    assert "the schedule never steps trainable role(s) ['discriminator']" in capsys.readouterr().err
    assert not d.exists()
    assert fit.main(args + HEAD_SCHEDULE) == 0
    res = json.loads((d / "discriminator.json").read_text())
    assert res["discriminator"] == "head" and res["n"] == 1000
    assert sum(b["n"] for b in res["bands"].values()) == 1000
    assert 0.0 <= res["auc"] <= 1.0 and res["ratio_cv"] >= 0.0
    m = build_module(OmegaConf.to_container(OmegaConf.load(d / "config.yaml")))
    m.load_state_dict(read(d / "checkpoints" / "last.ckpt")["state_dict"])
    x, y = load_tensors("mnist", "heldout")
    again = m.eval().separation(x, y)
    assert again["auc"] == pytest.approx(res["auc"], abs=1e-9)
    assert again["ratio_cv"] == pytest.approx(res["ratio_cv"], rel=1e-6)
    # 3 iterations: critic (warm-up), critic + head + student (sid), critic + 2 heads + student (main)
    steps = read(d / "checkpoints" / "last.ckpt")["global_step"]
    assert steps == 1 + 3 + 4
