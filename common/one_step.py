"""What one-step students distilled from a teacher share (SwiftBrush, Uni-Instruct, and the DMD-style
methods to come): the roles made from the teacher (frozen teacher, student copy, critic as a full copy
or LoRA adapters on the teacher, per ``roles.critic.init``), the sample shape, and the EMA generator
seen as a denoiser by the shared student sampler."""
from __future__ import annotations

import copy
from types import SimpleNamespace

from torch import nn

from common.critics.lora import add_lora, lora_parameters
from common.module import DistillationModule
from common.sampling import OneStepGenerator
from common.teachers.embedded import load_teacher


def sample_shape(net: nn.Module) -> tuple | None:
    """``(C, H, W)`` of an image backbone, ``(D,)`` of a point backbone, None when the network does not
    say (a video transformer: the method's config gives the latent shape)."""
    if getattr(net, "image_size", None) is not None:
        return (net.in_channels, net.image_size, net.image_size)
    return (net.in_dim,) if hasattr(net, "in_dim") else None


class OneStepDistillation(DistillationModule):
    """A :class:`DistillationModule` whose student maps noise to a sample in one step.

    A project sets ``self.noise_convention`` (the convention whose pure noise the generator reads) and
    writes ``generate(z, c, net=None)``, its one-step map (``net=None``: the live student; the EMA copy
    for sampling). Denoiser wrappers go in ``self.den`` (a plain namespace, not submodules, so each
    tensor is listed once in the state dict, under ``nets.<role>``).
    """

    critic_inits = ("copy", "lora")  # the critic initialisations this method supports

    def __init__(self, **base):
        super().__init__(**base)
        self.den = SimpleNamespace()
        self.noise_convention = None

    def add_teacher_roles(self, teacher: str, critic: bool = True, student_net=None):
        """The frozen teacher, the critic (if any) and the student copy of it, in that order. Returns the
        teacher's Denoiser; the student and critic nets are ``self.roles[...].net``. ``student_net``
        maps the copy to the student's network (a wrapper with extra modules), when given."""
        den = load_teacher(teacher)
        net = den.net
        self.sample_shape = sample_shape(net)
        self.add_role("teacher", net, teacher, trainable=False, source=den.source)
        student = copy.deepcopy(net).requires_grad_(True).train()  # before adapters join the teacher's net
        if student_net is not None:
            student = student_net(student).requires_grad_(True).train()
        if critic:
            self.add_critic(net)
        self.add_role("student", student, "teacher")
        return den

    def add_critic(self, teacher_net: nn.Module):
        """``roles.critic.init``: ``copy`` (a full trainable copy) or ``lora`` (adapters on the teacher's
        own frozen weights; the optimizer holds the adapters only)."""
        from common.config import ConfigError

        cfg = self.role_config("critic")
        if cfg.init not in self.critic_inits:
            raise ConfigError(f"roles.critic.init={cfg.init!r} is not supported by {type(self).__name__} "
                              f"(supported: {', '.join(self.critic_inits)})")
        if cfg.init == "lora":
            lc = cfg.lora_config()
            net = add_lora(teacher_net, rank=lc.rank, alpha=lc.alpha, targets=lc.targets)
            return self.add_role("critic", net, "lora", params=lora_parameters)
        return self.add_role("critic", copy.deepcopy(teacher_net).requires_grad_(True).train(), "copy")

    def generate(self, z, c, net=None):
        raise NotImplementedError

    def generator_denoiser(self) -> OneStepGenerator:
        """The EMA generator, sampled with one step from the pure noise of ``noise_convention``."""
        ema = self.ema.ema_model
        return OneStepGenerator(lambda z, c: self.generate(z, c, ema), self.noise_convention, ema)
