"""DMD2: a K-step student by distribution matching against a fake-score critic, plus a GAN whose
discriminator heads read the critic's features, with backward simulation (papers/flash_dmd.md, which
builds on DMD2; papers/README.md sections 3, 4 and 8). The baseline Flash-DMD is measured against.

The machinery (times, backward simulation, the DMD and GAN terms, the critic and discriminator
turns) is :class:`common.dmd.MultiStepDMD`, shared with Flash-DMD; DMD2 sums its two generator terms
at every student step: ``L_G = dmd_weight L_DM + gan_weight L_GAN``.

The schedule sets the update ratio: DMD2's ``gen_every = 5`` is a critic turn (critic, then
discriminator) every iteration and a student turn every fifth (``cycle: [[critic, discriminator], x4,
[student, critic, discriminator]]``). DMD2 also backpropagates the heads' loss into the critic's
encoder, scaled 1e-2 against the DSM loss: here the heads have their own optimizer and the critic's
features stay the fake score's (a stated deviation).
"""
from __future__ import annotations

from common.dmd import MultiStepDMD
from common.roles import RoleStep


class DMD2(MultiStepDMD):
    def loss_student(self, batch, ctx):
        h = self.hparams
        _, y, pos = batch
        x0, k = self.student_sample(y, ctx, pos, grad=True)
        loss, logs = x0.new_zeros(()), {"student/k_mean": k.float().mean()}
        if h.dmd_weight > 0:
            l_dm, g_norm = self.dmd_term(x0, y, ctx, pos)
            loss = loss + h.dmd_weight * l_dm.mean()
            logs.update({"student/dmd": l_dm.mean().detach(), "student/dmd_g_norm": g_norm.mean()})
        if h.gan and h.gan_weight > 0:
            l_gan = self.gan_term(x0, y, ctx, pos).mean()
            loss = loss + h.gan_weight * l_gan
            logs["student/gan"] = l_gan.detach()
        if self.wants_grad_cosines(ctx):
            logs.update(self.grad_cosines(y, ctx, pos))
        return RoleStep(loss, logs, outputs={"x0": x0.detach(), "k": k})
