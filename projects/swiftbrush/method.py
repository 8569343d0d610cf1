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

from common.critics.lora import adapters_disabled, add_lora, lora_parameters
from common.module import DistillationModule, Role
from common.teachers.denoiser import Denoiser, Guided
from common.teachers.embedded import flow_denoiser, load_teacher
from projects.swiftbrush.losses import fake_score_loss, vsd_generator_loss

NOISE, TIME, DROP, TIME_C, NOISE_C = 1, 2, 3, 4, 5  # random-stream purposes


class SwiftBrush(DistillationModule):
    def __init__(self, teacher: str = "mnist", guidance: float = 2.0, guidance_mode: str = "standard",
                 fake_cfg: str = "none", fake_loss_weight: str = "uniform", critic: str = "lora",
                 lora_rank: int = 16, lora_alpha: float = 16.0, s_min: float = 0.02, s_max: float = 0.98,
                 label_dropout: float = 0.1, student_lr: float = 1e-5, critic_lr: float = 1e-3,
                 betas: list = (0.9, 0.999), grad_clip: float = 1.0, **base):
        super().__init__(**base)
        if fake_cfg not in ("none", "same_as_teacher"):
            raise ValueError(f"fake_cfg must be 'none' or 'same_as_teacher', got {fake_cfg!r}")
        if critic not in ("lora", "full"):
            raise ValueError(f"critic must be 'lora' or 'full', got {critic!r}")
        self.save_hyperparameters()
        h = self.hparams
        teacher = load_teacher(teacher)
        self.num_classes = teacher.null_label
        self.sample_shape = (teacher.net.in_channels, teacher.net.image_size, teacher.net.image_size)
        student = copy.deepcopy(teacher.net).requires_grad_(True).train()
        self.add_role(Role("teacher", teacher.net, False, f"embedded:{h.teacher}", source=teacher.source))
        if critic == "lora":  # the fake score shares the teacher's frozen weights, trains adapters only
            net = add_lora(teacher.net, rank=lora_rank, alpha=lora_alpha)
            self.add_role(Role("critic", net, True, "lora-on-teacher", lr=critic_lr, betas=tuple(betas),
                               grad_clip=grad_clip, params=lora_parameters))
        else:
            self.add_role(Role("critic", copy.deepcopy(teacher.net).requires_grad_(True), True, "teacher-copy",
                               lr=critic_lr, betas=tuple(betas), grad_clip=grad_clip))
        self.add_role(Role("student", student, True, "teacher", lr=student_lr, betas=tuple(betas),
                           grad_clip=grad_clip))
        self.teacher = flow_denoiser(self.roles["teacher"].net)
        self.fake = flow_denoiser(self.roles["critic"].net)
        self.student = flow_denoiser(student)
        self._x0 = None

    def _teacher_call(self, x, s, c):
        den = Guided(self.teacher, self.hparams.guidance, self.hparams.guidance_mode)
        if self.hparams.critic == "lora":
            with adapters_disabled(self.roles["teacher"].net):
                return den.x0_eps(x, s, c)
        return den.x0_eps(x, s, c)

    def generate(self, z, c, net=None):
        """One step from pure noise: ``x0 = z - u(z, 1, c)``."""
        den = self.student if net is None else flow_denoiser(net)
        return den.predict(z, torch.ones(len(z), device=z.device), c, "x0")

    # ---------------------------------------------------------------- steps (algorithm box, section 4)
    def loss_student(self, batch, ctx):
        c, pos = batch
        h = self.hparams
        z = self.randn_per_sample(pos, self.sample_shape, NOISE)
        x0 = self.generate(z, c)  # 1. student sample, with grad
        s = h.s_min + (h.s_max - h.s_min) * self.rand_per_sample(pos, TIME)  # 2. t ~ U[t_min, t_max]
        eps = self.randn_per_sample(pos, self.sample_shape, NOISE + 10)
        x_s = self.student.convention.add_noise(x0.detach(), eps, s)
        with torch.no_grad():
            eps_real = self._teacher_call(x_s, s, c).eps
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
        s = self.rand_per_sample(pos, TIME_C).clamp(1e-3, 1 - 1e-3)
        eps = self.randn_per_sample(pos, self.sample_shape, NOISE_C)
        x_s = self.fake.convention.add_noise(x0, eps, s)
        drop = self.rand_per_sample(pos, DROP) < h.label_dropout  # keeps eps_psi(., null) meaningful
        c = torch.where(drop, torch.full_like(c, self.num_classes), c)
        pred = self.fake(x_s, s, c)
        return fake_score_loss(pred, x0, eps, x_s, self.fake.level(s), self.fake.prediction, h.fake_loss_weight), {}

    def generator_denoiser(self) -> Denoiser:
        return flow_denoiser(self.ema.ema_model)
