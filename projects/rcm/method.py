"""rCM: continuous-time consistency distillation (sCM) regularised by a DMD term with a fake-score
critic (papers/rcm.md), on the shared sCM core (common/scm.py).

Everything runs in TrigFlow with ``sigma_d`` (``x_t = cos t x0 + sin t z``, ``z ~ N(0, sigma_d^2 I)``;
the paper's ``sigma_d = 1`` is a choice of units, which the embedded config keeps; the argument's
default is 0.5, the MNIST data's scale): the flow teacher, the student (a copy of it) and the critic
(another copy) are all seen through ``ConventionAdapter(..., TrigFlow(sigma_d))``, the student's ``F`` being that wrapper's
TrigFlow prediction, so the JVP runs through the preconditioning too.

The schedule (config): ``dense`` when ``student_time_scale`` rescales the student's time input (its
``F`` fitted to the teacher's, ``common.scm.dense_loss``; README), ``warmup`` (the tangent warm-up:
student steps only, no DMD term; both it and the DMD term count from the dense phase's end), then a
cycle of critic steps and one student step (``student_update_freq``: 5 = four critic steps, one
student step). A student step: ``t ~ p_G`` (``sigma = exp(N(p_mean, p_std^2))``, ``t = atan(sigma /
sigma_d)``) on real images, the guided teacher's ``dx/dt = sigma_d F_T``, the tangent ``J`` (``jvp``,
``fd_t`` or ``fd``), the target ``g`` (``warmup_form``), normalised per sample, and
``scm_weight L_sCM``; after the warm-up also ``dmd_weight L_DMD`` on the student's output after a
backward simulation of ``n`` steps (``n`` = the student step count mod ``backsim_steps``). A critic
step: its own backward simulation (its own counter), then DSM of the fake score in x0 form weighted
``1 / sin^2 t_D``. ``t_D ~ p_D``: flow time ``s = shift u / (1 + (shift - 1) u)``,
``t = atan(s / (1 - s))``.

Sampling: the EMA student, few-step (predict x0, re-noise at the next time): ``validation.steps`` lists
the times, e.g. ``[1.5707963, 1.3, 1.0, 0.6]`` for 4 steps.
"""
from __future__ import annotations

import math
from typing import Literal

import torch

from common import noise, scm
from common.config import ConfigError
from common.distill_losses import dmd_gradient, surrogate_loss
from common.one_step import OneStepDistillation
from common.rng import Purpose
from common.roles import RoleStep
from common.teachers.adapters import ConventionAdapter
from common.teachers.denoiser import CFGMode, Guided
from common.teachers.hub import load_null_embedding

HALF_PI = math.pi / 2


class RCM(OneStepDistillation):
    sampler = "multistep"
    critic_inits = ("copy",)

    def __init__(self, teacher: str = "mnist", sigma_d: float = 0.5, guidance: float = 0.5,
                 guidance_mode: CFGMode = "offset", p_mean: float = -0.8, p_std: float = 1.6, shift: float = 5.0,
                 tangent: scm.TangentMode = "jvp", fd_h: float = 1e-4, jvp_impl: str = "torch",
                 warmup_form: scm.WarmupForm = "paper", tangent_warmup: int = 1000, norm_c: float = 0.1,
                 reduction: Literal["sum", "mean"] = "mean", scm_weight: float = 1.0, dmd_weight: float = 0.01,
                 backsim_steps: int = 4, dmd_fixed_times: list | None = None, sample_shape: list | None = None,
                 null_embedding: str | None = None, student_time_scale: float | None = None, **base):
        super().__init__(**base)
        self.save_hyperparameters()
        den = self.add_teacher_roles(teacher)
        if null_embedding is not None:  # text teachers: the negative prompt's embedding (the file's `null`)
            den.null_embedding = load_null_embedding(null_embedding)
        if sample_shape is not None:  # video latents (C, T, H, W): the network does not say
            self.sample_shape = tuple(sample_shape)
        if self.sample_shape is None:
            raise ConfigError(f"the teacher {teacher!r} does not give its sample shape: set module.sample_shape")
        self.trig = conv = noise.TrigFlow(sigma_d)
        # TrigFlow's data are x0 = sigma_d y for the teacher's unit-scale data y: the batch is scaled
        # so, and the sampler sees the student through TrigFlow at the teacher's own data scale (the
        # same times, samples in the teacher's units)
        self.data_scale = conv.data_scale / den.convention.data_scale
        self.noise_convention = noise.TrigFlow(den.convention.data_scale)
        self.den.flow = den
        self.den.teacher = ConventionAdapter(Guided(den, guidance, guidance_mode), conv)
        self.den.conditional = ConventionAdapter(den, conv)  # unguided: the dense phase's target
        self.den.student = ConventionAdapter(self._student_den(self.roles["student"].net), conv)
        self.den.fake = ConventionAdapter(den.with_net(self.roles["critic"].net), conv)
        phases = {p.name: p for p in self.schedule.phases} if self._schedule is not None else {}
        self.dense_until = scm.dense_phase_end(phases, student_time_scale, den.time_scale)
        self.dmd_from = self.dense_until + tangent_warmup
        if "warmup" in phases and phases["warmup"].until != self.dmd_from:
            raise ConfigError(f"module.tangent_warmup={tangent_warmup} but the schedule's warmup phase ends at "
                              f"{phases['warmup'].until}, not {self.dmd_from}: the DMD term and the critic start after "
                              f"the {'dense phase and the ' if self.dense_until else ''}tangent warm-up")
        # the effective standard scale, logged (rcm.md section 7)
        self.standard_guidance = 1.0 + guidance if guidance_mode == "offset" else guidance

    def _student_den(self, net):
        """The student's denoiser: the teacher's wrapper around ``net``, at ``student_time_scale`` when set."""
        return self.den.flow.with_net(net, self.hparams.student_time_scale)

    # ---------------------------------------------------------------- time laws
    def _t_G(self, ctx, pos, purpose=Purpose.TIME):
        h = self.hparams
        return scm.time_from_sigma(torch.exp(h.p_mean + h.p_std * ctx.randn(purpose, (), pos)), h.sigma_d)

    def _t_D(self, ctx, pos, purpose):
        k = self.hparams.shift
        u = ctx.rand(purpose, pos)
        s = k * u / (1 + (k - 1) * u)
        return torch.atan(s / (1 - s).clamp_min(1e-12))

    def _noised(self, x0, t, eps):
        """``cos t x0 + sin t sigma_d eps``."""
        return self.trig.add_noise(x0, eps, t)

    # ---------------------------------------------------------------- backward simulation
    def _steps_done(self, role: str, it: int) -> int:
        """How many steps ``role`` took before iteration ``it`` (from the schedule: resumable)."""
        return self.schedule.steps_per_role(it).get(role, 0)

    @torch.no_grad()
    def _backsim(self, y, pos, ctx, n: int):
        """``n`` no-grad steps of the student from pure noise: ``x0_hat = G(x, t)``, then re-noise at
        ``t_next = min(t ~ p_D, t)`` (or the fixed chain); returns ``(x, t)`` to start the last step."""
        h = self.hparams
        x = h.sigma_d * ctx.randn(Purpose.LATENT, self.sample_shape, pos)
        t = torch.full((len(y),), HALF_PI, device=x.device)
        for j in range(n):
            x0 = self.den.student(x, t, y)
            if h.dmd_fixed_times:
                t_next = torch.full_like(t, float(h.dmd_fixed_times[min(j, len(h.dmd_fixed_times) - 1)]))
            else:
                t_next = torch.minimum(self._t_D(ctx, pos, Purpose.EXTRA + 2 * j), t)
            x = self._noised(x0, t_next, ctx.randn(Purpose.EXTRA + 2 * j + 1, self.sample_shape, pos))
            t = t_next
        return x, t

    def generate(self, z, y, net=None):
        """One step from pure noise ``x = sigma_d z`` at ``t = pi/2``."""
        den = self.den.student if net is None else ConventionAdapter(self._student_den(net), self.trig)
        t = torch.full((len(z),), HALF_PI, device=z.device)
        return den(self.hparams.sigma_d * z, t, y)

    def generator_denoiser(self):
        """The EMA student in TrigFlow, for the few-step sampler, in the teacher's data units."""
        return ConventionAdapter(self._student_den(self.ema.ema_model), self.noise_convention)

    # ---------------------------------------------------------------- steps
    def loss_student(self, batch, ctx):
        h = self.hparams
        x0, y, pos = batch
        if ctx.phase == scm.DENSE_PHASE:  # the student's rescaled time input fitted to the teacher
            t = self._t_G(ctx, pos)
            x_t = self._noised(self.data_scale * x0, t, ctx.randn(Purpose.NOISE, self.sample_shape, pos))
            loss = scm.dense_loss(lambda x, tt: self.den.student.predict(x, tt, y, kind="trigflow"),
                                  lambda x, tt: self.den.conditional.predict(x, tt, y, kind="trigflow"), x_t, t)
            return RoleStep(loss, {"student/dense_mse": loss.detach()})
        loss, logs = x0.new_zeros(()), {"student/cfg_standard_scale": self.standard_guidance}
        if h.scm_weight > 0:  # off: the DMD-only ablation (no tangent computed)
            l_scm, scm_logs = self._scm(self.data_scale * x0, y, pos, ctx)  # TrigFlow's x0 = sigma_d y
            loss = loss + h.scm_weight * l_scm
            logs.update({"student/scm": l_scm.detach(), **scm_logs})
        if ctx.iteration >= self.dmd_from and h.dmd_weight > 0:
            l_dmd, g_norm = self._dmd(y, pos, ctx)
            loss = loss + h.dmd_weight * l_dmd
            logs.update({"student/dmd": l_dmd.detach(), "student/dmd_g_norm": g_norm})
        return RoleStep(loss, logs)

    def _scm(self, x0, y, pos, ctx):
        """The sCM loss on real data ``x0`` (TrigFlow units) along the guided teacher's ODE."""
        h = self.hparams
        t = self._t_G(ctx, pos)
        x_t = self._noised(x0, t, ctx.randn(Purpose.NOISE, self.sample_shape, pos))
        with torch.no_grad():
            dxdt = h.sigma_d * self.den.teacher.predict(x_t, t, y, kind="trigflow")
        f = lambda x, tt: self.den.student.predict(x, tt, y, kind="trigflow")  # noqa: E731
        r = scm.warmup_ratio(ctx.iteration - self.dense_until, h.tangent_warmup)
        per, logs = scm.student_loss(f, x_t, t, dxdt, h.sigma_d, r, h.warmup_form, h.tangent, h.fd_h, h.jvp_impl,
                                     h.norm_c, h.reduction)
        return per.mean(), {"student/tangent_r": float(r), **{f"student/{k}": v for k, v in logs.items()}}

    def _dmd(self, y, pos, ctx):
        """The DMD regulariser on the student's output after a backward simulation."""
        h = self.hparams
        n = self._steps_done("student", ctx.iteration) % h.backsim_steps
        x, t = self._backsim(y, pos, ctx, n)
        x0 = self.den.student(x, t, y)  # with grad
        t_D = self._t_D(ctx, pos, Purpose.EXTRA + 2 * h.backsim_steps)
        x_D = self._noised(x0.detach(), t_D, ctx.randn(Purpose.EXTRA + 2 * h.backsim_steps + 1, self.sample_shape, pos))
        with torch.no_grad():
            g = dmd_gradient(self.den.fake(x_D, t_D, y), self.den.teacher(x_D, t_D, y), x0.detach())
        # rcm.md's sum over elements of (x0 - sg(x0 - g))^2: twice the shared 1/2-norm surrogate
        loss = 2 * surrogate_loss(x0, g, "per_sample_sum" if h.reduction == "sum" else "mean")
        return loss, g.flatten(1).norm(dim=1).mean()

    def loss_critic(self, batch, ctx):
        h = self.hparams
        _, y, pos = batch
        n = self._steps_done("critic", ctx.iteration) % h.backsim_steps
        with torch.no_grad():
            x, t = self._backsim(y, pos, ctx, n)
            x0 = self.den.student(x, t, y)
        t_D = self._t_D(ctx, pos, Purpose.TIME)
        x_D = self._noised(x0, t_D, ctx.randn(Purpose.NOISE, self.sample_shape, pos))
        sq = (self.den.fake(x_D, t_D, y) - x0).pow(2).flatten(1)
        per = (sq.sum(1) if h.reduction == "sum" else sq.mean(1)) / torch.sin(t_D).pow(2)
        return RoleStep(per.mean())
