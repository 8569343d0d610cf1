"""Uni-Instruct: one-step generators from the diffusion expansion of f-divergences
(papers/uni_instruct.md).

Everything runs in the EDM VE convention on x0-denoisers: the embedded flow teacher is wrapped by
SNR matching (``sigma = s / (1 - s)``, ``x_VE = x_s / (1 - s)``), and the generator is the
teacher's architecture evaluated at ``sigma_init = 2.5`` (flow time ``s = 0.714``):
``x_g = G(sigma_init z; sigma_init, y)``. The fake score is a full trainable copy of the teacher
whose middle-block tokens, averaged over channels, are the discriminator's logit map (no extra
parameters; one optimizer for both, spec pitfall 8).

Per iteration: the fake score and discriminator step on one half of the batch (generator samples
and real images, the same noise for both), then the generator on the other half. The schedule's
phases (fractions of the run, rescaled from the paper's 100k / 200k images): ``warmup`` (fake score
only), ``sid`` (plain SiD: ``rkl``, no GAN), then ``main`` (the selected preset with the GAN term).
``discriminator: head`` replaces the channel-mean logit by a trained head
(common/critics/discriminator.py), its own role ``discriminator`` (optimizer ``roles.discriminator``):
pooled over the block's tokens of the frozen teacher (``disc_features: teacher``, stationary while
the generator moves) or of the fake score (``fake``, read without changing it), trained by its own
GAN loss (``disc_loss``, unweighted over sigma) on fresh (real, generated) pairs at each of its steps.
The schedule says how often it steps: ``[critic, discriminator, discriminator, student]`` gives it
two steps an iteration. ``discriminator.json`` records how well the discriminator separates held-out
real digits from generated ones at the end of a run.

``gradient`` chooses the main phase's surrogate: ``paper`` (the spec's presets), ``exact`` (the
exact gradient of the expansion at each sigma, losses.exact_loss) or ``exact_sid`` (SiD's alpha
shift, not exact); the ``sid`` phase is always the paper's SiD. ``jeffrey_weights: [w_fkl, w_rkl]``
weighs the Jeffrey preset's two divergences; ``preset: custom`` with ``custom: [dotted.path.a,
dotted.path.b]`` takes the branch weights ``a(r)``, ``b(r)`` from two functions.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal

import torch

from common import noise
from common.config import locate
from common.critics.discriminator import Discriminator, GanLoss, auc, discriminator_loss
from common.one_step import OneStepDistillation
from common.rng import Purpose
from common.roles import RoleStep
from common.teachers.adapters import ConventionAdapter
from common.teachers.denoiser import CFGMode, Guided
from projects.uni_instruct.losses import (Gradient, Preset, critic_loss, density_ratio, dmd_normaliser, generator_gan_loss,
                                          generator_loss)

LATE_PHASE = "main"  # the schedule phase in which the selected preset and the GAN term apply


def edm_weight(sigma, sigma_d):
    return (sigma**2 + sigma_d**2) / (sigma * sigma_d) ** 2


class UniInstruct(OneStepDistillation):
    critic_inits = ("copy",)  # the fake score is also the discriminator: a full copy (spec pitfall 8)

    def __init__(self, teacher: str = "mnist", preset: Preset = "fkl",
                 density_ratio: Literal["logit_exp", "code_bce"] = "logit_exp", ratio_selfnorm: bool = False,
                 di_norm: Literal["per_sample", "batch", "none"] = "per_sample", alpha: float = 1.0,
                 sigma_init: float = 2.5, sigma_d: float = 0.5, p_mean: float = -1.2, p_std: float = 1.2,
                 sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0, t_max: float = 0.8,
                 gradient: Gradient = "paper", jeffrey_weights: list | None = None, custom: list | None = None,
                 discriminator: Literal["mean", "head"] = "mean", disc_hidden: int = 128, disc_pool: bool = True,
                 disc_loss: GanLoss = "ns", disc_features: Literal["teacher", "fake"] = "teacher",
                 gan: bool = True, gan_weight: float = 0.01, g_scale: float = 100.0, feature_block: str = "block3",
                 guidance: float = 1.0, guidance_mode: CFGMode = "standard", **base):
        super().__init__(**base)
        self.save_hyperparameters()
        t = self.add_teacher_roles(teacher)
        edm = noise.EDM(sigma_min, sigma_max)
        teacher_den = t
        if guidance != 1.0 or guidance_mode != "standard":  # the paper's EDM teachers run unguided (spec section 5)
            teacher_den = Guided(teacher_den, guidance, guidance_mode)
        self.den.teacher = ConventionAdapter(teacher_den, edm)
        self.den.fake = ConventionAdapter(t.with_net(self.roles["critic"].net), edm)
        self.den.student = ConventionAdapter(t.with_net(self.roles["student"].net), edm)
        self.den.teacher_features = ConventionAdapter(t, edm)  # unguided: the head's frozen features
        self.den.with_net = t.with_net
        self.noise_convention = edm
        self.chw = math.prod(self.sample_shape)
        if (preset == "custom") != (custom is not None):
            raise ValueError("module.custom: [dotted.path.a, dotted.path.b] goes with module.preset=custom")
        self.custom = tuple(locate(f) for f in custom) if custom else None  # a(r), b(r)
        if discriminator == "head":  # a trained head on the block's tokens: a role of its own
            dim = self.roles["critic"].net.dim
            self.add_role("discriminator", Discriminator({feature_block: dim}, disc_hidden, disc_pool), "scratch")

    # ---------------------------------------------------------------- helpers
    def generate(self, z, y, net=None):
        """``x_g = G(sigma_init z; sigma_init, y)``."""
        den = self.den.student if net is None else ConventionAdapter(self.den.with_net(net), self.noise_convention)
        s = torch.full((len(z),), self.hparams.sigma_init, device=z.device)
        return den(self.hparams.sigma_init * z, s, y)

    def _fake_with_logits(self, x, sigma, y):
        """The fake score's x0 and the discriminator's logits on the same input (one forward of the
        fake score when the logits are its channel mean)."""
        h = self.hparams
        if h.discriminator == "head":
            return self.den.fake(x, sigma, y), self._logits(x, sigma, y)
        p, feats = self.den.fake.x0_eps(x, sigma, y, return_features=[h.feature_block])
        f = feats[h.feature_block]
        # logit map: the channel mean of the features, tokens (B, N, D) -> (B, N), maps (B, C, h, w) -> (B, h, w)
        return p.x0, f.mean(-1) if f.ndim == 3 else f.mean(1)

    def _logits(self, x, sigma, y, features_grad: bool = True):
        """The discriminator's logits alone. The head's features (frozen teacher or fake score) pass a
        gradient to ``x`` unless ``features_grad`` is false (the head's own step: only its weights learn)."""
        h = self.hparams
        if h.discriminator != "head":
            return self._fake_with_logits(x, sigma, y)[1]
        den = self.den.teacher_features if h.disc_features == "teacher" else self.den.fake
        with torch.set_grad_enabled(torch.is_grad_enabled() and features_grad):
            _, feats = den.x0_eps(x, sigma, y, return_features=[h.feature_block])
        return self.roles["discriminator"].net(feats)

    @staticmethod
    def _half(batch, ctx):
        """The fake score and the discriminator read the first half of the batch, the generator the second."""
        x, y, pos = batch
        h = len(x) // 2
        return (x[h:], y[h:], pos[h:]) if ctx.role == "student" else (x[:h], y[:h], pos[:h])

    def _sigma_gen(self, ctx, pos):
        return self._sigma_of(ctx.rand(Purpose.TIME, pos))

    def _sigma_of(self, u01):
        """The generator step's noise levels: ``sigma = (smax^(1/rho) + (1 - u)(smin^(1/rho) -
        smax^(1/rho)))^rho``, ``u = t_max u01 ~ U[0, t_max]``."""
        h = self.hparams
        u = h.t_max * u01
        a, b = h.sigma_max ** (1 / h.rho), h.sigma_min ** (1 / h.rho)
        return (a + (1 - u) * (b - a)) ** h.rho

    # ---------------------------------------------------------------- the discriminator, measured
    @torch.no_grad()
    def separation(self, x_real, y_real, seed: int = 0, batch: int = 250) -> dict:
        """How well the discriminator tells held-out real images from generated ones, at the generator
        step's noise levels (one sigma per pair, the same noise on both): the AUC of its per-sample
        logit, and the coefficient of variation of the ratio ``r`` it gives the generated samples (the
        footing of ``student/ratio_cv``), overall and by band of sigma. The samples come from the online
        generator, the one the discriminator was trained against (not its EMA)."""
        g = torch.Generator().manual_seed(seed)
        n = len(x_real)
        z = torch.randn(n, *self.sample_shape, generator=g)
        sigma = self._sigma_of(torch.rand(n, generator=g))
        e = torch.randn(n, *self.sample_shape, generator=g)
        real, fake = [], []
        for i in range(0, n, batch):
            sl = slice(i, i + batch)
            dev = lambda t: t[sl].to(self.device)  # noqa: E731
            x_g = self.generate(dev(z), dev(y_real))
            s, noise = dev(sigma), dev(sigma).view(-1, 1, 1, 1) * dev(e)
            real.append(self._logits(dev(x_real) + noise, s, dev(y_real)).flatten(1).mean(1).cpu())
            fake.append(self._logits(x_g + noise, s, dev(y_real)).flatten(1).mean(1).cpu())
        real, fake = torch.cat(real).double(), torch.cat(fake).double()
        r = density_ratio(fake[:, None], "logit_exp")  # per sample, as in the generator step

        def figures(m):
            return {"n": int(m.sum()), "auc": auc(real[m], fake[m]), "ratio_cv": float(r[m].std() / r[m].mean())}

        bands = {"sigma<0.1": sigma < 0.1, "0.1<=sigma<1": (sigma >= 0.1) & (sigma < 1), "sigma>=1": sigma >= 1}
        return {"discriminator": self.hparams.discriminator, **figures(torch.ones(n, dtype=torch.bool)),
                "bands": {k: figures(m) for k, m in bands.items() if m.any()}}

    def on_train_end(self):
        """With a discriminator, on the embedded data: its held-out separation -> ``discriminator.json``."""
        from common.data import embedded
        from common.data.datamodule import EmbeddedDataModule

        dm = getattr(self.trainer, "datamodule", None)
        if not self.hparams.gan or self.trainer.global_rank != 0 or type(dm) is not EmbeddedDataModule:
            return
        x, y = embedded.load_tensors(dm.name, "heldout", dm.root)
        was = self.training
        self.eval()
        res = self.separation(x, y)
        self.train(was)
        path = Path(self.trainer.default_root_dir) / "discriminator.json"
        path.write_text(json.dumps(res, indent=2))
        print(f"discriminator ({res['discriminator']}), held-out real vs generated at the generator's noise "
              f"levels: AUC {res['auc']:.3f}, ratio CV {res['ratio_cv']:.3f} ({path})", flush=True)

    # ---------------------------------------------------------------- steps
    def _pair(self, batch, ctx):
        """Real images of this role's half and generator samples for them, noised alike: the same
        sigma ~ logN(p_mean, p_std^2) and noise for both. Returns (x_real + n, x_g, n, sigma, y)."""
        h = self.hparams
        x_real, y, pos = self._half(batch, ctx)
        with torch.no_grad():
            x_g = self.generate(ctx.randn(Purpose.LATENT, self.sample_shape, pos), y)
        sigma = torch.exp(h.p_mean + h.p_std * ctx.randn(Purpose.TIME, (), pos))
        n = sigma.view(-1, 1, 1, 1) * ctx.randn(Purpose.NOISE, self.sample_shape, pos)
        return x_real + n, x_g, n, sigma, y

    def loss_critic(self, batch, ctx):
        h = self.hparams
        real_t, x_g, n, sigma, y = self._pair(batch, ctx)
        lam = edm_weight(sigma, h.sigma_d)
        if h.discriminator == "head":  # the head has its own role and step (loss_discriminator)
            return RoleStep(critic_loss(self.den.fake(x_g + n, sigma, y), x_g, lam))
        # the channel-mean logits train through the shared encoder, EDM-weighted
        y_f, logit_fake = self._fake_with_logits(x_g + n, sigma, y)
        logit_real = self._logits(real_t, sigma, y) if h.gan else None
        return RoleStep(critic_loss(y_f, x_g, lam, logit_fake if h.gan else None, logit_real))

    def loss_discriminator(self, batch, ctx):
        """The head's GAN loss, unweighted over sigma (the EDM weight, ~1/sigma^2, would train it at the
        smallest noise levels only), on a fresh pair at each of its steps (``ctx.repeat`` keys the draws)."""
        real_t, x_g, n, sigma, y = self._pair(batch, ctx)
        logit_real = self._logits(real_t, sigma, y, features_grad=False)
        logit_fake = self._logits(x_g + n, sigma, y, features_grad=False)
        sep = (logit_real.flatten(1).mean(1) > logit_fake.flatten(1).mean(1)).float().mean()
        return RoleStep(discriminator_loss(logit_real, logit_fake, self.hparams.disc_loss).mean(),
                        {"discriminator/pair_acc": sep})

    def loss_student(self, batch, ctx):
        h = self.hparams
        _, y, pos = self._half(batch, ctx)
        x_g = self.generate(ctx.randn(Purpose.LATENT, self.sample_shape, pos), y)
        sigma = self._sigma_gen(ctx, pos)
        x_t = x_g + sigma.view(-1, 1, 1, 1) * ctx.randn(Purpose.NOISE, self.sample_shape, pos)
        y_r = self.den.teacher(x_t, sigma, y)  # frozen weights; gradient flows through x_t
        y_f, logit = self._fake_with_logits(x_t, sigma, y)
        late = ctx.phase == LATE_PHASE  # before: plain SiD, no GAN (phase "sid")
        preset = h.preset if late else "rkl"
        w_f = dmd_normaliser(x_g, y_r)
        if h.density_ratio == "code_bce":
            bce = generator_gan_loss(logit, torch.ones_like(w_f)).mean()
            r = density_ratio(logit, "code_bce", h.ratio_selfnorm, bce, self.chw, w_f)
        else:
            r = density_ratio(logit, "logit_exp", h.ratio_selfnorm)
        loss_g = generator_loss(x_g, y_r, y_f, r, preset, h.alpha, h.di_norm, h.jeffrey_weights,
                                gradient=h.gradient if late else "paper", sigma=sigma, custom=self.custom)
        loss = h.g_scale * loss_g.mean()
        logs = {"student/ratio_mean": r.mean(), "student/ratio_cv": r.std() / r.mean().clamp_min(1e-8),
                "student/phase_late": float(late)}
        if h.gan and late:
            gan = generator_gan_loss(logit, w_f)
            loss = loss + h.gan_weight * self.chw * gan.mean()
            logs["student/gan"] = gan.mean().detach()
        return RoleStep(loss, logs)
