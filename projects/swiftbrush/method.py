"""SwiftBrush (v1): image-free one-step distillation by variational score distillation (VSD)
with a LoRA fake score (papers/swiftbrush.md); ``roles.critic.init: copy`` is the spec's small-scale
alternative, a full copy of the teacher.

Per iteration, on one batch of labels (no image is ever read): a student step, then a fake-score
step on the same student samples (1:1).

With the embedded flow teacher the student is a one-step generator in the teacher's own
parameterisation at pure noise, ``x0 = z - u_theta(z, s=1, c)``, initialised from the teacher; the
VSD weight is ``b^2 = s^2`` and the VP timestep range [20, 980] maps to ``s in [s_min, s_max]``
(default [0.02, 0.98]).
"""
from __future__ import annotations

from typing import Literal

import torch

from common import noise
from common.config import ConfigError
from common.critics.dsm import DSMWeighting
from common.critics.lora import adapters_disabled
from common.one_step import OneStepDistillation
from common.rng import Purpose
from common.roles import RoleStep
from common.teachers.denoiser import CFGMode, Guided
from common.teachers.hub import load_null_embedding
from projects.swiftbrush.losses import fake_score_loss, vsd_generator_loss


class SwiftBrush(OneStepDistillation):
    def __init__(self, teacher: str = "mnist", guidance: float = 2.0, guidance_mode: CFGMode = "standard",
                 objective: Literal["vsd", "sds"] = "vsd", fake_cfg: Literal["none", "same_as_teacher"] = "none",
                 fake_loss_weight: DSMWeighting = "uniform",
                 s_min: float = 0.02, s_max: float = 0.98, label_dropout: float = 0.1,
                 student_time: float | None = None, null_embedding: str | None = None, **base):
        super().__init__(**base)
        self.save_hyperparameters()
        sds = objective == "sds"  # SDS: the injected noise stands in for the fake score; no critic role
        if sds and self._schedule is not None and "critic" in self._schedule.roles():
            raise ConfigError("objective=sds has no critic: set schedule=[{name: main, cycle: [[student]]}]")
        den = self.add_teacher_roles(teacher, critic=not sds)
        if null_embedding is not None:  # text teachers: the empty prompt's embedding, from the prompt file
            den.null_embedding = load_null_embedding(null_embedding)
        conv = den.convention
        self.noise_convention = conv
        self.t_g = float(conv.t_noise if student_time is None else student_time)  # the student's one time
        self.den.teacher, self.den.student = den, den.with_net(self.roles["student"].net)
        self.den.fake = None if sds else den.with_net(self.roles["critic"].net)

    def _time(self, u, lo, hi):
        """A time at the fractions [lo, hi] of the teacher's axis: ``t ~ U{lo T..hi T}`` for a discrete
        VP teacher (the paper's [20, 980] of 1000 steps), ``s ~ U[lo, hi]`` for a flow teacher."""
        conv = self.den.teacher.convention
        if isinstance(conv, noise.DiscreteVP):
            a, b = round(lo * conv.num_steps), min(round(hi * conv.num_steps), conv.num_steps - 1)
            return torch.floor(a + u * (b - a + 1)).clamp(max=b)
        return lo + (hi - lo) * u

    def _teacher_call(self, x, s, c):
        den = Guided(self.den.teacher, self.hparams.guidance, self.hparams.guidance_mode)
        if self.den.fake is not None and self.roles["critic"].init == "lora":  # LoRA on the teacher's own net
            with adapters_disabled(self.roles["teacher"].net):
                return den.x0_eps(x, s, c)
        return den.x0_eps(x, s, c)

    def generate(self, z, c, net=None):
        """One step from pure noise at the teacher's last time, in the teacher's parameterisation: VP
        ``x0 = (z - sigma_T eps(z, T, c)) / alpha_T``, flow ``x0 = z - u(z, 1, c)``. ``student_time``
        below the last time feeds ``x = z b(t_g) / b(T)`` (an extension, not the paper's form)."""
        den = self.den.student if net is None else self.den.teacher.with_net(net)
        conv = den.convention
        t = torch.full((len(z),), self.t_g, device=z.device)
        scale = float(conv.level(t[:1].double()).b / conv.level(torch.tensor([float(conv.t_noise)])).b)
        return den.predict(z * scale, t, c, "x0")

    # ---------------------------------------------------------------- steps (algorithm box, section 4)
    def loss_student(self, batch, ctx):
        c, _ = batch
        h = self.hparams
        x0 = self.generate(ctx.randn(Purpose.LATENT, self.sample_shape), c)  # 1. student sample, with grad
        s = self._time(ctx.rand(Purpose.TIME), h.s_min, h.s_max)  # 2. t ~ U[t_min, t_max]
        eps = ctx.randn(Purpose.NOISE, self.sample_shape)
        x_s = self.den.student.convention.add_noise(x0.detach(), eps, s)
        with torch.no_grad():
            eps_real = self._teacher_call(x_s, s, c).eps
            if h.objective == "sds":  # score distillation sampling: eps_fake = the injected noise
                eps_fake = eps
            else:
                fake = Guided(self.den.fake, h.guidance, h.guidance_mode) if h.fake_cfg == "same_as_teacher" \
                    else self.den.fake
                eps_fake = fake.x0_eps(x_s, s, c).eps
        lv = self.den.student.level(s)
        # the student's x0 enters x_s linearly (a = 1 - s); VSD's w(t) = b^2 drops that factor (spec pitfall 4)
        loss, g = vsd_generator_loss(x0, eps_real, eps_fake, lv.b)
        return RoleStep(loss, {"student/g_norm": g.flatten(1).norm(dim=1).mean()}, {"x0": x0.detach()})

    def loss_critic(self, batch, ctx):
        c, _ = batch
        h = self.hparams

        def fresh():  # an iteration without a student step: new student samples, no grad
            with torch.no_grad():
                return self.generate(ctx.randn(Purpose.LATENT, self.sample_shape), c)

        x0 = ctx.output("student", "x0", fresh)  # 3. the same student samples, stop-gradient
        s = self._time(ctx.rand(Purpose.TIME), 1e-3, 1 - 1e-3)  # t' ~ U{0..T-1} (VP)
        eps = ctx.randn(Purpose.NOISE, self.sample_shape)
        x_s = self.den.fake.convention.add_noise(x0, eps, s)
        drop = ctx.rand(Purpose.DROP) < h.label_dropout  # keeps eps_psi(., null) meaningful
        c = self.den.teacher.drop_cond(c, drop)
        pred = self.den.fake(x_s, s, c)
        return RoleStep(fake_score_loss(pred, x0, eps, x_s, self.den.fake.level(s), self.den.fake.prediction,
                                        h.fake_loss_weight))
