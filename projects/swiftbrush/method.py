"""SwiftBrush (v1): image-free one-step distillation by variational score distillation (VSD)
with a LoRA fake score (papers/swiftbrush.md).

Per iteration, on one batch of labels (no image is ever read): a student step, then a fake-score
step on the same student samples (1:1).

With the embedded flow teacher the student is a one-step generator in the teacher's own
parameterisation at pure noise, ``x0 = z - u_theta(z, s=1, c)``, initialised from the teacher; the
VSD weight is ``b^2 = s^2`` and the VP timestep range [20, 980] maps to ``s in [s_min, s_max]``
(default [0.02, 0.98]).
"""
from __future__ import annotations

import copy

import torch

from common import noise
from common.critics.lora import adapters_disabled, add_lora, lora_parameters
from common.module import DistillationModule, Role, Schedule
from common.sampling import OneStepGenerator
from common.teachers.denoiser import Guided
from common.teachers.embedded import load_teacher
from common.teachers.hub import load_null_embedding
from projects.swiftbrush.losses import fake_score_loss, vsd_generator_loss

NOISE, TIME, DROP, TIME_C, NOISE_C = 1, 2, 3, 4, 5  # random-stream purposes


class SwiftBrush(DistillationModule):
    def __init__(self, teacher: str = "mnist", guidance: float = 2.0, guidance_mode: str = "standard",
                 objective: str = "vsd", fake_cfg: str = "none", fake_loss_weight: str = "uniform",
                 critic: str = "lora",
                 lora_rank: int = 16, lora_alpha: float = 16.0, lora_targets: list | None = None,
                 s_min: float = 0.02, s_max: float = 0.98, label_dropout: float = 0.1,
                 student_time: float | None = None, null_embedding: str | None = None,
                 student_lr: float = 1e-5, critic_lr: float = 1e-3, betas: list = (0.9, 0.999),
                 grad_clip: float = 1.0, **base):
        super().__init__(**base)
        if objective not in ("vsd", "sds"):
            raise ValueError(f"objective must be 'vsd' or 'sds', got {objective!r}")
        if fake_cfg not in ("none", "same_as_teacher"):
            raise ValueError(f"fake_cfg must be 'none' or 'same_as_teacher', got {fake_cfg!r}")
        if critic not in ("lora", "full"):
            raise ValueError(f"critic must be 'lora' or 'full', got {critic!r}")
        self.save_hyperparameters()
        den = load_teacher(teacher)
        if null_embedding is not None:  # text teachers: the empty prompt's embedding, from the prompt file
            den.null_embedding = load_null_embedding(null_embedding)
        net = den.net
        self.sample_shape = (net.in_channels, net.image_size, net.image_size)
        conv = den.convention
        self.t_g = float(conv.t_noise if student_time is None else student_time)  # the student's one time
        student = copy.deepcopy(net).requires_grad_(True).train()
        self.add_role(Role("teacher", net, False, teacher, source=den.source))
        if objective == "sds":  # SDS: the injected noise stands in for the fake score; no critic role
            if base.get("schedule") and "critic" in Schedule.from_config(base["schedule"]).roles():
                raise ValueError("objective=sds has no critic: set module.schedule=[{until: null, cycle: [[student]]}]")
            fake_net = None
        elif critic == "lora":  # the fake score shares the teacher's frozen weights, trains adapters only
            fake_net = add_lora(net, rank=lora_rank, alpha=lora_alpha, targets=lora_targets)
            self.add_role(Role("critic", fake_net, True, "lora-on-teacher", lr=critic_lr, betas=tuple(betas),
                               grad_clip=grad_clip, params=lora_parameters))
        else:
            fake_net = copy.deepcopy(net).requires_grad_(True)
            self.add_role(Role("critic", fake_net, True, "teacher-copy", lr=critic_lr, betas=tuple(betas),
                               grad_clip=grad_clip))
        self.add_role(Role("student", student, True, "teacher", lr=student_lr, betas=tuple(betas),
                           grad_clip=grad_clip))
        self.teacher, self.student = den, den.with_net(student)
        self.fake = None if fake_net is None else den.with_net(fake_net)

    def _time(self, u, lo, hi):
        """A time at the fractions [lo, hi] of the teacher's axis: ``t ~ U{lo T..hi T}`` for a discrete
        VP teacher (the paper's [20, 980] of 1000 steps), ``s ~ U[lo, hi]`` for a flow teacher."""
        conv = self.teacher.convention
        if isinstance(conv, noise.DiscreteVP):
            a, b = round(lo * conv.num_steps), min(round(hi * conv.num_steps), conv.num_steps - 1)
            return torch.floor(a + u * (b - a + 1)).clamp(max=b)
        return lo + (hi - lo) * u

    def _teacher_call(self, x, s, c):
        den = Guided(self.teacher, self.hparams.guidance, self.hparams.guidance_mode)
        if self.fake is not None and self.hparams.critic == "lora":  # LoRA on the teacher's own net
            with adapters_disabled(self.roles["teacher"].net):
                return den.x0_eps(x, s, c)
        return den.x0_eps(x, s, c)

    def generate(self, z, c, net=None):
        """One step from pure noise at the teacher's last time, in the teacher's parameterisation: VP
        ``x0 = (z - sigma_T eps(z, T, c)) / alpha_T``, flow ``x0 = z - u(z, 1, c)``. ``student_time``
        below the last time feeds ``x = z b(t_g) / b(T)`` (an extension, not the paper's form)."""
        den = self.student if net is None else self.teacher.with_net(net)
        conv = den.convention
        t = torch.full((len(z),), self.t_g, device=z.device)
        scale = float(conv.level(t[:1].double()).b / conv.level(torch.tensor([float(conv.t_noise)])).b)
        return den.predict(z * scale, t, c, "x0")

    # ---------------------------------------------------------------- steps (algorithm box, section 4)
    def loss_student(self, batch, ctx):
        c, pos = batch
        h = self.hparams
        z = self.randn_per_sample(pos, self.sample_shape, NOISE)
        x0 = self.generate(z, c)  # 1. student sample, with grad
        s = self._time(self.rand_per_sample(pos, TIME), h.s_min, h.s_max)  # 2. t ~ U[t_min, t_max]
        eps = self.randn_per_sample(pos, self.sample_shape, NOISE + 10)
        x_s = self.student.convention.add_noise(x0.detach(), eps, s)
        with torch.no_grad():
            eps_real = self._teacher_call(x_s, s, c).eps
            if h.objective == "sds":  # score distillation sampling: eps_fake = the injected noise
                eps_fake = eps
            else:
                fake = Guided(self.fake, h.guidance, h.guidance_mode) if h.fake_cfg == "same_as_teacher" else self.fake
                eps_fake = fake.x0_eps(x_s, s, c).eps
        lv = self.student.level(s)
        # the student's x0 enters x_s linearly (a = 1 - s); VSD's w(t) = b^2 drops that factor (spec pitfall 4)
        loss, g = vsd_generator_loss(x0, eps_real, eps_fake, lv.b)
        self._x0 = x0.detach()
        return loss, {"student/g_norm": g.flatten(1).norm(dim=1).mean()}

    def loss_critic(self, batch, ctx):
        c, pos = batch
        h = self.hparams
        x0 = self._x0  # 3. the same student samples, stop-gradient
        s = self._time(self.rand_per_sample(pos, TIME_C), 1e-3, 1 - 1e-3)  # t' ~ U{0..T-1} (VP)
        eps = self.randn_per_sample(pos, self.sample_shape, NOISE_C)
        x_s = self.fake.convention.add_noise(x0, eps, s)
        drop = self.rand_per_sample(pos, DROP) < h.label_dropout  # keeps eps_psi(., null) meaningful
        c = self.teacher.drop_cond(c, drop)
        pred = self.fake(x_s, s, c)
        return fake_score_loss(pred, x0, eps, x_s, self.fake.level(s), self.fake.prediction, h.fake_loss_weight), {}

    def generator_denoiser(self) -> OneStepGenerator:
        ema = self.ema.ema_model
        return OneStepGenerator(lambda z, c: self.generate(z, c, ema), self.teacher.convention, ema)
