"""DMD2: a K-step student by distribution matching against a fake-score critic, plus a GAN whose
discriminator heads read the critic's features, with backward simulation (papers/flash_dmd.md, which
builds on DMD2; papers/README.md sections 3, 4 and 8). The baseline Flash-DMD is measured against.

Everything runs in the teacher's own convention (the embedded flow teacher's ``x_s = (1 - s) x0 +
s eps``; SDXL's discrete VP at paper scale) through its noise-level object, so one code path serves
both. ``student_times`` are the K student steps in that time, from the noise end: DMD2's SDXL
``[999, 749, 499, 249]``, on the embedded flow teacher the same fractions of its time axis
``[1.0, 0.75, 0.5, 0.25]`` (README: the mapping). Noise ranges (``dmd_range``, ``dsm_range``,
``gan_range``) are fractions of the time axis from the data end: ``t = t_data + u (t_noise - t_data)``.

Roles: ``teacher`` (frozen, guided on the real branch only), ``critic`` (the fake score, a copy of
the teacher or LoRA on it, DSM-trained on the student's outputs), ``student`` (a copy of the
teacher; an x0 predictor through the teacher's parameterisation), ``discriminator`` (heads on
``disc_blocks`` of the critic; off with ``gan: false``). The schedule sets the update ratio: DMD2's
``gen_every = 5`` is a critic turn (critic, then discriminator) every iteration and a student turn
every fifth (``cycle: [[critic, discriminator], x4, [student, critic, discriminator]]``).

Student turn: step ``k ~ U{1..K}`` (``step_sampling``: ``per_batch``, DMD2's, one k for the whole
batch and every rank, keyed by the iteration; or ``per_sample``); backward simulation without
gradient from pure noise at ``t_1`` (``x0_hat = G(x, t_j)``, re-noised at ``t_{j+1}`` with fresh
noise); ``x0_hat = G(x_{t_k}, t_k)`` with gradient; the DMD term at ``tau ~ U(dmd_range)``:
``g = (x0_fake - x0_real) / mean|x0_hat - x0_real|`` through the surrogate ``1/2 mean (x0_hat -
sg(x0_hat - g))^2``; the GAN term ``softplus(-D(x0_hat noised at t ~ U(gan_range)))`` through the
critic's frozen features. ``L_G = dmd_weight L_DM + gan_weight L_GAN``.

Critic turn: the student turn's output of this iteration, detached (DMD2's order: student, critic,
discriminator), or in an iteration without one a fresh sample from the same simulation; DSM at ``t ~ U(dsm_range)``
(``dsm_form`` eps with uniform weight: DMD2's). Discriminator turn: the critic turn's fake samples
(``ctx.outputs``) against the batch's real digits, both noised at the same ``t``, the logistic loss
on the heads only (DMD2 also backpropagates it into the critic's encoder, scaled 1e-2 against the DSM
loss: here the heads have their own optimizer and the critic's features stay the fake score's).

Sampling: the EMA student at ``student_times`` (predict x0, re-noise with fresh noise at the next
time; ``validation.steps``); 1 step is ``t_1`` alone.
"""
from __future__ import annotations

from typing import Literal

import torch

from common import noise
from common.config import ConfigError
from common.critics.discriminator import Discriminator, GanLoss, discriminator_loss, generator_loss
from common.critics.dsm import DSMWeighting, dsm_loss
from common.distill_losses import dmd_gradient, surrogate_loss
from common.one_step import OneStepDistillation
from common.rng import Purpose
from common.roles import RoleStep
from common.teachers.denoiser import CFGMode, Guided

StepSampling = Literal["per_batch", "per_sample"]
TimeMap = Literal["fraction", "sdxl_snr"]
SDXL = noise.DiscreteVP(1000, 0.00085, 0.012, "scaled_linear")  # the time axis DMD2's SDXL settings are written on


def check_student_times(times, convention: noise.Convention) -> list[float]:
    """``times`` from the noise end toward the data end, strictly, inside the time range, the first at
    the noise end (the simulation starts from pure noise there)."""
    times = [float(t) for t in times]
    lo, hi = sorted((float(convention.t_data), float(convention.t_noise)))
    sign = 1.0 if convention.t_noise > convention.t_data else -1.0
    if not times:
        raise ConfigError("module.student_times is empty")
    if abs(times[0] - convention.t_noise) > 1e-6 * max(1.0, abs(convention.t_noise)):
        raise ConfigError(f"module.student_times must start at the noise end t={convention.t_noise:g} "
                          f"of {type(convention).__name__}, got {times[0]:g}")
    if any(not lo <= t <= hi for t in times) or any(sign * (b - a) >= 0 for a, b in zip(times, times[1:])):
        raise ConfigError(f"module.student_times must run strictly from the noise end toward the data end "
                          f"inside [{lo:g}, {hi:g}], got {times}")
    return times


class DMD2(OneStepDistillation):
    sampler = "multistep"

    def __init__(self, teacher: str = "mnist", guidance: float = 1.5, guidance_mode: CFGMode = "standard",
                 student_times: list | None = None, step_sampling: StepSampling = "per_batch",
                 time_map: TimeMap = "fraction",
                 dmd_weight: float = 1.0, dmd_range: list | None = None,
                 dsm_form: Literal["eps", "x0"] = "eps", dsm_weighting: DSMWeighting = "uniform",
                 dsm_range: list | None = None, gan: bool = True, gan_weight: float = 5e-3,
                 gan_loss: GanLoss = "ns", gan_range: list | None = None, disc_blocks: list | None = None,
                 disc_hidden: int = 128, disc_pool: bool = True, disc_head: str = "mlp", **base):
        super().__init__(**base)
        self.save_hyperparameters()
        den = self.add_teacher_roles(teacher)
        self.noise_convention = conv = den.convention
        if time_map not in ("fraction", "sdxl_snr"):
            raise ConfigError(f"module.time_map must be fraction or sdxl_snr, got {time_map!r}")
        if student_times is None:  # DMD2's [999, 749, 499, 249] by time_map, the first at pure noise
            fracs = torch.tensor([749, 499, 249], dtype=torch.float64) / SDXL.t_noise
            student_times = [conv.t_noise] + [float(t) for t in self._time(fracs)]
        self.times = check_student_times(student_times, conv)
        self.ranges = {}
        for name, r in (("dmd_range", dmd_range or [0.02, 0.98]), ("dsm_range", dsm_range or [0.0, 1.0]),
                        ("gan_range", gan_range or [0.02, 0.98])):
            if len(r) != 2 or not 0.0 <= r[0] < r[1] <= 1.0:
                raise ConfigError(f"module.{name} must be [lo, hi] with 0 <= lo < hi <= 1 (fractions of the time "
                                  f"axis from the data end), got {list(r)}")
            self.ranges[name] = (float(r[0]), float(r[1]))
        self.den.flow = den
        self.den.teacher = Guided(den, guidance, guidance_mode)
        self.den.student = den.with_net(self.roles["student"].net)
        self.den.fake = den.with_net(self.roles["critic"].net)
        self.disc_blocks = list(disc_blocks or ["block3"])
        if gan:
            dim = getattr(den.net, "dim", None)
            if dim is None:
                raise ConfigError(f"module.disc_blocks: cannot tell the feature width of {type(den.net).__name__}")
            try:
                disc = Discriminator({b: dim for b in self.disc_blocks}, disc_hidden, disc_pool, disc_head)
            except ValueError as e:
                raise ConfigError(f"module.disc_head / disc_pool: {e}") from None
            self.add_role("discriminator", disc, "scratch")

    # ---------------------------------------------------------------- times
    def _time(self, frac):
        """The time at fraction ``frac`` of the axis from the data end: of the teacher's own axis
        (``time_map: fraction``), or of SDXL's discrete VP axis ``t = 999 frac``, SNR-matched into the
        teacher's convention (``sdxl_snr``: DMD2's noise ranges at the noise levels they name)."""
        c = self.noise_convention
        if self.hparams.time_map == "sdxl_snr":
            return noise.match_time(SDXL.t_noise * frac.double(), SDXL, c).to(frac.dtype)
        return c.t_data + frac * (c.t_noise - c.t_data)

    def _draw_time(self, ctx, pos, purpose, name):
        lo, hi = self.ranges[name]
        return self._time(lo + (hi - lo) * ctx.rand(purpose, pos))

    def _steps(self, ctx, pos):
        """Each sample's student step ``k`` in ``0..K-1`` (0-based): one for the batch (``per_batch``,
        keyed by the iteration alone, so every rank draws it) or one per sample."""
        K = len(self.times)
        if self.hparams.step_sampling == "per_batch":
            u = ctx.rand(Purpose.EXTRA, torch.zeros(1, dtype=torch.long)).expand(len(pos))
        elif self.hparams.step_sampling == "per_sample":
            u = ctx.rand(Purpose.EXTRA, pos)
        else:
            raise ConfigError(f"module.step_sampling must be per_batch or per_sample, got "
                              f"{self.hparams.step_sampling!r}")
        return (u * K).long().clamp_max(K - 1)

    # ---------------------------------------------------------------- backward simulation
    @torch.no_grad()
    def backward_simulation(self, y, k, ctx, pos):
        """Each sample's input at its step ``k`` (0-based): pure noise at ``t_0``, then ``k`` student steps
        without gradient, each re-noised at the next time with fresh noise. Returns ``(x, t)``."""
        conv = self.noise_convention
        times = torch.tensor(self.times, device=self.device)
        x = conv.level(times[:1]).b.float().to(self.device) * ctx.randn(Purpose.LATENT, self.sample_shape, pos)
        for j in range(int(k.max()) if len(k) else 0):
            go = k > j
            t_j = times[j].expand(len(y))
            x0 = self.den.student.predict(x, t_j, y) if go.all() else torch.zeros_like(x)
            if not go.all():  # only the samples that go on
                x0[go] = self.den.student.predict(x[go], t_j[go], y[go])
            nxt = conv.add_noise(x0, ctx.randn(Purpose.EXTRA + 1 + j, self.sample_shape, pos), times[j + 1].expand(len(y)))
            x = torch.where(noise.append_dims(go, x.ndim), nxt, x)
        return x, times[k]

    def _student_sample(self, y, ctx, pos, grad: bool):
        k = self._steps(ctx, pos)
        x, t = self.backward_simulation(y, k, ctx, pos)
        with torch.set_grad_enabled(grad):
            return self.den.student.predict(x, t, y), k

    # ---------------------------------------------------------------- networks
    def _logits(self, x, t, y, features_grad: bool):
        """The heads' logits on the critic's block features; the features pass a gradient to ``x``
        (not to the critic, whose optimizer is off in the student's turn) unless ``features_grad`` is false."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and features_grad):
            _, feats = self.den.fake(x, t, y, return_features=self.disc_blocks)
        return self.roles["discriminator"].net(feats)

    def generator_denoiser(self):
        """The EMA student in the teacher's convention, for the few-step sampler."""
        return self.den.flow.with_net(self.ema.ema_model)

    # ---------------------------------------------------------------- steps
    def dmd_term(self, x0, y, ctx, pos):
        """``(L_DM, ||g||)``: the DMD surrogate of ``x0`` (with grad) at ``tau ~ U(dmd_range)``."""
        conv = self.noise_convention
        tau = self._draw_time(ctx, pos, Purpose.TIME, "dmd_range")
        x_tau = conv.add_noise(x0.detach(), ctx.randn(Purpose.NOISE, self.sample_shape, pos), tau)
        with torch.no_grad():
            g = dmd_gradient(self.den.fake.predict(x_tau, tau, y), self.den.teacher.predict(x_tau, tau, y), x0.detach())
        return surrogate_loss(x0, g, "mean"), g.flatten(1).norm(dim=1).mean()

    def gan_term(self, x0, y, ctx, pos):
        """The generator's GAN loss on ``x0`` (with grad) noised at ``t ~ U(gan_range)``."""
        t = self._draw_time(ctx, pos, Purpose.EXTRA + 20, "gan_range")
        x_t = self.noise_convention.add_noise(x0, ctx.randn(Purpose.EXTRA + 21, self.sample_shape, pos), t)
        return generator_loss(self._logits(x_t, t, y, features_grad=True), self.hparams.gan_loss).mean()

    def loss_student(self, batch, ctx):
        h = self.hparams
        _, y, pos = batch
        x0, k = self._student_sample(y, ctx, pos, grad=True)
        loss, logs = x0.new_zeros(()), {"student/k_mean": k.float().mean()}
        if h.dmd_weight > 0:
            l_dm, g_norm = self.dmd_term(x0, y, ctx, pos)
            loss = loss + h.dmd_weight * l_dm
            logs.update({"student/dmd": l_dm.detach(), "student/dmd_g_norm": g_norm})
        if h.gan and h.gan_weight > 0:
            l_gan = self.gan_term(x0, y, ctx, pos)
            loss = loss + h.gan_weight * l_gan
            logs["student/gan"] = l_gan.detach()
        return RoleStep(loss, logs, outputs={"x0": x0.detach()})

    def loss_critic(self, batch, ctx):
        h = self.hparams
        _, y, pos = batch
        x0 = ctx.output("student", "x0", lambda: self._student_sample(y, ctx, pos, grad=False)[0])
        t = self._draw_time(ctx, pos, Purpose.TIME, "dsm_range")
        eps = ctx.randn(Purpose.NOISE, self.sample_shape, pos)
        x_t = self.noise_convention.add_noise(x0, eps, t)
        level = self.noise_convention.level(t).expand(x0.ndim)
        loss = dsm_loss(self.den.fake(x_t, t, y), x0, eps, x_t, level, self.den.fake.prediction, h.dsm_form,
                        h.dsm_weighting)
        return RoleStep(loss, outputs={"x0": x0})

    def loss_discriminator(self, batch, ctx):
        """The logistic (or hinge) loss of the heads: the batch's real digits against the critic turn's
        fake samples of this iteration (or fresh ones), both noised at the same ``t`` with their own noise."""
        h = self.hparams
        x_real, y, pos = batch
        fake = ctx.output("critic", "x0", lambda: self._student_sample(y, ctx, pos, grad=False)[0])
        t = self._draw_time(ctx, pos, Purpose.TIME, "gan_range")
        conv = self.noise_convention
        l_real = self._logits(conv.add_noise(x_real, ctx.randn(Purpose.NOISE, self.sample_shape, pos), t), t, y, False)
        l_fake = self._logits(conv.add_noise(fake, ctx.randn(Purpose.EXTRA + 22, self.sample_shape, pos), t), t, y, False)
        sep = (l_real.flatten(1).mean(1) > l_fake.flatten(1).mean(1)).float().mean()
        return RoleStep(discriminator_loss(l_real, l_fake, h.gan_loss).mean(), {"discriminator/real_vs_fake": sep})
