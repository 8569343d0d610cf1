import math

import pytest
import torch
from torch import nn

from common import noise
from common.nets.dit import DiT
from common.sampling import SAMPLERS, generate, timesteps
from common.teachers.denoiser import Denoiser, Guided, cfg_combine


def tiny_dit():
    torch.manual_seed(0)
    net = DiT(image_size=8, patch_size=4, dim=32, depth=2, heads=2, num_classes=3)
    for p in net.parameters():  # leave the zero-init so outputs are not trivially zero
        if p.dim() >= 2 and torch.all(p == 0):
            nn.init.normal_(p, std=0.05)
    return net


def test_cfg_conventions_named_and_related():
    c, u = torch.randn(4, 3), torch.randn(4, 3)
    torch.testing.assert_close(cfg_combine(c, u, 1.0, "standard"), c)
    torch.testing.assert_close(cfg_combine(c, u, 0.0, "offset"), c)
    torch.testing.assert_close(cfg_combine(c, u, 0.0, "standard"), u)
    # offset weight w is standard scale 1 + w
    torch.testing.assert_close(cfg_combine(c, u, 2.5, "offset"), cfg_combine(c, u, 3.5, "standard"))
    torch.testing.assert_close(cfg_combine(c, u, 4.5, "standard"), u + 4.5 * (c - u))
    with pytest.raises(ValueError, match="unknown CFG mode 'plus'"):
        cfg_combine(c, u, 1.0, "plus")


def test_guidance_is_the_same_in_every_parameterisation():
    den = Denoiser(tiny_dit(), noise.RectifiedFlow(), "flow", time_scale=1000, null_label=3)
    x, t, y = torch.randn(5, 1, 8, 8), torch.full((5,), 0.4), torch.tensor([0, 1, 2, 0, 1])
    g = Guided(den, 3.0, "standard")
    for kind in ("x0", "eps", "flow"):
        guided = g.predict(x, t, y, kind)
        c = den.predict(x, t, y, kind)
        u = den.predict(x, t, torch.full_like(y, 3), kind)
        torch.testing.assert_close(guided, u + 3.0 * (c - u), rtol=1e-5, atol=1e-5)


def test_guided_with_null_condition_required():
    den = Denoiser(tiny_dit(), noise.RectifiedFlow(), "flow", time_scale=1000, null_label=None)
    with pytest.raises(ValueError, match="no null condition"):
        Guided(den, 2.0)(torch.randn(2, 1, 8, 8), torch.full((2,), 0.5), torch.tensor([0, 1]))


def test_denoiser_features_and_bad_name():
    den = Denoiser(tiny_dit(), noise.RectifiedFlow(), "flow", time_scale=1000, null_label=3)
    out, feats = den(torch.randn(2, 1, 8, 8), torch.full((2,), 0.5), torch.tensor([0, 1]), return_features=["block1"])
    assert out.shape == (2, 1, 8, 8) and feats["block1"].shape == (2, 4, 32)
    with pytest.raises(KeyError, match="unknown feature names"):
        den(torch.randn(2, 1, 8, 8), torch.full((2,), 0.5), torch.tensor([0, 1]), return_features=["block9"])


class GaussianX0(nn.Module):
    """Exact posterior mean for 1-D data N(m, v): E[x0 | x] = m + a v (x - a m) / (a^2 v + b^2)."""

    def __init__(self, conv, m=0.7, v=0.09):
        super().__init__()
        self.conv, self.m, self.v = conv, m, v

    def forward(self, x, t, cond):
        lv = self.conv.level(t.double()).expand(x.ndim)
        a, b = lv.a.to(x), lv.b.to(x)
        return self.m + a * self.v * (x - a * self.m) / (a * a * self.v + b * b)


@pytest.mark.parametrize("conv", [noise.RectifiedFlow(), noise.EDM(sigma_min=1e-4, sigma_max=1e5), noise.TrigFlow(0.5)],
                         ids=lambda c: c.name)
def test_ode_samplers_follow_the_exact_transport(conv):
    """For Gaussian data N(m, v) the probability-flow ODE is linear: in flow units
    x(s) = (1 - s) m + sqrt((1 - s)^2 v + s^2) z. Euler is first order, Heun second order."""
    m, v, s_end = 0.7, 0.09, 0.05
    den = Denoiser(GaussianX0(conv, m, v), conv, "x0")
    z = torch.randn(256, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    err = {}
    for name in ("euler", "heun"):
        for n in (8, 16):
            ts = timesteps(conv, n, s_min=s_end).double()
            lv0, lv1 = conv.level(ts[0]), conv.level(ts[-1])
            x = (lv0.a + lv0.b) * z  # pure noise at the noise end, in the convention's units
            out = SAMPLERS[name](den, x, ts, None) / (lv1.a + lv1.b)
            se = float(lv1.b / (lv1.a + lv1.b))  # flow time in the convention's own data units
            exact_flow = (1 - se) * m + math.sqrt((1 - se) ** 2 * v + se**2) * z
            err[name, n] = (out - exact_flow).abs().max().item()
    assert 1.6 < err["euler", 8] / err["euler", 16] < 2.5, err
    assert err["heun", 8] / err["heun", 16] > 3.2, err
    assert err["heun", 16] < 1e-2 and err["heun", 16] < err["euler", 16] / 10, err


def test_multistep_one_step_returns_the_prediction():
    conv = noise.RectifiedFlow()
    den = Denoiser(GaussianX0(conv), conv, "x0")
    ts = timesteps(conv, 1)
    x = torch.randn(16, 1, dtype=torch.float64)
    out = SAMPLERS["multistep"](den, x, ts.double(), None)
    torch.testing.assert_close(out, den.predict(x, ts[0].double().expand(16), None, "x0"))


class PerSample(nn.Module):
    """A network applied one sample at a time: its numerics do not depend on the batch it is given
    (a batched matmul may round differently at another batch size), so the test below can ask the
    sampler for exact batch independence on any CPU."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, t, cond):
        return torch.cat([self.net(x[k:k + 1], t[k:k + 1], None if cond is None else cond[k:k + 1])
                          for k in range(len(x))])


@pytest.mark.parametrize("sampler,steps", [("euler", 3), ("multistep", 4), ("multistep", [1.0, 0.7, 0.3])])
def test_generate_is_reproducible_and_batch_independent(sampler, steps):
    """Sample j is the same whatever the batch size and whichever batch it lands in: the initial noise
    and the few-step sampler's re-noising are keyed by the sample's index in the whole set."""
    images = Denoiser(PerSample(tiny_dit()), noise.RectifiedFlow(), "flow", time_scale=1000, null_label=3)
    points = Denoiser(GaussianX0(noise.RectifiedFlow()), noise.RectifiedFlow(), "x0")  # 2-D: 2 values a sample
    y = torch.tensor([0, 1, 2, 0])
    for den, shape, cond, sizes in ((images, (4, 1, 8, 8), y, (2, 3)), (points, (12, 2), None, (6, 4, 2, 5))):
        a = generate(den, shape, steps, cond=cond, sampler=sampler, seed=5, batch_size=shape[0])
        for bs in sizes:  # 3 does not divide 4, nor 5 12
            b = generate(den, shape, steps, cond=cond, sampler=sampler, seed=5, batch_size=bs)
            torch.testing.assert_close(b, a, rtol=0, atol=0, msg=lambda m: f"batch size {bs}: {m}")
        c = generate(den, shape, steps, cond=cond, sampler=sampler, seed=6, batch_size=shape[0])
        assert (a - c).abs().max() > 1e-3
    # the plain batched network: the same noise, so only float rounding of the batched matmul differs
    den = Denoiser(tiny_dit(), noise.RectifiedFlow(), "flow", time_scale=1000, null_label=3)
    a = generate(den, (4, 1, 8, 8), steps, cond=y, sampler=sampler, seed=5, batch_size=4)
    b = generate(den, (4, 1, 8, 8), steps, cond=y, sampler=sampler, seed=5, batch_size=3)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_timesteps_span_the_convention():
    for conv in (noise.RectifiedFlow(), noise.TrigFlow(0.5), noise.DiscreteVP()):
        ts = timesteps(conv, 4)
        assert len(ts) == 5
        assert math.isclose(float(ts[0]), conv.t_noise, rel_tol=1e-6)
        assert math.isclose(float(ts[-1]), conv.t_data, abs_tol=1e-6)
        # evenly spaced in flow time
        s = noise.match_time(ts[1:-1].double(), conv, noise.RectifiedFlow())
        torch.testing.assert_close(s.float(), torch.tensor([0.75, 0.5, 0.25]), rtol=1e-3, atol=1e-3)


def test_convention_adapter_gives_an_edm_denoiser_on_a_flow_teacher():
    """D(x_VE; sigma) of a flow model: sigma = s / (1 - s), x_VE = x_s / (1 - s), same x0."""
    from common.teachers.adapters import ConventionAdapter

    den = Denoiser(tiny_dit().double(), noise.RectifiedFlow(), "flow", time_scale=1000, null_label=3)
    edm = ConventionAdapter(den, noise.EDM())
    x0, eps = torch.randn(2, 1, 8, 8, dtype=torch.float64), torch.randn(2, 1, 8, 8, dtype=torch.float64)
    s = torch.tensor([0.3, 0.714], dtype=torch.float64)
    y = torch.tensor([0, 1])
    x_s = noise.RectifiedFlow().add_noise(x0, eps, s)
    sigma = s / (1 - s)
    x_ve = x_s / (1 - s).view(-1, 1, 1, 1)
    torch.testing.assert_close(edm(x_ve, sigma, y), den.predict(x_s, s, y, "x0"))
    # and the samplers accept it
    ts = torch.tensor([80.0, 1.0, 0.002], dtype=torch.float64)
    out = SAMPLERS["euler"](edm, torch.randn(2, 1, 8, 8, dtype=torch.float64) * 80, ts, y)
    assert torch.isfinite(out).all()
