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
from common.teachers.adapters import ConventionAdapter
from common.teachers.embedded import flow_denoiser, load_teacher
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
                 betas: list = (0.0, 0.999), **base):
        if base.get("schedule") is None:  # fake-score warm-up, then critic first, then the generator
            base["schedule"] = [{"until": warmup_until, "cycle": [["critic"]]},
                                {"until": None, "cycle": [["critic", "student"]]}]
        super().__init__(**base)
        self.save_hyperparameters()
        t = load_teacher(teacher)
        self.add_role(Role("teacher", t.net, False, f"embedded:{teacher}", source=t.source))
        self.add_role(Role("critic", copy.deepcopy(t.net).requires_grad_(True).train(), True, "teacher-copy",
                           lr=critic_lr, betas=tuple(betas)))
        self.add_role(Role("student", copy.deepcopy(t.net).requires_grad_(True).train(), True, "teacher",
                           lr=student_lr, betas=tuple(betas)))
        edm = noise.EDM(sigma_min, sigma_max)
        self.teacher = ConventionAdapter(flow_denoiser(self.roles["teacher"].net), edm)
        self.fake = ConventionAdapter(flow_denoiser(self.roles["critic"].net), edm)
        self.student = ConventionAdapter(flow_denoiser(self.roles["student"].net), edm)
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
        tokens = feats[self.hparams.feature_block]  # (B, N, D)
        return p.x0, tokens.mean(-1)  # logit map: channel mean of the tokens, (B, N)

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
    def generator_denoiser(self):
        """The EMA generator as a one-step Denoiser: at any time it returns ``G(sigma_init z)`` for the
        noise ``z`` implied by its input, so the one-step multistep sampler gives exactly G's sample."""
        return OneStep(flow_denoiser(self.ema.ema_model), self.hparams.sigma_init, self.hparams.sigma_min,
                       self.hparams.sigma_max)


class OneStep(torch.nn.Module):
    """Sampling wrapper: convention EDM; the sampler's start noise ``x = sigma_max z`` becomes ``z``."""

    def __init__(self, flow_den, sigma_init, sigma_min, sigma_max):
        super().__init__()
        self.convention = noise.EDM(sigma_min, sigma_max)
        self.inner = ConventionAdapter(flow_den, self.convention)
        self.sigma_init = sigma_init
        self.null_label = None

    @property
    def net(self):
        return self.inner.net

    def level(self, t):
        return self.convention.level(t)

    def x0_eps(self, x, t, cond):
        sigma = torch.as_tensor(t, dtype=torch.float64)
        z = x / sigma.to(x.dtype)
        s = torch.full((len(x),), self.sigma_init, device=x.device)
        return self.inner.x0_eps(self.sigma_init * z, s, cond)
