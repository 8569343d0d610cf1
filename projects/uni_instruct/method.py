"""Uni-Instruct: one-step generators from the diffusion expansion of f-divergences
(papers/uni_instruct.md).

Everything runs in the EDM VE convention on x0-denoisers: the embedded flow teacher is wrapped by
SNR matching (``sigma = s / (1 - s)``, ``x_VE = x_s / (1 - s)``), and the generator is the
teacher's architecture evaluated at ``sigma_init = 2.5`` (flow time ``s = 0.714``):
``x_g = G(sigma_init z; sigma_init, y)``. The fake score is a full trainable copy of the teacher
whose middle-block tokens, averaged over channels, are the discriminator's logit map (no extra
parameters; one optimizer for both, spec pitfall 8).

Per iteration: the fake score and discriminator step on one half of the batch (generator samples
and real images, the same noise for both), then the generator on the other half. Phases (fractions
of the run, rescaled from the paper's 100k / 200k images): fake-score warm-up without generator
steps, then plain SiD (``rkl``, no GAN), then the selected preset with the GAN term.
"""
from __future__ import annotations

import copy
import math

import torch

from common import noise
from common.module import DistillationModule, Role
from common.sampling import OneStepGenerator
from common.teachers.adapters import ConventionAdapter
from common.teachers.denoiser import Guided
from common.teachers.embedded import load_teacher
from projects.uni_instruct.losses import (critic_loss, density_ratio, dmd_normaliser, generator_gan_loss,
                                          generator_loss)

Z, SIG_C, N_C, SIG_G, N_G = 1, 2, 3, 4, 5  # random-stream purposes


def edm_weight(sigma, sigma_d):
    return (sigma**2 + sigma_d**2) / (sigma * sigma_d) ** 2


class UniInstruct(DistillationModule):
    def __init__(self, teacher: str = "mnist", preset: str = "fkl", density_ratio: str = "logit_exp",
                 ratio_selfnorm: bool = False, di_norm: str = "per_sample", alpha: float = 1.0,
                 sigma_init: float = 2.5, sigma_d: float = 0.5, p_mean: float = -1.2, p_std: float = 1.2,
                 sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0, t_max: float = 0.8,
                 gan: bool = True, gan_weight: float = 0.01, g_scale: float = 100.0, feature_block: str = "block3",
                 warmup_until: int = 100, sid_until: int = 200, student_lr: float = 1e-5, critic_lr: float = 1e-5,
                 betas: list = (0.0, 0.999), guidance: float = 1.0, guidance_mode: str = "standard", **base):
        if base.get("schedule") is None:  # fake-score warm-up, then critic first, then the generator
            base["schedule"] = [{"until": warmup_until, "cycle": [["critic"]]},
                                {"until": None, "cycle": [["critic", "student"]]}]
        super().__init__(**base)
        self.save_hyperparameters()
        t = load_teacher(teacher)
        self.add_role(Role("teacher", t.net, False, teacher, source=t.source))
        self.add_role(Role("critic", copy.deepcopy(t.net).requires_grad_(True).train(), True, "teacher-copy",
                           lr=critic_lr, betas=tuple(betas)))
        self.add_role(Role("student", copy.deepcopy(t.net).requires_grad_(True).train(), True, "teacher",
                           lr=student_lr, betas=tuple(betas)))
        edm = noise.EDM(sigma_min, sigma_max)
        teacher_den = t
        if guidance != 1.0 or guidance_mode != "standard":  # the paper's EDM teachers run unguided (spec section 5)
            teacher_den = Guided(teacher_den, guidance, guidance_mode)
        self.teacher = ConventionAdapter(teacher_den, edm)
        self.fake = ConventionAdapter(t.with_net(self.roles["critic"].net), edm)
        self.student = ConventionAdapter(t.with_net(self.roles["student"].net), edm)
        self._with_net = t.with_net
        net = t.net
        self.sample_shape = (net.in_channels, net.image_size, net.image_size)
        self.chw = math.prod(self.sample_shape)

    # ---------------------------------------------------------------- helpers
    def generate(self, z, y, den=None):
        """``x_g = G(sigma_init z; sigma_init, y)``."""
        s = torch.full((len(z),), self.hparams.sigma_init, device=z.device)
        return (den or self.student)(self.hparams.sigma_init * z, s, y)

    def _fake_with_logits(self, x, sigma, y):
        p, feats = self.fake.x0_eps(x, sigma, y, return_features=[self.hparams.feature_block])
        f = feats[self.hparams.feature_block]
        # logit map: the channel mean of the features, tokens (B, N, D) -> (B, N), maps (B, C, h, w) -> (B, h, w)
        return p.x0, f.mean(-1) if f.ndim == 3 else f.mean(1)

    def _halves(self, batch, role):
        x, y, pos = batch
        h = len(x) // 2
        return (x[:h], y[:h], pos[:h]) if role == "critic" else (x[h:], y[h:], pos[h:])

    def _sigma_gen(self, pos):
        """``sigma = (smax^(1/rho) + (1 - u)(smin^(1/rho) - smax^(1/rho)))^rho``, ``u ~ U[0, t_max]``."""
        h = self.hparams
        u = h.t_max * self.rand_per_sample(pos, SIG_G)
        a, b = h.sigma_max ** (1 / h.rho), h.sigma_min ** (1 / h.rho)
        return (a + (1 - u) * (b - a)) ** h.rho

    # ---------------------------------------------------------------- steps
    def loss_critic(self, batch, ctx):
        h = self.hparams
        x_real, y, pos = self._halves(batch, "critic")
        with torch.no_grad():
            x_g = self.generate(self.randn_per_sample(pos, self.sample_shape, Z), y)
        sigma = torch.exp(h.p_mean + h.p_std * self.randn_per_sample(pos, (), SIG_C))
        n = sigma.view(-1, 1, 1, 1) * self.randn_per_sample(pos, self.sample_shape, N_C)  # same n, real and fake
        lam = edm_weight(sigma, h.sigma_d)
        y_f, logit_fake = self._fake_with_logits(x_g + n, sigma, y)
        logit_real = self._fake_with_logits(x_real + n, sigma, y)[1] if h.gan else None
        loss = critic_loss(y_f, x_g, lam, logit_fake if h.gan else None, logit_real)
        return loss, {}

    def loss_student(self, batch, ctx):
        h = self.hparams
        _, y, pos = self._halves(batch, "student")
        x_g = self.generate(self.randn_per_sample(pos, self.sample_shape, Z + 10), y)
        sigma = self._sigma_gen(pos)
        x_t = x_g + sigma.view(-1, 1, 1, 1) * self.randn_per_sample(pos, self.sample_shape, N_G)
        y_r = self.teacher(x_t, sigma, y)  # frozen weights; gradient flows through x_t
        y_f, logit = self._fake_with_logits(x_t, sigma, y)
        late = ctx.iteration >= h.sid_until  # before: plain SiD, no GAN (phase 2)
        preset = h.preset if late else "rkl"
        w_f = dmd_normaliser(x_g, y_r)
        if h.density_ratio == "code_bce":
            bce = generator_gan_loss(logit, torch.ones_like(w_f)).mean()
            r = density_ratio(logit, "code_bce", h.ratio_selfnorm, bce, self.chw, w_f)
        else:
            r = density_ratio(logit, "logit_exp", h.ratio_selfnorm)
        loss_g = generator_loss(x_g, y_r, y_f, r, preset, h.alpha, h.di_norm)
        loss = h.g_scale * loss_g.mean()
        logs = {"student/ratio_mean": r.mean(), "student/ratio_cv": r.std() / r.mean().clamp_min(1e-8),
                "student/phase_late": float(late)}
        if h.gan and late:
            gan = generator_gan_loss(logit, w_f)
            loss = loss + h.gan_weight * self.chw * gan.mean()
            logs["student/gan"] = gan.mean().detach()
        return loss, logs

    # ---------------------------------------------------------------- sampling
    def generator_denoiser(self) -> OneStepGenerator:
        """The EMA generator, sampled with one step from the EDM prior's noise."""
        ema = self.ema.ema_model
        den = ConventionAdapter(self._with_net(ema), self.student.convention)
        return OneStepGenerator(lambda z, y: self.generate(z, y, den), self.student.convention, ema)
