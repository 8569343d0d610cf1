"""SANA-Sprint: one student for 1-4 steps by continuous-time consistency (sCM) plus latent adversarial
distillation (LADD) whose discriminator is the frozen teacher with trainable heads
(papers/sana_sprint.md), on the shared sCM core (common/scm.py) and discriminator heads
(common/critics/discriminator.py).

Everything runs in TrigFlow with ``sigma_d`` (0.5, the paper's): ``x_t = cos t x0 + sin t z``,
``z ~ N(0, sigma_d^2 I)``, ``x0 = sigma_d y`` for the teacher's data ``y``. The flow teacher and the
student are seen through ``ConventionAdapter(..., TrigFlow(sigma_d))`` (the training-free
conversion; its exactness is tested in tests/test_scm.py). The student is the teacher's copy with a
guidance input and a log-variance head (projects/sana_sprint/student.py); its condition is
``{"c": label, "w": guidance}``.

Roles: ``teacher`` (frozen: the sCM target and LADD's feature backbone), ``student``, and
``discriminator`` (the heads on ``disc_blocks`` of the frozen teacher; its own optimizer, spec
pitfall 2). The schedule alternates a student (G) and a discriminator (D) step.

G step (section 4): ``t ~ p_G`` on real images, ``w`` drawn per sample from ``guidance_values``,
the guided teacher's ``dx/dt = sigma_d F_T^w``, the tangent ``J`` of the student's ``F`` along it
(``jvp`` through ``jvp_capable``, or ``fd_t`` / ``fd``), the target ``g`` with the tangent warm-up,
normalised per sample, ``L_sCM`` averaged over elements with the weight ``1 / (sigma_d tan t)`` and
the adaptive log-variance; then ``L_adv``: the student's ``x0_hat`` from fresh noise at ``t_g``
(``pi/2`` with probability ``p_max``, else ``p_G``), noised at ``t_D ~ p_D``, through the frozen
teacher to the heads (the hinge generator loss; the gradient reaches the student through
``x0_hat``, pitfall 7). ``L_G = scm_weight L_sCM + adv_weight L_adv``; the EMA is updated after
every G step (pitfall 1). D step: the hinge loss on noised real images against the student's
samples and (``misaligned``) real images paired with the wrong labels, both counted as fake.

Dense phase (``student_time_scale``, the embedded default): the student reads its time at another
scale than the teacher (the paper's dense time embedding: ``s`` for ``1000 s``) and the schedule's
``dense`` phase first fits its ``F`` to the teacher's; the tangent warm-up counts from its end.

Sampling: the EMA student with ``w = guidance_sample``, predict x0 and re-noise at the next time
(``validation.steps``: 1 or a list of times from ``pi/2``).
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

from common import noise, scm
from common.config import ConfigError
from common.critics.discriminator import Discriminator, feature_dims, generator_loss
from common.one_step import OneStepDistillation
from common.rng import Purpose
from common.roles import RoleStep
from common.teachers.adapters import ConventionAdapter
from common.teachers.denoiser import cat_cond
from common.teachers.hub import load_null_embedding
from projects.sana_sprint.student import SprintStudent, WithGuidance

HALF_PI = math.pi / 2


class SanaSprint(OneStepDistillation):
    sampler = "multistep"

    def __init__(self, teacher: str = "mnist", sigma_d: float = 0.5, guidance_values: list | None = None,
                 guidance_sample: float = 4.5, guidance_embed_scale: float = 0.1,
                 p_mean: float = 0.2, p_std: float = 1.6, d_mean: float = -0.6, d_std: float = 1.0, p_max: float = 0.5,
                 max_time_on_scm: bool = False, tangent: scm.TangentMode = "jvp", fd_h: float = 1e-4,
                 jvp_impl: str = "torch", warmup_form: scm.WarmupForm = "paper", tangent_warmup: int = 4000,
                 norm_c: float = 0.1, reduction: Literal["sum", "mean"] = "mean", adaptive_weight: bool = True,
                 scm_weight: float = 1.0, adv_weight: float = 0.5, disc_blocks: list | None = None,
                 disc_hidden: int = 128, disc_pool: bool = False, disc_head: str = "mlp", misaligned: bool = True,
                 logvar_lr: float | None = None, require_qk_norm: bool = False, null_embedding: str | None = None,
                 student_time_scale: float | None = None,
                 sample_shape: list | None = None, **base):
        super().__init__(**base)
        self.save_hyperparameters()
        self.guidance_values = [float(w) for w in (guidance_values or [4.0, 4.5, 5.0])]
        den = self.add_teacher_roles(teacher, critic=False,
                                     student_net=lambda net: SprintStudent(net, guidance_embed_scale))
        if require_qk_norm and not getattr(getattr(getattr(den.net, "model", None), "config", None), "qk_norm", None):
            raise ConfigError(f"module.require_qk_norm: the teacher {teacher!r} has no QK-norm (SANA-Sprint needs the "
                              f"QK-norm + dense-time teacher: plain SANA gives JVP blow-ups, spec pitfall 4)")
        if null_embedding is not None:  # text teachers: the empty prompt's embedding (the file's `null`)
            den.null_embedding = load_null_embedding(null_embedding)
        if sample_shape is not None:
            self.sample_shape = tuple(sample_shape)
        if self.sample_shape is None:
            raise ConfigError(f"the teacher {teacher!r} does not give its sample shape: set module.sample_shape")
        self.disc_blocks = list(disc_blocks or ["block1", "block2", "block4", "block5"])
        try:
            dims = feature_dims(den.net, self.disc_blocks)
        except AttributeError as e:
            raise ConfigError(f"module.disc_blocks: cannot tell the feature width of {type(den.net).__name__}") from e
        try:
            disc = Discriminator(dims, disc_hidden, disc_pool, disc_head)
        except ValueError as e:
            raise ConfigError(f"module.disc_head / disc_pool: {e}") from None
        self.add_role("discriminator", disc, "scratch")
        self.trig = conv = noise.TrigFlow(sigma_d)
        self.data_scale = conv.data_scale / den.convention.data_scale
        self.noise_convention = noise.TrigFlow(den.convention.data_scale)
        self.den.flow = den
        self.den.teacher = ConventionAdapter(den, conv)  # unguided: the guidance is per sample (_teacher_dxdt)
        self.den.student = ConventionAdapter(self._student_den(self.roles["student"].net), conv)
        phases = {p.name: p for p in self.schedule.phases} if self._schedule is not None else {}
        if "warmup" in phases:
            raise ConfigError("SANA-Sprint has no warm-up phase: the tangent warm-up is module.tangent_warmup")
        self.dense_until = scm.dense_phase_end(phases, student_time_scale, den.time_scale)

    def param_groups(self, name, params):
        """``logvar_lr``: the log-variance head at its own learning rate (it must reach ``log E[w d]``,
        about ``-log D``, while the student is still near the teacher)."""
        if name != "student" or self.hparams.logvar_lr is None:
            return super().param_groups(name, params)
        head = {id(p) for p in self.roles["student"].net.logvar_head.parameters()}
        return [([p for p in params if id(p) not in head], {}),
                ([p for p in params if id(p) in head], {"lr": self.hparams.logvar_lr})]

    def _student_den(self, net):
        """The student's denoiser: the teacher's wrapper, at ``student_time_scale`` when set (the dense
        time embedding: ``1`` reads the flow time ``s`` itself where the teacher reads ``1000 s``)."""
        return self.den.flow.with_net(net, self.hparams.student_time_scale)

    # ---------------------------------------------------------------- draws
    def _t_of(self, ctx, pos, purpose, mean, std):
        """``sigma = exp(N(mean, std^2))``, ``t = atan(sigma / sigma_d)`` (pitfall 8: the config's sigma_d)."""
        return scm.time_from_sigma(torch.exp(mean + std * ctx.randn(purpose, (), pos)), self.hparams.sigma_d)

    def _t_gen(self, ctx, pos, purpose):
        """The adversarial branch's generator time: ``pi/2`` with probability ``p_max``, else ``p_G``."""
        h = self.hparams
        t = self._t_of(ctx, pos, purpose, h.p_mean, h.p_std)
        return torch.where(ctx.rand(purpose + 1, pos) < h.p_max, torch.full_like(t, HALF_PI), t)

    def _w(self, ctx, pos):
        vals = torch.tensor(self.guidance_values, device=ctx.device)
        return vals[(ctx.rand(Purpose.EXTRA, pos) * len(vals)).long().clamp_max(len(vals) - 1)]

    def _noised(self, x0, t, eps):
        """``cos t x0 + sin t sigma_d eps``."""
        return self.trig.add_noise(x0, eps, t)

    # ---------------------------------------------------------------- networks
    @torch.no_grad()
    def _teacher_dxdt(self, x_t, t, y, w):
        """``sigma_d (F_u + w (F_c - F_u))``, the guided teacher's ODE with a guidance scale per sample."""
        both = self.den.teacher.predict(torch.cat([x_t, x_t]), torch.cat([t, t]),
                                        cat_cond(y, self.den.flow.null_cond(y)), kind="trigflow")
        c, u = both.chunk(2)
        return self.hparams.sigma_d * (u + noise.append_dims(w, c.ndim).to(c.dtype) * (c - u))

    def _logits(self, x, t, y, features_grad: bool):
        """The heads' logits on the frozen teacher's (unguided) block features; the features pass a
        gradient to ``x`` unless ``features_grad`` is false."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and features_grad):
            _, feats = self.den.teacher.x0_eps(x, t, y, return_features=self.disc_blocks)
        return self.roles["discriminator"].net(feats)

    def _student_x0(self, x0, y, w, ctx, pos, purpose):
        """The student's ``x0_hat`` from ``x_g`` at ``t_g`` (pure noise at ``pi/2``)."""
        t_g = self._t_gen(ctx, pos, purpose)
        x_g = self._noised(x0, t_g, ctx.randn(purpose + 2, self.sample_shape, pos))
        return self.den.student(x_g, t_g, {"c": y, "w": w})

    def generate(self, z, y, net=None):
        """One step from pure noise ``x = sigma_d z`` at ``t = pi/2``, at ``guidance_sample``."""
        h = self.hparams
        den = self.den.student if net is None else ConventionAdapter(self._student_den(net), self.trig)
        t = torch.full((len(z),), HALF_PI, device=z.device)
        return den(h.sigma_d * z, t, {"c": y, "w": torch.full((len(z),), h.guidance_sample, device=z.device)})

    def generator_denoiser(self):
        """The EMA student at ``guidance_sample``, in TrigFlow at the teacher's data scale (the few-step
        sampler's times, samples in the teacher's units)."""
        ema = WithGuidance(self._student_den(self.ema.ema_model), self.hparams.guidance_sample)
        return ConventionAdapter(ema, self.noise_convention)

    # ---------------------------------------------------------------- steps
    def _scm(self, x0, y, w, ctx, pos):
        h = self.hparams
        t = self._t_of(ctx, pos, Purpose.TIME, h.p_mean, h.p_std)
        if h.max_time_on_scm:  # pitfall 6's switch (off): the adversarial branch's max-time draws on sCM too
            t = torch.where(ctx.rand(Purpose.EXTRA + 6, pos) < h.p_max, torch.full_like(t, HALF_PI), t)
        x_t = self._noised(x0, t, ctx.randn(Purpose.NOISE, self.sample_shape, pos))
        dxdt = self._teacher_dxdt(x_t, t, y, w)
        cond = {"c": y, "w": w}
        f = lambda x, tt: self.den.student.predict(x, tt, cond, kind="trigflow")  # noqa: E731
        r = scm.warmup_ratio(ctx.iteration - self.dense_until, h.tangent_warmup)
        weight = logvar = None
        if h.adaptive_weight:
            weight, logvar = scm.sana_weight(t, h.sigma_d), self.roles["student"].net.logvar(t)
        per, core = scm.student_loss(f, x_t, t, dxdt, h.sigma_d, r, h.warmup_form, h.tangent, h.fd_h, h.jvp_impl,
                                     h.norm_c, h.reduction, weight, logvar)
        logs = {"student/tangent_r": float(r), **{f"student/{k}": v for k, v in core.items()}}
        if logvar is not None:
            logs["student/logvar"] = logvar.detach().mean()
        return per.mean(), logs

    def _dense(self, x0, y, w, ctx, pos):
        """The dense phase (the embedded analogue of the paper's dense-time teacher fine-tune): the
        student's ``F`` at its own time scale fitted to the frozen teacher's conditional ``F`` at ``t ~ p_G``."""
        h = self.hparams
        t = self._t_of(ctx, pos, Purpose.TIME, h.p_mean, h.p_std)
        x_t = self._noised(x0, t, ctx.randn(Purpose.NOISE, self.sample_shape, pos))
        cond = {"c": y, "w": w}
        loss = scm.dense_loss(lambda x, tt: self.den.student.predict(x, tt, cond, kind="trigflow"),
                              lambda x, tt: self.den.teacher.predict(x, tt, y, kind="trigflow"), x_t, t)
        return RoleStep(loss, {"student/dense_mse": loss.detach()})

    def loss_student(self, batch, ctx):
        h = self.hparams
        x, y, pos = batch
        x0 = self.data_scale * x  # TrigFlow's x0 = sigma_d y
        w = self._w(ctx, pos)
        if ctx.phase == scm.DENSE_PHASE:
            return self._dense(x0, y, w, ctx, pos)
        loss, logs = x0.new_zeros(()), {}
        if h.scm_weight > 0:
            l_scm, logs = self._scm(x0, y, w, ctx, pos)
            loss = loss + h.scm_weight * l_scm
            logs["student/scm"] = l_scm.detach()
        if h.adv_weight > 0:
            x0_hat = self._student_x0(x0, y, w, ctx, pos, Purpose.EXTRA + 1)  # with grad (pitfall 7)
            t_D = self._t_of(ctx, pos, Purpose.EXTRA + 4, h.d_mean, h.d_std)
            x_D = self._noised(x0_hat, t_D, ctx.randn(Purpose.EXTRA + 5, self.sample_shape, pos))
            l_adv = generator_loss(self._logits(x_D, t_D, y, features_grad=True), "hinge").mean()
            loss = loss + h.adv_weight * l_adv
            logs["student/adv"] = l_adv.detach()
        return RoleStep(loss, logs)

    def loss_discriminator(self, batch, ctx):
        """``1/2 [mean relu(1 - D(real)) + mean relu(1 + D([fake; misaligned]))]``, heads only."""
        h = self.hparams
        x, y, pos = batch
        x0 = self.data_scale * x
        with torch.no_grad():
            fake = self._student_x0(x0, y, self._w(ctx, pos), ctx, pos, Purpose.EXTRA + 1)
        t_D = self._t_of(ctx, pos, Purpose.TIME, h.d_mean, h.d_std)
        l_real = self._logits(self._noised(x0, t_D, ctx.randn(Purpose.NOISE, self.sample_shape, pos)), t_D, y, False)
        l_fake = [self._logits(self._noised(fake, t_D, ctx.randn(Purpose.LATENT, self.sample_shape, pos)), t_D, y,
                               False)]
        if h.misaligned:  # real images with the next sample's label: counted as fake
            mis = self._noised(torch.roll(x0, 1, 0), t_D, ctx.randn(Purpose.EXTRA + 4, self.sample_shape, pos))
            l_fake.append(self._logits(mis, t_D, y, False))
        l_fake = torch.cat(l_fake)
        loss = 0.5 * (F.relu(1 - l_real).mean() + F.relu(1 + l_fake).mean())
        sep = (l_real.flatten(1).mean(1) > l_fake[:len(x)].flatten(1).mean(1)).float().mean()
        return RoleStep(loss, {"discriminator/real_vs_fake": sep})
