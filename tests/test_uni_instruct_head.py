"""Uni-Instruct's trained discriminator head (``module.discriminator=head``): what trains it, and the
held-out separation a run reports."""
import dataclasses
import json

import pytest
import torch

from projects.uni_instruct.method import UniInstruct


def _critic_grads(m, batch):
    net = m.roles["critic"].net
    net.zero_grad(set_to_none=True)
    m.loss_critic(batch, m.step_context("critic", batch[2])).loss.backward()
    return {k: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for k, p in net.named_parameters()}


@pytest.mark.parametrize("features, detach", [("teacher", False), ("fake", True), ("fake", False)])
def test_what_the_head_loss_reaches(tiny_teacher, features, detach):
    """The head's GAN loss always trains the head. On the frozen teacher's features (the default), or
    on the fake score's with ``disc_detach`` (the default), the fake score's gradient stays that of its
    DSM loss alone; on the fake score's features without it, the GAN loss also reaches the fake score's
    layers up to the hooked block (and cannot reach those after it)."""
    torch.manual_seed(0)
    m = UniInstruct(teacher=tiny_teacher, discriminator="head", disc_features=features, disc_detach=detach,
                    sigma_d=0.55)
    with torch.no_grad():  # off the zero inits (the head's last layer, the DiT's gates and output), so
        for net in (m.roles["critic"].net, m.roles["teacher"].net):  # every gradient path is open
            for p in net.parameters():
                p.add_(0.05 * torch.randn_like(p))
    x = torch.rand(4, *m.sample_shape) * 2 - 1
    batch = (x, torch.tensor([1, 2, 3, 4]), torch.arange(4))
    both = _critic_grads(m, batch)
    m.hparams.disc_weight = 0.0
    dsm = _critic_grads(m, batch)
    head = [k for k in both if k.startswith("disc.")]
    trunk = [k for k in both if not k.startswith("disc.") and dsm[k].abs().sum() > 0]
    assert head and trunk
    assert all(both[k].abs().sum() > 0 and dsm[k].abs().sum() == 0 for k in head)
    same = {k: torch.equal(both[k], dsm[k]) for k in trunk}
    if features == "teacher" or detach:
        assert all(same.values())
    else:
        assert not same["patch_embed.weight"] and not same["blocks.0.attn.qkv.weight"] and same["out.weight"]


def test_the_generator_step_gets_the_heads_gradient_through_the_frozen_teacher(tiny_teacher):
    """With teacher features, the GAN term reaches the generator through the teacher's forward (the
    teacher's weights stay without gradient)."""
    torch.manual_seed(0)
    m = UniInstruct(teacher=tiny_teacher, discriminator="head", sigma_d=0.55, gan_weight=1.0, g_scale=0.0)
    with torch.no_grad():
        for net in (m.roles["critic"].net, m.roles["teacher"].net, m.roles["student"].net):
            for p in net.parameters():
                p.add_(0.05 * torch.randn_like(p))
    y, pos = torch.tensor([1, 2, 3, 4]), torch.arange(4)
    batch = (torch.zeros(4, *m.sample_shape), y, pos)
    ctx = dataclasses.replace(m.step_context("student", pos), phase="main")  # the GAN term's phase
    m.loss_student(batch, ctx).loss.backward()
    assert all(p.grad is None for p in m.roles["teacher"].net.parameters())
    assert m.roles["student"].net.patch_embed.weight.grad.abs().sum() > 0


def test_a_run_with_a_discriminator_reports_its_held_out_separation(tiny_teacher, tmp_path):
    """discriminator.json: AUC and ratio CV over the 1,000 held-out digits, and by band of sigma; the
    same figures as ``separation`` recomputed from the last checkpoint."""
    import fit

    from common.config import build_module
    from common.data.embedded import load_tensors
    from common.serialization import read
    from omegaconf import OmegaConf

    d = tmp_path / "run"
    assert fit.main(["projects/uni_instruct/config.yaml", f"module.teacher={tiny_teacher}", f"run.dir={d}",
                     "run.iterations=3", "schedule.0.until=1", "schedule.1.until=2", "data.batch_size=4",
                     "validation.steps=[]", "trainer.enable_progress_bar=false", "module.discriminator=head"]) == 0
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


def test_more_pairs_for_the_head_are_fresh_keyed_draws(tiny_teacher):
    """``disc_pairs: k`` gives the head k - 1 more (real, generated) pairs a sample: k - 1 different
    generator samples a position, the same ones again for the same iteration and positions (keyed, so
    a resumed run draws them again), and the head's gradient from them."""
    torch.manual_seed(0)
    m = UniInstruct(teacher=tiny_teacher, discriminator="head", disc_pairs=3, sigma_d=0.55)
    with torch.no_grad():
        m.roles["critic"].net.disc.heads[0].net[-1].weight.normal_()
    x, y, pos = torch.rand(4, *m.sample_shape) * 2 - 1, torch.tensor([1, 2, 3, 4]), torch.arange(4)
    ctx = m.step_context("critic", pos)
    real, fake = m._more_pairs(x, y, pos, ctx)
    assert real.shape == fake.shape == (8, 1)
    again = m._more_pairs(x, y, pos, m.step_context("critic", pos))
    assert torch.equal(real, again[0]) and torch.equal(fake, again[1])
    assert len(set(fake.flatten().tolist())) == 8  # 2 fresh samples per position, all different
    m.loss_critic((x, y, pos), ctx).loss.backward()
    assert m.roles["critic"].net.disc.heads[0].net[1].weight.grad.abs().sum() > 0
