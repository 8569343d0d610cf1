"""Few-step student sampling through common.sampling.generate: sampling times given as a list, the
keyed re-noising, and the initial noise the recorded protocol figures were measured with."""
import math

import pytest
import torch

from common import noise
from common.rng import SAMPLING_RENOISE, keyed_generator
from common.sampling import OneStepGenerator, generate, student_times, timesteps
from common.teachers.denoiser import Denoiser, Prediction
from test_denoiser_sampling import tiny_dit


class Recorder:
    """A model seen by the samplers that records each call: ``(t, x)``."""

    def __init__(self, den):
        self.den, self.convention, self.calls = den, den.convention, []

    def level(self, t):
        return self.den.level(t)

    def x0_eps(self, x, t, cond):
        self.calls.append((float(t), x.clone()))
        return self.den.x0_eps(x, t, cond)


class NoiseProbe:
    """Predicts x0 = 0, eps = x and records the sampler's first input: the initial noise."""

    def __init__(self, convention):
        self.convention, self.starts = convention, []

    def level(self, t):
        return self.convention.level(t)

    def x0_eps(self, x, t, cond):
        if math.isclose(float(t), self.convention.t_noise, rel_tol=1e-6):
            self.starts.append(x.clone())
        return Prediction(torch.zeros_like(x), x)


def test_multistep_on_a_time_list_is_predict_and_renoise_at_those_times():
    conv = noise.TrigFlow(0.5)
    times = [1.3, 1.0, 0.6]
    den = Denoiser(tiny_dit(), conv, "x0", time_scale=1000 / conv.t_noise, null_label=3)
    ts = student_times(conv, times)
    torch.testing.assert_close(ts, torch.tensor(times + [0.0]), rtol=0, atol=0)
    y = torch.tensor([0, 1, 2, 0])
    rec = Recorder(den)
    got = generate(rec, (4, 1, 8, 8), times, cond=y, sampler="multistep", seed=3, batch_size=3)
    assert [round(t, 6) for t, _ in rec.calls] == [1.3, 1.0, 0.6] * 2  # two batches, evaluated at the listed times

    # by hand: pure noise at 1.3, then x0 = D(x, t); x <- cos t' x0 + sigma_d sin t' eps_j at the next time t'
    t = [torch.tensor(v) for v in times]  # float32, as the sampler's grid
    x = 0.5 * torch.sin(t[0]) * torch.randn((4, 1, 8, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for i in range(len(times)):
            x0 = den.x0_eps(x, t[i], y).x0
            if i + 1 < len(times):
                eps = torch.stack([torch.randn((1, 8, 8), generator=keyed_generator(3, SAMPLING_RENOISE, i, j))
                                   for j in range(4)])
                x = torch.cos(t[i + 1]) * x0 + 0.5 * torch.sin(t[i + 1]) * eps
    torch.testing.assert_close(got, x0, rtol=1e-5, atol=1e-6)
    assert (got - generate(den, (4, 1, 8, 8), times, cond=y, sampler="multistep", seed=4)).abs().max() > 1e-3


def test_time_list_validation():
    trig, edm, rev = noise.TrigFlow(0.5), noise.EDM(), noise.ReversedFlow()
    torch.testing.assert_close(student_times(trig, 4), timesteps(trig, 4), rtol=0, atol=0)  # an int: uniform grid
    torch.testing.assert_close(student_times(trig, (math.pi / 2,)), torch.tensor([math.pi / 2, 0.0]))
    torch.testing.assert_close(student_times(edm, [80.0, 1.0, 0.002]), torch.tensor([80.0, 1.0, 0.002, 0.002]))
    torch.testing.assert_close(student_times(rev, [0.0, 0.5]), torch.tensor([0.0, 0.5, 1.0]))  # noise end is 0
    # an end written to four decimals is the end; a time further out is an error (below)
    assert student_times(trig, [1.5708, 0.5])[0].item() == torch.tensor(math.pi / 2).item()
    with pytest.raises(ValueError, match=r"\[1.571\] are outside"):
        student_times(trig, [1.571, 0.5])
    with pytest.raises(ValueError, match="list of sampling times is empty"):
        student_times(trig, [])
    with pytest.raises(ValueError, match=r"strictly decreasing .* got \[0.6, 1.0\]"):
        student_times(trig, [0.6, 1.0])
    with pytest.raises(ValueError, match="strictly decreasing"):
        student_times(trig, [1.0, 1.0])
    with pytest.raises(ValueError, match="strictly increasing"):
        student_times(rev, [0.5, 0.2])
    with pytest.raises(ValueError, match=r"sampling times \[2.0\] are outside \[0, 1.5708\], the time range of TrigFlow"):
        student_times(trig, [2.0, 1.0])
    with pytest.raises(ValueError, match=r"\[-0.1\] are outside"):
        student_times(trig, [1.0, -0.1])
    with pytest.raises(ValueError, match=r"\[100.0\] are outside \[0.002, 80\]"):
        student_times(edm, [100.0])
    with pytest.raises(ValueError, match="are outside"):
        student_times(trig, [float("nan")])
    with pytest.raises(ValueError, match="must be numbers"):
        student_times(trig, [1.0, "0.5"])
    with pytest.raises(ValueError, match="steps must be at least 1"):
        student_times(trig, 0)
    with pytest.raises(ValueError, match="an int or a list of times"):
        student_times(trig, 2.0)
    den = Denoiser(tiny_dit(), trig, "x0", null_label=3)
    with pytest.raises(ValueError, match="strictly decreasing"):  # generate checks before sampling
        generate(den, (2, 1, 8, 8), [0.5, 1.0], sampler="multistep")


def test_one_step_generator_takes_one_step_as_an_int_or_a_list():
    conv = noise.RectifiedFlow()
    gen = OneStepGenerator(lambda z, c: 2 * z, conv)
    a = generate(gen, (3, 4), 1, sampler="multistep", seed=1)
    torch.testing.assert_close(a, 2 * torch.randn((3, 4), generator=torch.Generator().manual_seed(1)), rtol=0, atol=0)
    torch.testing.assert_close(generate(gen, (3, 4), [1.0], sampler="multistep", seed=1), a, rtol=0, atol=0)
    with pytest.raises(ValueError, match="1 step only"):
        generate(gen, (3, 4), [1.0, 0.5], sampler="multistep")


def test_pinned_initial_noise_is_the_recorded_one():
    """The protocol (1,000 MNIST samples, seed 0, batches of 500) recorded its figures with the noise of
    one generator seeded 0, drawn per batch of 500; that is one draw of the whole set, and it is the
    same at any batch size. The 2-D toys (2,000 points) keep their per-500 draws, which differ from
    one draw of 4,000 values."""
    conv = noise.RectifiedFlow()  # b(t_noise) = 1: the sampler starts from the standard normal draw itself
    whole = torch.randn((1000, 1, 32, 32), generator=torch.Generator().manual_seed(0))
    for bs in (500, 300):
        probe = NoiseProbe(conv)
        generate(probe, (1000, 1, 32, 32), 1, seed=0, batch_size=bs)
        assert [len(x) for x in probe.starts] == ([500, 500] if bs == 500 else [300, 300, 300, 100])
        torch.testing.assert_close(torch.cat(probe.starts), whole, rtol=0, atol=0)

    g = torch.Generator().manual_seed(0)
    per_500 = torch.cat([torch.randn((500, 2), generator=g) for _ in range(4)])  # (torch 2.13: != one draw)
    for bs in (500, 7):
        probe = NoiseProbe(conv)
        generate(probe, (2000, 2), 1, seed=0, batch_size=bs)
        torch.testing.assert_close(torch.cat(probe.starts), per_500, rtol=0, atol=0)
