
import pytest
import torch

from common import noise



@pytest.fixture(autouse=True, scope="module")
def _float64():
    """The conversions are checked in float64; restore the default for the other test modules."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


CONVENTIONS = [
    (noise.RectifiedFlow(), torch.tensor([0.05, 0.3, 0.5, 0.9])),
    (noise.ReversedFlow(), torch.tensor([0.95, 0.7, 0.5, 0.1])),
    (noise.EDM(), torch.tensor([0.01, 0.5, 2.0, 40.0])),
    (noise.ContinuousVP(), torch.tensor([0.05, 0.3, 0.5, 0.9])),
    (noise.DiscreteVP(), torch.tensor([10.0, 250.0, 500.5, 900.0])),
    (noise.TrigFlow(0.5), torch.tensor([0.1, 0.5, 1.0, 1.4])),
    (noise.TrigFlow(1.0), torch.tensor([0.1, 0.5, 1.0, 1.4])),
]
CONVENTIONS = [(c, t.double()) for c, t in CONVENTIONS]
def kinds(conv):
    """v needs a^2 + b^2 = 1; TrigFlow's F needs (cos t, sigma_d sin t)."""
    if conv.name in ("vp", "ddpm") or (conv.name == "trigflow" and conv.data_scale == 1.0):
        return noise.PREDICTION_KINDS
    if conv.name == "trigflow":
        return tuple(k for k in noise.PREDICTION_KINDS if k != "v")
    return tuple(k for k in noise.PREDICTION_KINDS if k not in ("v", "trigflow"))


@pytest.mark.parametrize("conv,t", CONVENTIONS, ids=lambda c: getattr(c, "name", ""))
def test_parameterisation_round_trips(conv, t):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 3, 5, generator=g), torch.randn(4, 3, 5, generator=g)
    x = conv.add_noise(x0, eps, t)
    lv = conv.level(t)
    for kind in kinds(conv):
        target = noise.from_x0_eps(kind, x0, eps, lv)
        x0_hat, eps_hat = noise.to_x0_eps(kind, target, x, lv)
        torch.testing.assert_close(x0_hat, x0, rtol=1e-9, atol=1e-9, msg=f"{kind}: x0 -> {kind} -> x0")
        torch.testing.assert_close(eps_hat, eps, rtol=1e-9, atol=1e-8, msg=f"{kind}: eps")
        for other in kinds(conv):
            back = noise.convert_prediction(noise.convert_prediction(target, kind, other, x, lv), other, kind, x, lv)
            torch.testing.assert_close(back, target, rtol=1e-8, atol=1e-8)


def test_table_formulas():
    """The closed forms of papers/README.md section 2, one by one."""
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(3, 8, generator=g), torch.randn(3, 8, generator=g)
    s = torch.tensor([0.2, 0.5, 0.8])
    x = noise.RectifiedFlow().add_noise(x0, eps, s)
    u = eps - x0
    torch.testing.assert_close(x - s[:, None] * u, x0)  # flow: x0 = x - s u
    torch.testing.assert_close(x + (1 - s[:, None]) * u, eps)  # eps = x + (1 - s) u
    t = 1 - s  # reversed RF: v = x1 - z = -u, x0 = x + (1 - t) v
    torch.testing.assert_close(x + (1 - t[:, None]) * (-u), x0)
    sd, tt = 0.5, torch.tensor([0.3, 0.7, 1.2])
    z = sd * eps
    xt = torch.cos(tt)[:, None] * x0 + torch.sin(tt)[:, None] * z
    F = (torch.cos(tt)[:, None] * z - torch.sin(tt)[:, None] * x0) / sd
    torch.testing.assert_close(noise.from_x0_eps("trigflow", x0, eps, noise.TrigFlow(sd).level(tt)), F)
    torch.testing.assert_close(torch.cos(tt)[:, None] * xt - torch.sin(tt)[:, None] * sd * F, x0)


def test_flow_velocity_to_trigflow_reproduces_flow_x0():
    """F = (1 - 2s) x_flow / n + n u, and cos t x_t - sin t sigma_d F = sigma_d * (flow's x0_hat)."""
    g = torch.Generator().manual_seed(2)
    sd = 0.5
    y0, eps = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    u_model = torch.randn(4, 6, generator=g)  # an arbitrary (imperfect) flow prediction
    t = torch.tensor([0.2, 0.6, 1.0, 1.4])
    x_t = noise.TrigFlow(sd).add_noise(sd * y0, eps, t)
    x_flow, s = noise.flow_to_trigflow_input(x_t, t, sd)
    torch.testing.assert_close(x_flow, noise.RectifiedFlow().add_noise(y0, eps, s))  # same sample, flow units
    F = noise.flow_velocity_to_trigflow(u_model, x_flow, s)
    ct, st = torch.cos(t)[:, None], torch.sin(t)[:, None]
    torch.testing.assert_close(ct * x_t - st * sd * F, sd * (x_flow - s[:, None] * u_model))
    # and it is what the generic conversion gives when the flow's (x0, eps) are rescaled to TrigFlow units
    y_hat, e_hat = noise.to_x0_eps("flow", u_model, x_flow, noise.RectifiedFlow().level(s))
    torch.testing.assert_close(noise.from_x0_eps("trigflow", sd * y_hat, e_hat, noise.TrigFlow(sd).level(t)), F)


@pytest.mark.parametrize("src,t", CONVENTIONS, ids=lambda c: getattr(c, "name", ""))
@pytest.mark.parametrize("dst", [c for c, _ in CONVENTIONS], ids=lambda c: f"{c.name}{c.data_scale}")
def test_snr_matching_across_conventions(src, t, dst):
    if isinstance(dst, noise.DiscreteVP):  # a finite table: only SNRs inside its range can match
        lam = src.level(t).logsnr
        t = t[(lam <= dst._logsnr[0]) & (lam >= dst._logsnr[-1])]
        assert len(t) >= 2
    t_dst = noise.match_time(t, src, dst)
    torch.testing.assert_close(dst.level(t_dst).logsnr, src.level(t).logsnr, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(noise.match_time(t_dst, dst, src), t, rtol=1e-6, atol=1e-6)
    # the same sample re-expressed: x_dst = a_dst x0_dst + b_dst eps with x0 in dst's data units
    g = torch.Generator().manual_seed(3)
    y, eps = torch.randn(len(t), 5, generator=g), torch.randn(len(t), 5, generator=g)
    x_src = src.add_noise(src.data_scale * y, eps, t)
    x_dst, t2 = noise.convert_sample(x_src, t, src, dst)
    torch.testing.assert_close(x_dst, dst.add_noise(dst.data_scale * y, eps, t2), rtol=1e-6, atol=1e-6)


def test_named_relations():
    # VE <-> VP: alpha = 1 / sqrt(1 + sigma^2), x_VP = alpha x_VE
    sig = torch.tensor([0.5, 2.0, 10.0])
    t_vp = noise.match_time(sig, noise.EDM(), noise.ContinuousVP())
    a, b = noise.ContinuousVP().coeffs(t_vp)
    torch.testing.assert_close(a, 1 / torch.sqrt(1 + sig**2))
    torch.testing.assert_close(b / a, sig)
    # flow <-> VE: sigma = s / (1 - s)
    s = torch.tensor([0.1, 0.5, 0.9])
    torch.testing.assert_close(noise.match_time(s, noise.RectifiedFlow(), noise.EDM()), s / (1 - s))
    # TrigFlow <-> flow: s = sin t / (sin t + cos t); tan t = sigma_VE / sigma_d with data at scale sigma_d
    t = torch.tensor([0.2, 0.7, 1.3])
    for sd in (0.5, 1.0):
        torch.testing.assert_close(noise.match_time(t, noise.TrigFlow(sd), noise.RectifiedFlow()),
                                   torch.sin(t) / (torch.sin(t) + torch.cos(t)))
        torch.testing.assert_close(noise.match_time(t, noise.TrigFlow(sd), noise.EDM(data_scale=sd)), sd * torch.tan(t))
    # VP <-> TrigFlow (sigma_d = 1): t = atan(sigma_t / alpha_t)
    tv = torch.tensor([0.1, 0.5, 0.9])
    a, b = noise.ContinuousVP().coeffs(tv)
    torch.testing.assert_close(noise.match_time(tv, noise.ContinuousVP(), noise.TrigFlow(1.0)), torch.atan(b / a))
    # reversed RF
    torch.testing.assert_close(noise.match_time(s, noise.RectifiedFlow(), noise.ReversedFlow()), 1 - s)


def test_score_relation():
    g = torch.Generator().manual_seed(4)
    x0, eps = torch.randn(2, 3, generator=g), torch.randn(2, 3, generator=g)
    lv = noise.ContinuousVP().level(torch.tensor([0.3, 0.6]))
    x = noise.ContinuousVP().add_noise(x0, eps, torch.tensor([0.3, 0.6]))
    torch.testing.assert_close(noise.score(x0, x, lv), -eps / lv.b[:, None])


def test_discrete_vp_matches_ddpm_table():
    c = noise.DiscreteVP()
    t = torch.tensor([0.0, 17.0, 999.0])
    a, b = c.coeffs(t)
    torch.testing.assert_close(a**2, c.alphas_cumprod[[0, 17, 999]])
    torch.testing.assert_close(a**2 + b**2, torch.ones(3))


def test_trig_kinds_refuse_non_vp_levels():
    with pytest.raises(ValueError, match="prediction kind 'trigflow' needs a variance-preserving level"):
        noise.to_x0_eps("trigflow", torch.zeros(2), torch.zeros(2), noise.RectifiedFlow().level(torch.tensor(0.5)))


def test_discrete_vp_clamps_outside_its_table():
    c = noise.DiscreteVP()
    t = noise.match_time(torch.tensor([1e-4, 0.9999]), noise.RectifiedFlow(), c)
    torch.testing.assert_close(t, torch.tensor([0.0, 999.0]))


def test_bad_kind_is_an_error():
    with pytest.raises(ValueError, match="unknown prediction kind 'velocity'"):
        noise.to_x0_eps("velocity", torch.zeros(1), torch.zeros(1), noise.RectifiedFlow().level(0.5))
