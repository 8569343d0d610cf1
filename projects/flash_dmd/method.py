"""Flash-DMD: DMD2 with a timestep-aware split of its generator losses, an image-space GAN on a frozen
encoder, a stabilised fake score, and joint reward fine-tuning (papers/flash_dmd.md; no public code,
so every open detail is a config field, default first).

The machinery (times, backward simulation, the DMD term, the critic and discriminator turns) is
:class:`common.dmd.MultiStepDMD`, shared with the DMD2 baseline (projects/dmd2).

* ``loss_split``: ``timestep_aware`` (the paper's) or ``summed`` (DMD2's: both terms on every sample).
  Split, each sample of the student turn gets one term: distribution matching when it is
  "high-noise", the GAN otherwise, ``L_G = sum_i [m_hi dmd_weight L_DM + m_lo gan_weight L_GAN] / B``
  (normalised by the batch, not by each term's count, section 7.3). ``split_by``: ``student_step``
  (the step's time ``t_k >= split_threshold``) or ``dmd_noise`` (the sample's DMD noise draw
  ``tau >= split_threshold``). ``split_threshold`` is a fraction of the time axis from the data end,
  mapped like the noise ranges (``time_map``): SDXL's ``tau = 500`` is ``500 / 999``, which puts the
  student steps 1.0 and 0.75 on DMD and 0.5 and 0.25 on the GAN.
* ``gan_space``: ``pixel`` (the paper's: heads on a frozen image encoder's feature maps of the clean
  output; SAM at paper scale, on the embedded benchmark the shipped autoencoder's encoder,
  common/nets/autoencoder.py, ``encoder_stages``; unconditional) or ``latent`` (DMD2's heads on the
  critic's features of the noised output).
* ``d_fake_source``: the heads' fake samples are the low-noise steps' outputs (``low_noise``) or all
  (``all``); ``fake_source``: the fake score trains on all steps' outputs (``all``, section 7.6) or
  the DMD steps' only (``dm_steps``). Both apply to ``split_by: student_step``.
* The stabilised fake score (section 4, open): (a) the update ratio is the schedule's; (b)
  ``fake_ema: beta`` reads ``x0_fake`` from an EMA of the critic (updated after each critic step,
  stored in checkpoints); (c) several critic steps per iteration are a schedule group naming the
  critic more than once.
* Stage 2 (``rl_mode``: ``none``, ``step_dpo``, ``reward_backprop``) from iteration ``rl_start``: the
  ``reward`` role (a frozen noise-conditioned scorer, projects/flash_dmd/reward.py, never the judge)
  and the frozen ``reference`` role, the student copied at ``rl_start`` (stored in checkpoints). The RL
  term joins the generator loss with weight ``rl_weight``, warmed up linearly over ``rl_warmup``
  student turns' iterations; ``rl_distill: false`` drops the distillation terms from ``rl_start`` on
  (the reward-only control).

  ``step_dpo``: a transition ``k`` among the first K - 1 steps, the backward-simulated input ``x_k``,
  the Gaussian policy ``N(a_{k+1} G(x_k, t_k), b_{k+1}^2)`` of the next input; ``rl_candidates``
  draws around the student's (detached) mean, scored by the reward at ``t_{k+1}``; the best and worst
  (skipped when their reward gap is under ``rl_margin``) enter
  ``-log sigmoid(rl_beta [(log pi(x_w) - log pi_ref(x_w)) - (log pi(x_l) - log pi_ref(x_l))])``.
  ``reward_backprop``: ``-R(x0_hat)`` at the data end through the student turn's output.
* ``sample_metrics``: the reward of validation samples (``val/reward_<steps>``, results.json): the
  held-out reward of the stabilisation claim, on the validation draws (never the training ones).
"""
from __future__ import annotations

import copy
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from common import noise
from common.config import ConfigError
from common.critics.discriminator import Discriminator
from common.dmd import MultiStepDMD
from common.nets.autoencoder import load_encoder
from common.rng import Purpose
from common.roles import RoleStep

LossSplit = Literal["timestep_aware", "summed"]
SplitBy = Literal["student_step", "dmd_noise"]
GanSpace = Literal["pixel", "latent"]
RLMode = Literal["none", "step_dpo", "reward_backprop"]
CHOICES = {"loss_split": ("timestep_aware", "summed"), "split_by": ("student_step", "dmd_noise"),
           "gan_space": ("pixel", "latent"), "d_fake_source": ("low_noise", "all"),
           "fake_source": ("all", "dm_steps"), "rl_mode": ("none", "step_dpo", "reward_backprop")}
RL = Purpose.EXTRA + 40  # the RL term's draws


def dpo_loss(mu: Tensor, mu_ref: Tensor, x_w: Tensor, x_l: Tensor, var: Tensor, beta: float):
    """``(loss, margin)`` per sample: ``-log sigmoid(beta margin)`` with ``margin = [log pi(x_w) - log
    pi_ref(x_w)] - [log pi(x_l) - log pi_ref(x_l)]`` for the Gaussian policies ``N(mu, var I)`` and
    ``N(mu_ref, var I)`` (``var`` per sample)."""
    def logp(xc, m):  # log N(xc; m, var I) up to a constant
        return -((xc - m) ** 2).flatten(1).sum(1) / (2 * var)

    margin = (logp(x_w, mu) - logp(x_w, mu_ref)) - (logp(x_l, mu) - logp(x_l, mu_ref))
    return -F.logsigmoid(beta * margin), margin


class FlashDMD(MultiStepDMD):
    def __init__(self, loss_split: LossSplit = "timestep_aware", split_by: SplitBy = "student_step",
                 split_threshold: float = 500 / 999, gan_space: GanSpace = "pixel", encoder: str = "mnist_ae",
                 encoder_stages: list | None = None, d_fake_source: str = "low_noise", fake_source: str = "all",
                 fake_ema: float = 0.0, rl_mode: RLMode = "none", reward: str = "mnist_reward",
                 rl_start: int = 0, rl_weight: float = 1.0, rl_warmup: int = 0, rl_beta: float = 0.05,
                 rl_candidates: int = 4, rl_margin: float = 0.0, rl_distill: bool = True, **dmd):
        # read by make_discriminator, which the base's __init__ calls before this one's hparams exist
        self._flash = dict(gan_space=gan_space, encoder=encoder,
                           encoder_stages=list(encoder_stages if encoder_stages is not None else [1, 2, 3]))
        super().__init__(**dmd)
        self.save_hyperparameters()
        for key, allowed in CHOICES.items():
            if self.hparams[key] not in allowed:
                raise ConfigError(f"module.{key} must be one of {list(allowed)}, got {self.hparams[key]!r}")
        if not 0.0 < split_threshold < 1.0:
            raise ConfigError(f"module.split_threshold must be a fraction of the time axis in (0, 1), got "
                              f"{split_threshold}")
        self.split_time = float(self._time(torch.tensor(float(split_threshold))))
        high = [i for i, t in enumerate(self.times) if self._noisier(t, self.split_time)]
        self.dm_steps, self.gan_steps = high, [i for i in range(len(self.times)) if i not in high]
        if loss_split == "timestep_aware" and split_by == "student_step" and (not high or not self.gan_steps):
            raise ConfigError(f"module.split_threshold={split_threshold} puts every student step "
                              f"{self.times} on one side (DMD on {high}); no step would get the "
                              f"{'GAN' if not self.gan_steps else 'DMD term'}")
        if loss_split == "timestep_aware" and not self.hparams.gan:
            raise ConfigError("module.loss_split=timestep_aware needs module.gan=true (its low-noise term)")
        if not 0.0 <= fake_ema < 1.0:
            raise ConfigError(f"module.fake_ema must be 0 (off) or a decay in (0, 1), got {fake_ema}")
        if fake_ema:
            if self.roles["critic"].init != "copy":
                raise ConfigError("module.fake_ema needs a full critic copy (roles.critic.init=copy)")
            self.critic_ema = copy.deepcopy(self.roles["critic"].net).requires_grad_(False).eval()
        if rl_mode != "none":
            if rl_candidates < 2:
                raise ConfigError(f"module.rl_candidates must be at least 2, got {rl_candidates}")
            if rl_mode == "step_dpo" and len(self.times) < 2:
                raise ConfigError("module.rl_mode=step_dpo needs at least 2 student steps (a transition)")
            net, source = self._load_reward(reward)
            self.add_role("reward", net, reward, trainable=False, source=source)
            ref = copy.deepcopy(self.roles["student"].net)
            self.add_role("reference", ref, "student_at_rl_start", trainable=False)
            self.den.reference = self.den.flow.with_net(ref)
            # the iteration the reference was copied at (-1: not yet); a buffer, so resumes keep it
            self.register_buffer("reference_copied_at", torch.tensor(-1, dtype=torch.long))

    @staticmethod
    def _load_reward(name):
        from projects.flash_dmd.reward import load_reward

        try:
            return load_reward(name)
        except FileNotFoundError:
            raise ConfigError(f"module.reward: no reward weights at {name!r}") from None

    def _noisier(self, t, than: float):
        """Whether time ``t`` (a float or a tensor) is at least as noisy as ``than``."""
        c = self.noise_convention
        return (t >= than) if c.t_noise > c.t_data else (t <= than)

    # ---------------------------------------------------------------- the pixel discriminator
    def make_discriminator(self, teacher_net) -> Discriminator:
        f = self._flash
        if f["gan_space"] == "latent":
            return super().make_discriminator(teacher_net)
        try:
            enc, source = load_encoder(f["encoder"])
        except FileNotFoundError:
            raise ConfigError(f"module.encoder: no encoder weights at {f['encoder']!r}") from None
        bad = [s for s in f["encoder_stages"] if not 0 <= s < len(enc.widths)]
        if bad or not f["encoder_stages"]:
            raise ConfigError(f"module.encoder_stages must name stages among 0..{len(enc.widths) - 1} of the "
                              f"encoder, got {f['encoder_stages']}")
        self.add_role("encoder", enc, f["encoder"], trainable=False, source=source)
        h = self.hparams
        try:
            return Discriminator({f"stage{s}": enc.widths[s] for s in f["encoder_stages"]}, h.disc_hidden,
                                 h.disc_pool, h.disc_head)
        except ValueError as e:
            raise ConfigError(f"module.disc_head / disc_pool: {e}") from None

    def disc_logits(self, x0, y, ctx, pos, purposes, features_grad: bool):
        """Pixel space: the heads on the frozen encoder's stage maps of the clean ``x0`` (unconditional;
        a gradient reaches ``x0`` when ``features_grad``); latent: DMD2's."""
        if self.hparams.gan_space == "latent":
            return super().disc_logits(x0, y, ctx, pos, purposes, features_grad)
        with torch.set_grad_enabled(torch.is_grad_enabled() and features_grad):
            _, maps = self.roles["encoder"].net(x0, return_features=True)
        return self.roles["discriminator"].net({f"stage{s}": maps[s] for s in self._flash["encoder_stages"]})

    # ---------------------------------------------------------------- the split
    def critic_steps(self):
        h = self.hparams
        split = h.loss_split == "timestep_aware" and h.split_by == "student_step"
        return self.dm_steps if split and h.fake_source == "dm_steps" else None

    def discriminator_steps(self):
        h = self.hparams
        split = h.loss_split == "timestep_aware" and h.split_by == "student_step"
        return self.gan_steps if split and h.d_fake_source == "low_noise" else None

    def fake_score(self):
        return self.den.flow.with_net(self.critic_ema) if self.hparams.fake_ema else self.den.fake

    def after_optimizer_step(self, name):
        super().after_optimizer_step(name)
        if name == "critic" and self.hparams.fake_ema:
            with torch.no_grad():
                live = list(self.roles["critic"].net.parameters())
                torch._foreach_lerp_(list(self.critic_ema.parameters()), live, 1.0 - self.hparams.fake_ema)

    def distill_terms(self, x0, k, y, ctx, pos):
        """``(L per sample, logs)``: the DMD and GAN terms of the student turn, split or summed."""
        h = self.hparams
        B = len(y)
        loss, logs = x0.new_zeros(B), {}
        tau = self.dmd_time(ctx, pos)
        if h.loss_split == "summed":
            hi = lo = torch.ones(B, dtype=torch.bool, device=x0.device)
        else:
            t = torch.tensor(self.times, device=x0.device)[k] if h.split_by == "student_step" else tau
            hi = self._noisier(t, self.split_time)
            lo = ~hi
        logs["student/dmd_fraction"] = hi.float().mean()
        if h.dmd_weight > 0 and hi.any():
            l_dm, g_norm = self.dmd_term(x0[hi], y[hi], ctx, pos[hi], tau=tau[hi])
            loss = loss.index_add(0, hi.nonzero().squeeze(1), h.dmd_weight * l_dm)
            logs.update({"student/dmd": l_dm.mean().detach(), "student/dmd_g_norm": g_norm.mean()})
        if h.gan and h.gan_weight > 0 and lo.any():
            l_gan = self.gan_term(x0[lo], y[lo], ctx, pos[lo])
            loss = loss.index_add(0, lo.nonzero().squeeze(1), h.gan_weight * l_gan)
            logs["student/gan"] = l_gan.mean().detach()
        return loss, logs

    # ---------------------------------------------------------------- stage 2
    def rl_active(self, ctx) -> bool:
        return self.hparams.rl_mode != "none" and ctx.iteration >= self.hparams.rl_start

    def rl_scale(self, ctx) -> float:
        h = self.hparams
        return h.rl_weight * (min(1.0, (ctx.iteration - h.rl_start + 1) / h.rl_warmup) if h.rl_warmup else 1.0)

    def reward_score(self, x: Tensor, t: Tensor) -> Tensor:
        """The reward of ``x`` at time ``t`` of the teacher's convention (converted to the reward's flow
        time ``s``: ``x_s = (1 - s) x0 + s eps``)."""
        c, t = self.noise_convention, torch.as_tensor(t, device=x.device).expand(len(x))
        if not isinstance(c, noise.RectifiedFlow) and bool((c.level(t).b > 0).all()):
            x, t = noise.convert_sample(x, t, c, noise.RectifiedFlow())
        elif not isinstance(c, noise.RectifiedFlow):  # clean samples: the data end, s = 0
            t = torch.zeros_like(t)
        return self.roles["reward"].net(x, t)

    @torch.no_grad()
    def copy_reference(self, it: int) -> None:
        self.roles["reference"].net.load_state_dict(self.roles["student"].net.state_dict())
        self.reference_copied_at.fill_(it)

    def rl_term(self, x0, y, ctx, pos) -> tuple[Tensor, dict]:
        """``(L_RL per sample, logs)``; ``x0`` is the student turn's output (with grad)."""
        h = self.hparams
        if h.rl_mode == "reward_backprop":
            t0 = torch.full((len(y),), self.noise_convention.t_data, device=x0.device)
            r = self.reward_score(x0, t0)
            return -r, {"student/rl_reward": r.mean().detach()}
        conv = self.noise_convention
        times = torch.tensor(self.times, device=self.device)
        k = self._steps(ctx, pos, allowed=list(range(len(self.times) - 1)))
        x, t = self.backward_simulation(y, k, ctx, pos)
        mean = self.den.student.predict(x, t, y)
        with torch.no_grad():
            mean_ref = self.den.reference.predict(x, t, y)
        lvl = conv.level(times[k + 1]).expand(x.ndim)
        mu, mu_ref = lvl.a * mean, lvl.a * mean_ref
        n = h.rl_candidates
        eps = torch.stack([ctx.randn(RL + j, self.sample_shape, pos) for j in range(n)])  # (N, B, ...)
        cands = mu.detach()[None] + lvl.b[None] * eps
        with torch.no_grad():
            r = torch.stack([self.reward_score(c, times[k + 1]) for c in cands])  # (N, B)
        w, l = r.argmax(0), r.argmin(0)
        idx = torch.arange(len(y), device=x.device)
        gap = r[w, idx] - r[l, idx]
        keep = gap > h.rl_margin
        loss, margin = dpo_loss(mu, mu_ref, cands[w, idx], cands[l, idx], lvl.b.flatten() ** 2, h.rl_beta)
        return loss * keep, {"student/rl_dpo_margin": margin.mean().detach(), "student/rl_kept": keep.float().mean(),
                             "student/rl_reward_gap": gap.mean()}

    # ---------------------------------------------------------------- the student turn
    def loss_student(self, batch, ctx):
        h = self.hparams
        _, y, pos = batch
        B = len(y)
        rl = self.rl_active(ctx)
        if rl and int(self.reference_copied_at) < 0:
            self.copy_reference(ctx.iteration)
        x0, k = self.student_sample(y, ctx, pos, grad=True)
        loss, logs = x0.new_zeros(B), {"student/k_mean": k.float().mean()}
        if not rl or h.rl_distill:
            loss, logs = self.distill_terms(x0, k, y, ctx, pos)
            logs["student/k_mean"] = k.float().mean()
        if rl:
            l_rl, rl_logs = self.rl_term(x0, y, ctx, pos)
            loss = loss + self.rl_scale(ctx) * l_rl
            logs.update(rl_logs)
        if self.wants_grad_cosines(ctx):
            logs.update(self.grad_cosines(y, ctx, pos))
        return RoleStep(loss.sum() / B, logs, outputs={"x0": x0.detach(), "k": k})

    # ---------------------------------------------------------------- validation figures
    @property
    def sample_metric_names(self):
        return ("reward",) if "reward" in self.roles else ()

    @torch.no_grad()
    def sample_metrics(self, x: Tensor, labels) -> dict:
        """The mean reward of validation samples at the data end (the held-out reward); none without RL."""
        if "reward" not in self.roles:
            return {}
        x = x.to(self.device)
        t0 = torch.full((len(x),), self.noise_convention.t_data, device=self.device)
        return {"reward": float(torch.cat([self.reward_score(xb, tb) for xb, tb in
                                           zip(x.split(250), t0.split(250))]).mean())}
