"""The TrigFlow view of the flow teacher and the sCM core (common/scm.py) that SANA-Sprint and rCM share:
conversion exactness, the tangent by JVP (through the F3 attention) against finite differences, the
warm-up forms, normalisation and the loss."""
import math

import pytest
import torch

from common import noise, scm
from common.sampling import generate
from common.teachers.adapters import ConventionAdapter
from common.teachers.denoiser import Denoiser
from common.teachers.embedded import build_net
from conftest import TINY_DIT

SD = 0.5  # SANA-Sprint's sigma_d; rCM's is 1


def _flow_teacher(dtype=torch.float64):
    torch.manual_seed(0)
    net = build_net(TINY_DIT).to(dtype)
    with torch.no_grad():  # off the zero inits (gates, output layer), so the network is not trivial
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return Denoiser(net.eval(), noise.RectifiedFlow(), "flow", time_scale=1000, null_label=10)


def _inputs(n=3, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    x0 = SD * torch.randn(n, 1, 32, 32, generator=g, dtype=dtype)
    z = SD * torch.randn(n, 1, 32, 32, generator=g, dtype=dtype)
    t = torch.tensor([0.3, 0.9, 1.4][:n], dtype=dtype)
    c, s = torch.cos(t).view(-1, 1, 1, 1), torch.sin(t).view(-1, 1, 1, 1)
    return c * x0 + s * z, t, torch.tensor([1, 5, 7][:n])


def test_the_trigflow_view_of_the_flow_teacher_is_exact():
    """The wrapped teacher's x0 is the flow teacher's (in TrigFlow data units, x0 = sigma_d y) on the
    same point of the path; its F obeys sana_sprint.md's identity cos t x_t - sin t sigma_d F =
    sigma_d (x_flow - s u); and its multi-step samples are the flow teacher's with the same seeds."""
    flow = _flow_teacher()
    trig = ConventionAdapter(flow, noise.TrigFlow(SD))
    x_t, t, y = _inputs()
    s = torch.sin(t) / (torch.sin(t) + torch.cos(t))
    x_flow = (x_t / SD) / (torch.cos(t) + torch.sin(t)).view(-1, 1, 1, 1)
    with torch.no_grad():
        u = flow.net(x_flow, 1000 * s, y)
        y0_flow = flow.x0_eps(x_flow, s, y).x0
        x0, F = trig(x_t, t, y), trig.predict(x_t, t, y, kind="trigflow")
    torch.testing.assert_close(x0, SD * y0_flow, rtol=1e-12, atol=1e-12)
    c, sn = torch.cos(t).view(-1, 1, 1, 1), torch.sin(t).view(-1, 1, 1, 1)
    torch.testing.assert_close(c * x_t - sn * SD * F, SD * (x_flow - s.view(-1, 1, 1, 1) * u), rtol=1e-12, atol=1e-12)
    flow = _flow_teacher(torch.float32)  # generate() samples in float32
    trig = ConventionAdapter(flow, noise.TrigFlow(SD))
    for steps in (4, 12):  # the same SNR-matched grid, so DDIM in one convention is Euler in the other
        a = generate(flow, (6, 1, 32, 32), steps, cond=torch.arange(6), sampler="euler", seed=3)
        b = generate(trig, (6, 1, 32, 32), steps, cond=torch.arange(6), sampler="euler", seed=3)
        assert (a[1:] - a[:1]).abs().max() > 0.1  # distinct samples, not a constant
        torch.testing.assert_close(b, SD * a, rtol=1e-4, atol=1e-4)


def _student(dtype=torch.float64):
    trig = ConventionAdapter(_flow_teacher(dtype), noise.TrigFlow(SD))
    return trig, (lambda y: (lambda x, t: trig.predict(x, t, y, kind="trigflow")))


def test_the_tangent_by_jvp_matches_central_differences_through_the_embedded_dit():
    """J = cos t sin t dF/dt along the teacher's ODE, by forward mode through the embedded DiT (its
    attention made tangent-aware), equals a central difference of the same function (float64)."""
    trig, make = _student()
    x_t, t, y = _inputs()
    f = make(y)
    with torch.no_grad():
        dxdt = SD * trig.predict(x_t, t, y, kind="trigflow")  # dx/dt = sigma_d F of the teacher itself
        F, J = scm.tangent(f, x_t, t, dxdt, "jvp")
        e = 1e-6  # the central difference's error is O(e^2) times dF/dt's curvature, large near t = pi/2
        c, s = torch.cos(t).view(-1, 1, 1, 1), torch.sin(t).view(-1, 1, 1, 1)
        central = c * s * (f(x_t + e * dxdt, t + e) - f(x_t - e * dxdt, t - e)) / (2 * e)
    torch.testing.assert_close(F, f(x_t, t), rtol=1e-12, atol=1e-12)
    assert J.abs().max() > 1e-2  # not trivially zero
    torch.testing.assert_close(J, central, rtol=1e-6, atol=1e-6 * J.abs().max().item())


def test_the_finite_difference_tangents_agree_with_the_jvp_to_first_order_in_h():
    trig, make = _student()
    x_t, t, y = _inputs()
    f = make(y)
    with torch.no_grad():
        dxdt = SD * trig.predict(x_t, t, y, kind="trigflow")
    _, J = scm.tangent(f, x_t, t, dxdt, "jvp")
    for mode in ("fd_t", "fd"):
        # a random network's F moves fast in t (its time embedding reads 1000 s): O(h) from h ~ 1e-4 on
        err = {h: (scm.tangent(f, x_t, t, dxdt, mode, h=h)[1] - J).abs().max().item() for h in (1e-4, 1e-5)}
        assert err[1e-5] < 1e-2 * J.abs().max().item(), (mode, err)
        assert 5 < err[1e-4] / err[1e-5] < 20, (mode, err)  # O(h): ten times smaller h, ten times less error


def test_the_jvp_goes_through_the_f3_attention(attention_jvp_calls):
    """The route taken: every attention of the DiT passes its tangent through common/kernels'
    _TangentAttention (not plain math attention, whose JVP through sdpa fails on the CPU)."""
    trig, make = _student(torch.float32)
    x_t, t, y = _inputs(dtype=torch.float32)
    with torch.no_grad():
        dxdt = SD * trig.predict(x_t, t, y, kind="trigflow")
    scm.tangent(make(y), x_t, t, dxdt, "jvp")
    assert len(attention_jvp_calls) == TINY_DIT["depth"]


def test_the_warm_up_forms_coincide_at_r_1_and_differ_before():
    g = torch.Generator().manual_seed(0)
    F, dxdt, x_t, J = (torch.randn(4, 1, 4, 4, generator=g, dtype=torch.float64) for _ in range(4))
    t = torch.tensor([0.2, 0.7, 1.1, 1.5], dtype=torch.float64)
    at = {(form, r): scm.target(F, dxdt, x_t, t, J, SD, r, form) for form in scm.WARMUP_FORMS for r in (0.3, 1.0)}
    for form in ("code", "code_v0"):
        torch.testing.assert_close(at[form, 1.0], at["paper", 1.0], rtol=1e-12, atol=1e-12)
        assert (at[form, 0.3] - at["paper", 0.3]).abs().max() > 1e-2
    c, s = torch.cos(t).view(-1, 1, 1, 1), torch.sin(t).view(-1, 1, 1, 1)
    torch.testing.assert_close(at["paper", 0.3], -c**2 * (SD * F - dxdt) - 0.3 * (c * s * x_t + SD * J))
    # code: r on the x_t term only, the J term whole
    torch.testing.assert_close(at["code", 0.3], -c * torch.sqrt(1 - 0.09 * s**2) * (SD * F - dxdt) - (0.3 * c * s * x_t + SD * J))
    assert (scm.warmup_ratio(0, 100), scm.warmup_ratio(50, 100), scm.warmup_ratio(500, 100), scm.warmup_ratio(3, 0)) == \
        (0.0, 0.5, 1.0, 1.0)
    with pytest.raises(ValueError, match="unknown tangent warm-up form 'sana'"):
        scm.target(F, dxdt, x_t, t, J, SD, 1.0, "sana")


def test_normalisation_loss_gradient_and_nonfinite_rows():
    g = torch.randn(3, 2, 4, 4, dtype=torch.float32) * torch.tensor([1e-3, 1.0, 1e3]).view(-1, 1, 1, 1)
    n = scm.normalise(g, 0.1)
    norms = g.double().flatten(1).norm(dim=1)
    torch.testing.assert_close(n.double().flatten(1).norm(dim=1), norms / (norms + 0.1), rtol=1e-6, atol=0)
    F = torch.randn(3, 2, 4, 4, requires_grad=True)
    scm.loss(F, n, "sum").sum().backward()
    torch.testing.assert_close(F.grad, -2 * n)  # descent moves F along g
    F.grad = None
    logvar = torch.tensor([0.0, 1.0, -1.0], requires_grad=True)
    w = torch.tensor([1.0, 2.0, 3.0])
    out = scm.loss(F, n, "mean", weight=w, logvar=logvar)
    torch.testing.assert_close(out, torch.exp(-logvar) * w * n.pow(2).flatten(1).mean(1) + logvar)
    out.sum().backward()
    torch.testing.assert_close(F.grad, -2 * n * (w * torch.exp(-logvar)).view(-1, 1, 1, 1).detach() / 32)
    assert logvar.grad is not None and logvar.grad.abs().sum() > 0
    bad = g.clone()
    bad[1, 0, 0, 0] = float("nan")
    assert scm.nonfinite_rows(bad, F).tolist() == [False, True, False]
    t = scm.time_from_sigma(torch.tensor([SD]), SD)
    assert math.isclose(float(t), math.pi / 4, rel_tol=1e-6)
    torch.testing.assert_close(scm.sana_weight(t, SD), torch.tensor([1 / SD]))


def test_the_target_at_r_1_is_cos_t_times_the_drift_of_the_students_x0_along_the_ode():
    """sCM's meaning: with ``x0_hat = cos t x_t - sigma_d sin t F``, the full target (r = 1) is
    ``g = cos t d x0_hat / dt`` along the teacher's ODE, so it vanishes exactly for a consistency
    function; checked against a central difference of the student's x0 through the embedded DiT."""
    trig, make = _student()
    x_t, t, y = _inputs()
    f = make(y)
    teacher = ConventionAdapter(_flow_teacher(), noise.TrigFlow(SD))
    with torch.no_grad():  # a teacher other than the student: dx/dt of its ODE
        for p in teacher.net.parameters():
            p.mul_(0.9)
        dxdt = SD * teacher.predict(x_t, t, y, kind="trigflow")
        F, J = scm.tangent(f, x_t, t, dxdt, "jvp")
        g = scm.target(F, dxdt, x_t, t, J, SD, 1.0, "paper")
        e = 1e-6
        x0 = lambda x, tt: trig(x, tt, y)  # noqa: E731
        drift = (x0(x_t + e * dxdt, t + e) - x0(x_t - e * dxdt, t - e)) / (2 * e)
    torch.testing.assert_close(g, torch.cos(t).view(-1, 1, 1, 1) * drift, rtol=1e-6, atol=1e-6 * g.abs().max().item())


def test_scm_learns_a_one_step_map_of_a_2d_mixture_from_its_exact_ode():
    """End to end: ``student_loss`` with the exact TrigFlow velocity of a 2-D mixture of four tight
    Gaussians (no network teacher) trains a small MLP, from scratch, into a one-step map whose samples
    land on the modes in equal shares; its first one-step map sits far from all of them. The MLP
    reads ``t`` through low-frequency features (sCM's identity time transform; with a ``1000 s``
    sinusoidal embedding instead, this loss drove such an MLP onto one mode: projects/sana_sprint/README.md)."""
    torch.manual_seed(0)
    mu, s0 = torch.tensor([[0.5, 0.5], [-0.5, 0.5], [0.5, -0.5], [-0.5, -0.5]]), 0.05

    def dxdt(x, t):  # sigma_d F*: (cos t x - E[x0 | x_t]) / sin t, the mixture's posterior mean in closed form
        c, s = torch.cos(t)[:, None], torch.sin(t)[:, None]
        var = c * c * s0 ** 2 + s * s * SD ** 2
        w = torch.softmax(-((x[:, None] - c[:, None] * mu) ** 2).sum(-1) / (2 * var), 1)
        post = mu + (c * s0 ** 2 / var)[:, None] * (x[:, None] - c[:, None] * mu)
        return (c * x - (w[..., None] * post).sum(1)) / s

    net = torch.nn.Sequential(torch.nn.Linear(18, 256), torch.nn.SiLU(), torch.nn.Linear(256, 256), torch.nn.SiLU(),
                              torch.nn.Linear(256, 256), torch.nn.SiLU(), torch.nn.Linear(256, 2))
    freqs = torch.exp(torch.linspace(0, math.log(10), 8))
    f = lambda x, t: net(torch.cat([x / SD, torch.sin(t[:, None] * freqs), torch.cos(t[:, None] * freqs)], 1))  # noqa: E731

    def one_step(n=2000):
        z, T = SD * torch.randn(n, 2), math.atan(80 / SD)
        with torch.no_grad():
            x = math.cos(T) * z - SD * math.sin(T) * f(z, torch.full((n,), T))
        d = (x[:, None] - mu).pow(2).sum(-1).sqrt()
        return (d.min(1).values < 0.15).float().mean().item(), torch.bincount(d.argmin(1), minlength=4) / n

    hit0, _ = one_step()
    opt = torch.optim.Adam(net.parameters(), 1e-3, betas=(0.9, 0.99))
    for it in range(1200):
        x0 = mu[torch.randint(0, 4, (256,))] + s0 * torch.randn(256, 2)
        t = scm.time_from_sigma(torch.exp(-1.0 + 1.4 * torch.randn(256)), SD).clamp(1e-3, math.pi / 2 - 1e-3)
        x_t = torch.cos(t)[:, None] * x0 + torch.sin(t)[:, None] * SD * torch.randn(256, 2)
        per, _ = scm.student_loss(f, x_t, t, dxdt(x_t, t), SD, scm.warmup_ratio(it, 300), reduction="mean")
        opt.zero_grad()
        per.mean().backward()
        opt.step()
    hit, share = one_step()
    assert hit0 < 0.05 and hit > 0.3, (hit0, hit)
    assert share.min() > 0.15, share  # every mode, none dropped
