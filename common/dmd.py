"""The multi-step DMD recipe that DMD2 (projects/dmd2) and Flash-DMD (projects/flash_dmd) share
(papers/flash_dmd.md sections 2-5; papers/README.md sections 3, 4 and 8).

Everything runs in the teacher's own convention (the embedded flow teacher's ``x_s = (1 - s) x0 +
s eps``; SDXL's discrete VP at paper scale) through its noise-level object, so one code path serves
both. ``student_times`` are the K student steps in that time, from the noise end: DMD2's SDXL
``[999, 749, 499, 249]``, on the embedded flow teacher the same fractions of its time axis
``[1.0, 0.75, 0.5, 0.25]`` (``time_map: fraction``) or the times at the same SNR (``sdxl_snr``).
Noise ranges (``dmd_range``, ``dsm_range``, ``gan_range``) are fractions of the time axis from the
data end: ``t = t_data + u (t_noise - t_data)``.

Roles: ``teacher`` (frozen, guided on the real branch only), ``critic`` (the fake score, a copy of
the teacher or LoRA on it, DSM-trained on the student's outputs), ``student`` (a copy of the
teacher; an x0 predictor through the teacher's parameterisation), and, with ``gan``, a
``discriminator``: heads on ``disc_blocks`` of the critic (DMD2's latent head; a project may put
them on another backbone by overriding :meth:`MultiStepDMD.disc_logits`).

* The student's step ``k ~ U{1..K}`` (``step_sampling``: ``per_batch``, DMD2's, one k for the whole
  batch and every rank, keyed by the iteration; or ``per_sample``); backward simulation without
  gradient from pure noise at ``t_1`` (``x0_hat = G(x, t_j)``, re-noised at ``t_{j+1}`` with fresh
  noise); then ``x0_hat = G(x_{t_k}, t_k)`` with gradient.
* The DMD term at ``tau ~ U(dmd_range)``: ``g = (x0_fake - x0_real) / mean|x0_hat - x0_real|``
  through the surrogate ``1/2 mean (x0_hat - sg(x0_hat - g))^2``, per sample.
* The GAN term ``softplus(-D(x0_hat noised at t ~ U(gan_range)))`` through the critic's frozen
  features, per sample.
* The critic turn: the student turn's output of this iteration, detached (DMD2's order: student,
  critic, discriminator), or in an iteration without one a fresh sample from the same simulation;
  DSM at ``t ~ U(dsm_range)`` (``dsm_form`` eps with uniform weight: DMD2's). A project may keep only
  the outputs of some steps (:meth:`MultiStepDMD.critic_steps`; Flash-DMD's ``fake_source``).
* The discriminator turn: the critic turn's fake samples (or those of
  :meth:`MultiStepDMD.discriminator_steps`) against the batch's real digits, both noised at the same
  ``t`` with their own noise; the logistic (or hinge) loss on the heads only, each half the mean over
  its own samples; ``discriminator/real_vs_fake`` is the heads' AUC of real against fake.
* ``grad_cos_every: n`` logs, every n-th iteration with a student turn, the cosine between the DM
  and the GAN terms' gradients on the student's parameters, at each student step of the current
  batch (``student/grad_cos_k<k>``; papers/flash_dmd.md section 7.8, the motivation of the split).

Sampling: the EMA student at ``student_times`` (predict x0, re-noise with fresh noise at the next
time; ``validation.steps``); 1 step is ``t_1`` alone.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from common import noise
from common.config import ConfigError
from common.critics.discriminator import (Discriminator, GanLoss, auc, discriminator_halves, feature_dims,
                                          generator_loss)
from common.critics.dsm import DSMWeighting, dsm_loss
from common.distill_losses import dmd_gradient, surrogate_loss
from common.one_step import OneStepDistillation
from common.rng import Purpose
from common.roles import RoleStep
from common.sampling import student_times as check_times
from common.teachers.denoiser import CFGMode, Guided
from common.teachers.hub import load_null_embedding

StepSampling = Literal["per_batch", "per_sample"]
TimeMap = Literal["fraction", "sdxl_snr"]
SDXL = noise.DiscreteVP(1000, 0.00085, 0.012, "scaled_linear")  # the time axis DMD2's SDXL settings are written on


def check_student_times(times, convention: noise.Convention) -> list[float]:
    """``times`` as the few-step sampler takes them (:func:`common.sampling.student_times`), and the
    first at the noise end (the simulation starts from pure noise there)."""
    try:
        times = check_times(convention, list(times))[:-1].tolist()
    except (ValueError, TypeError) as e:
        raise ConfigError(f"module.student_times: {e}") from None
    if abs(times[0] - convention.t_noise) > 1e-6 * max(1.0, abs(convention.t_noise)):
        raise ConfigError(f"module.student_times must start at the noise end t={convention.t_noise:g} "
                          f"of {type(convention).__name__}, got {times[0]:g}")
    return times


def check_range(name: str, r) -> tuple[float, float]:
    if len(r) != 2 or not 0.0 <= r[0] < r[1] <= 1.0:
        raise ConfigError(f"module.{name} must be [lo, hi] with 0 <= lo < hi <= 1 (fractions of the time "
                          f"axis from the data end), got {list(r)}")
    return float(r[0]), float(r[1])


class MultiStepDMD(OneStepDistillation):
    """The shared DMD2 machinery; a project writes ``loss_student`` from :meth:`student_sample`,
    :meth:`dmd_term` and :meth:`gan_term`."""

    sampler = "multistep"

    def __init__(self, teacher: str = "mnist", guidance: float = 1.5, guidance_mode: CFGMode = "standard",
                 student_times: list | None = None, step_sampling: StepSampling = "per_batch",
                 time_map: TimeMap = "fraction",
                 dmd_weight: float = 1.0, dmd_range: list | None = None,
                 dsm_form: Literal["eps", "x0"] = "eps", dsm_weighting: DSMWeighting = "uniform",
                 dsm_range: list | None = None, gan: bool = True, gan_weight: float = 5e-3,
                 gan_loss: GanLoss = "ns", gan_range: list | None = None, disc_blocks: list | None = None,
                 disc_hidden: int = 128, disc_pool: bool = True, disc_head: str = "mlp", grad_cos_every: int = 0,
                 null_embedding: str | None = None, **base):
        super().__init__(**base)
        self.save_hyperparameters()
        den = self.add_teacher_roles(teacher)
        if null_embedding is not None:  # text teachers: the empty prompt's (packed) embedding, from a prompt file
            den.null_embedding = load_null_embedding(null_embedding)
        self.noise_convention = conv = den.convention
        if time_map not in ("fraction", "sdxl_snr"):
            raise ConfigError(f"module.time_map must be fraction or sdxl_snr, got {time_map!r}")
        if step_sampling not in ("per_batch", "per_sample"):
            raise ConfigError(f"module.step_sampling must be per_batch or per_sample, got {step_sampling!r}")
        if student_times is None:  # DMD2's [999, 749, 499, 249] by time_map, the first at pure noise
            fracs = torch.tensor([749, 499, 249], dtype=torch.float64) / SDXL.t_noise
            student_times = [conv.t_noise] + [float(t) for t in self._time(fracs)]
        self.times = check_student_times(student_times, conv)
        self.ranges = {name: check_range(name, r or default) for name, r, default in (
            ("dmd_range", dmd_range, [0.02, 0.98]), ("dsm_range", dsm_range, [0.0, 1.0]),
            ("gan_range", gan_range, [0.02, 0.98]))}
        self.den.flow = den
        self.den.teacher = Guided(den, guidance, guidance_mode)
        self.den.student = den.with_net(self.roles["student"].net)
        self.den.fake = den.with_net(self.roles["critic"].net)
        self.disc_blocks = list(disc_blocks or ["block3"])
        if gan:
            self.add_role("discriminator", self.make_discriminator(den.net), "scratch")

    def make_discriminator(self, teacher_net) -> Discriminator:
        """DMD2's heads on the critic's ``disc_blocks`` (the critic has the teacher's architecture)."""
        h = self.hparams
        try:
            dims = feature_dims(teacher_net, self.disc_blocks)
        except ValueError as e:
            raise ConfigError(f"module.disc_blocks: {e}") from None
        try:
            return Discriminator(dims, h.disc_hidden, h.disc_pool, h.disc_head)
        except ValueError as e:
            raise ConfigError(f"module.disc_head / disc_pool: {e}") from None

    # ---------------------------------------------------------------- times
    def _time(self, frac):
        """The time at fraction ``frac`` of the axis from the data end: of the teacher's own axis
        (``time_map: fraction``), or of SDXL's discrete VP axis ``t = 999 frac``, SNR-matched into the
        teacher's convention (``sdxl_snr``: DMD2's noise ranges at the noise levels they name)."""
        c = self.noise_convention
        if self.hparams.time_map == "sdxl_snr":
            return noise.match_time(SDXL.t_noise * frac.double(), SDXL, c).to(frac.dtype)
        return c.t_data + frac * (c.t_noise - c.t_data)

    def _draw_time(self, ctx, pos, purpose, name, lo_hi=None):
        lo, hi = lo_hi or self.ranges[name]
        return self._time(lo + (hi - lo) * ctx.rand(purpose, pos))

    def _steps(self, ctx, pos, allowed: list[int] | None = None):
        """Each sample's student step ``k`` (0-based) among ``allowed`` (default all K): one for the
        batch (``per_batch``, keyed by the iteration alone, so every rank draws it) or one per sample."""
        allowed = torch.tensor(allowed if allowed is not None else range(len(self.times)), device=pos.device)
        if self.hparams.step_sampling == "per_batch":
            u = ctx.rand(Purpose.EXTRA, torch.zeros(1, dtype=torch.long)).expand(len(pos))
        else:
            u = ctx.rand(Purpose.EXTRA, pos)
        return allowed[(u * len(allowed)).long().clamp_max(len(allowed) - 1).to(pos.device)]

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

    def student_sample(self, y, ctx, pos, grad: bool, allowed: list[int] | None = None, k: Tensor | None = None):
        """``(x0_hat, k)``: the student's output at each sample's step (drawn among ``allowed``, or ``k``)."""
        k = self._steps(ctx, pos, allowed) if k is None else k
        x, t = self.backward_simulation(y, k, ctx, pos)
        with torch.set_grad_enabled(grad):
            return self.den.student.predict(x, t, y), k

    def generator_denoiser(self):
        """The EMA student in the teacher's convention, for the few-step sampler."""
        return self.den.flow.with_net(self.ema.ema_model)

    # ---------------------------------------------------------------- generator terms (per sample)
    def fake_score(self):
        """The fake score the DMD term reads (the live critic; Flash-DMD may read an EMA of it)."""
        return self.den.fake

    def dmd_time(self, ctx, pos, frac_range=None):
        """Each sample's DMD noise level ``tau ~ U(frac_range or dmd_range)`` (keyed by position)."""
        return self._draw_time(ctx, pos, Purpose.TIME, "dmd_range", frac_range)

    def dmd_term(self, x0, y, ctx, pos, frac_range=None, tau=None):
        """``(L_DM per sample, ||g|| per sample)``: the DMD surrogate of ``x0`` (with grad) at ``tau``
        (default :meth:`dmd_time`)."""
        conv = self.noise_convention
        tau = self.dmd_time(ctx, pos, frac_range) if tau is None else tau
        x_tau = conv.add_noise(x0.detach(), ctx.randn(Purpose.NOISE, self.sample_shape, pos), tau)
        with torch.no_grad():
            g = dmd_gradient(self.fake_score().predict(x_tau, tau, y), self.den.teacher.predict(x_tau, tau, y),
                             x0.detach())
        return surrogate_loss(x0, g, "per_sample_mean"), g.flatten(1).norm(dim=1)

    def disc_logits(self, x0, y, ctx, pos, purposes, features_grad: bool):
        """The heads' logits on ``x0`` noised at ``t ~ U(gan_range)`` (draws keyed by ``purposes``: time,
        noise), through the critic's block features; these pass a gradient to ``x0`` (not to the
        critic, whose optimizer is off in the student's turn) unless ``features_grad`` is false."""
        t = self._draw_time(ctx, pos, purposes[0], "gan_range")
        x_t = self.noise_convention.add_noise(x0, ctx.randn(purposes[1], self.sample_shape, pos), t)
        with torch.set_grad_enabled(torch.is_grad_enabled() and features_grad):
            _, feats = self.den.fake(x_t, t, y, return_features=self.disc_blocks)
        return self.roles["discriminator"].net(feats)

    def gan_term(self, x0, y, ctx, pos):
        """The generator's GAN loss per sample on ``x0`` (with grad)."""
        logits = self.disc_logits(x0, y, ctx, pos, (Purpose.EXTRA + 20, Purpose.EXTRA + 21), features_grad=True)
        return generator_loss(logits, self.hparams.gan_loss)

    def grad_cosines(self, y, ctx, pos) -> dict[str, Tensor]:
        """The cosine between the DM and the GAN terms' gradients on the student's parameters, at every
        student step, on this batch's labels and draws (``student/grad_cos_k<k>``, k from 1)."""
        params = [p for p in self.roles["student"].net.parameters() if p.requires_grad]
        out = {}
        for k in range(len(self.times)):
            x0, _ = self.student_sample(y, ctx, pos, grad=True, k=torch.full_like(pos, k))
            grads = [torch.autograd.grad(term.mean(), params, retain_graph=True, allow_unused=True)
                     for term in (self.dmd_term(x0, y, ctx, pos)[0], self.gan_term(x0, y, ctx, pos))]
            a, b = (torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(gs, params)])
                    for gs in grads)
            out[f"student/grad_cos_k{k + 1}"] = torch.nn.functional.cosine_similarity(a, b, dim=0).detach()
        return out

    def wants_grad_cosines(self, ctx) -> bool:
        h = self.hparams
        return bool(h.grad_cos_every) and h.gan and h.dmd_weight > 0 and ctx.iteration % h.grad_cos_every == 0

    # ---------------------------------------------------------------- critic and discriminator turns
    def critic_steps(self) -> list[int] | None:
        """The student steps (0-based) whose outputs the fake score trains on; None: all (DMD2's)."""
        return None

    def discriminator_steps(self) -> list[int] | None:
        """The student steps whose outputs are the heads' fake samples; None: all (DMD2's)."""
        return None

    def _fake_samples(self, source: str, y, ctx, pos, allowed):
        """``(x0, k, y, pos)``: the samples of role ``source``'s turn of this iteration at the ``allowed``
        steps (all when None), or, when it did not step or produced none of them, a fresh draw among them."""
        o = ctx.outputs.get(source, {})
        if "x0" in o:
            x0, k, y_o, pos_o = o["x0"], o["k"], o.get("y", y), o.get("pos", pos)
            keep = torch.ones_like(k, dtype=torch.bool) if allowed is None else torch.isin(k, k.new_tensor(allowed))
            if keep.all():
                return x0, k, y_o, pos_o
            if keep.any():
                return x0[keep], k[keep], y_o[keep], pos_o[keep]
        x0, k = self.student_sample(y, ctx, pos, grad=False, allowed=allowed)
        return x0, k, y, pos

    def critic_sample(self, y, ctx, pos):
        """``(x0, k, y, pos)``: the fake samples the critic trains on (their steps, labels, positions): the
        student turn's of this iteration at :meth:`critic_steps`, or fresh ones."""
        return self._fake_samples("student", y, ctx, pos, self.critic_steps())

    def loss_critic(self, batch, ctx):
        h = self.hparams
        _, y, pos = batch
        x0, k, y, pos = self.critic_sample(y, ctx, pos)
        t = self._draw_time(ctx, pos, Purpose.TIME, "dsm_range")
        eps = ctx.randn(Purpose.NOISE, self.sample_shape, pos)
        x_t = self.noise_convention.add_noise(x0, eps, t)
        level = self.noise_convention.level(t).expand(x0.ndim)
        loss = dsm_loss(self.den.fake(x_t, t, y), x0, eps, x_t, level, self.den.fake.prediction, h.dsm_form,
                        h.dsm_weighting)
        return RoleStep(loss, outputs={"x0": x0, "k": k, "y": y, "pos": pos})

    def discriminator_sample(self, y, ctx, pos):
        """``(x0, k, y, pos)``: the fake samples the heads train on: the critic turn's of this iteration at
        :meth:`discriminator_steps`, or fresh ones."""
        return self._fake_samples("critic", y, ctx, pos, self.discriminator_steps())

    def loss_discriminator(self, batch, ctx):
        """The logistic (or hinge) loss of the heads: the batch's real digits against this iteration's
        fake samples (:meth:`discriminator_sample`), each through :meth:`disc_logits`."""
        h = self.hparams
        x_real, y, pos = batch
        fake, _, y_f, pos_f = self.discriminator_sample(y, ctx, pos)
        l_real = self.disc_logits(x_real, y, ctx, pos, (Purpose.TIME, Purpose.NOISE), False)
        l_fake = self.disc_logits(fake, y_f, ctx, pos_f, (Purpose.TIME, Purpose.EXTRA + 22), False)
        real, fake_half = discriminator_halves(l_real, l_fake, h.gan_loss)  # each the mean over its samples
        loss = real.mean() + fake_half.mean()
        sep = auc(l_real.flatten(1).mean(1).detach(), l_fake.flatten(1).mean(1).detach())
        return RoleStep(loss, {"discriminator/real_vs_fake": torch.tensor(sep)})
