"""One-step students are sampled through the shared sampler exactly as they are trained: the
validation / evaluation path (``generator_denoiser`` + ``sample_multistep`` at 1 step) reproduces the
method's own ``generate`` on the same noise, and refuses a second step."""
import pytest
import torch

from common.sampling import sample_multistep, timesteps


@pytest.mark.parametrize("project,kwargs", [("swiftbrush", {}), ("swiftbrush", {"student_time": 0.714}),
                                            ("uni_instruct", {"guidance": 1.25})])
def test_sampler_path_equals_generate(project, kwargs, tiny_teacher):
    if project == "swiftbrush":
        from projects.swiftbrush.method import SwiftBrush as M
    else:
        from projects.uni_instruct.method import UniInstruct as M
    m = M(teacher=tiny_teacher, **kwargs)
    with torch.no_grad():  # make the EMA copy differ from the live student, so using the wrong one fails
        for p in m.roles["student"].net.parameters():
            p.add_(0.01 * torch.randn_like(p))
    den = m.generator_denoiser().eval()
    ts = timesteps(den.convention, 1)
    z, c = torch.randn(3, *m.sample_shape, generator=torch.Generator().manual_seed(0)), torch.tensor([1, 4, 7])
    with torch.no_grad():
        x = sample_multistep(den, float(den.level(ts[:1]).b) * z, ts, c)
        ema = m.ema.ema_model
        ref = m.generate(z, c, ema)
        live = m.generate(z, c)
    torch.testing.assert_close(x, ref, rtol=1e-5, atol=1e-5)
    assert (x - live).abs().max() > 1e-3  # it is the EMA weights that are sampled
    with pytest.raises(ValueError, match="1 step only"):
        sample_multistep(den, z, timesteps(den.convention, 2), c)
