"""common/critics/discriminator.py: hooks, heads and the two GAN losses."""
import pytest
import torch
from torch import nn

from common.critics.discriminator import Discriminator, FeatureHooks, discriminator_loss, generator_loss


def test_hooks_capture_named_features_and_leave_no_hook_behind():
    net = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))
    x = torch.randn(4, 3)
    with FeatureHooks(net, ["0", "2"]) as feats:
        out = net(x)
    torch.testing.assert_close(feats["0"], net[0](x))
    torch.testing.assert_close(feats["2"], out)
    assert not net[0]._forward_hooks and not net[2]._forward_hooks


def test_heads_start_at_zero_take_tokens_and_maps_and_concatenate():
    d = Discriminator({"a": 8, "b": 4})
    feats = {"a": torch.randn(2, 5, 8), "b": torch.randn(2, 4, 3, 3)}
    logits = d(feats)
    assert logits.shape == (2, 5 + 9) and bool((logits == 0).all())  # D = 1/2, ratio 1, until trained
    assert Discriminator({"a": 8, "b": 4}, pool=True)(feats).shape == (2, 2)  # one logit a sample and head
    with pytest.raises(KeyError, match=r"\['b'\] were not produced"):
        d({"a": torch.randn(2, 5, 8)})


def test_losses_at_known_logits():
    real, fake = torch.tensor([[2.0, 0.0]]), torch.tensor([[-3.0, 0.5]])
    # hinge: relu(1 - real) = [0, 1] -> 0.5; relu(1 + fake) = [0, 1.5] -> 0.75
    torch.testing.assert_close(discriminator_loss(real, fake, "hinge"), torch.tensor([1.25]))
    torch.testing.assert_close(generator_loss(fake, "hinge"), torch.tensor([1.25]))
    sp = torch.nn.functional.softplus
    want = (sp(-real).mean() + sp(fake).mean()).reshape(1)
    torch.testing.assert_close(discriminator_loss(real, fake, "ns"), want)
    torch.testing.assert_close(generator_loss(fake, "ns"), sp(-fake).mean().reshape(1))


@pytest.mark.parametrize("pool", [False, True])
@pytest.mark.parametrize("kind", ["hinge", "ns"])
def test_a_head_learns_to_separate_real_from_generated_features(kind, pool):
    """Four tokens from one of two Gaussians whose means differ by a pattern across channels (a shift
    the same in every channel would be removed by the head's LayerNorm; the best possible AUC is
    0.9998): after 200 steps, per-position or pooled, the held-out AUC of the per-sample logit is
    above 0.97."""
    from common.critics.discriminator import auc

    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    d = Discriminator({"f": 16}, hidden=32, pool=pool)
    opt = torch.optim.Adam(d.parameters(), lr=3e-3)

    def batch(n):
        shift = torch.linspace(-1.0, 1.0, 16)
        return torch.randn(n, 4, 16, generator=g) + shift, torch.randn(n, 4, 16, generator=g)

    for _ in range(200):
        real, fake = batch(64)
        loss = discriminator_loss(d({"f": real}), d({"f": fake}), kind).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    real, fake = batch(500)
    with torch.no_grad():
        lr, lf = d({"f": real}), d({"f": fake})
    assert lr.shape == (500, 1 if pool else 4)
    assert auc(lr.mean(1), lf.mean(1)) > 0.97


def test_conv_head_learns_sequence_structure_and_normalises_groups_of_eight():
    """The SANA-Sprint head: its batch norm works within groups of 8 samples (a sample's logits do
    not depend on the samples of other groups), so a shift shared by a whole batch is invisible to
    it; what it sees is structure along the token sequence: smoothed tokens against white ones of the
    same per-channel mean and variance (which a per-token MLP head cannot tell apart: AUC 0.44-0.52
    here), held-out AUC above 0.85 after 300 steps (0.94 when written; its spectral norm makes it slow)."""
    from common.critics.discriminator import auc

    torch.manual_seed(0)
    d = Discriminator({"f": 8}, hidden=16, head="conv")
    x = torch.randn(16, 12, 8)
    with torch.no_grad():
        a = d({"f": x})
        b = d({"f": torch.cat([x[:8], 5 * x[8:] + 3])})  # the second group changed
        c = d({"f": x + 2.0})  # the same shift for every sample, token and channel
    torch.testing.assert_close(a[:8], b[:8])
    assert not torch.allclose(a[8:], b[8:])
    torch.testing.assert_close(a, c, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="no pooled form"):
        Discriminator({"f": 8}, head="conv", pool=True)
    with pytest.raises(ValueError, match="unknown discriminator head 'cnn'"):
        Discriminator({"f": 8}, head="cnn")

    g = torch.Generator().manual_seed(0)
    kernel = torch.ones(1, 1, 5) / 5 ** 0.5  # keeps the variance of white tokens

    def batch(n):
        white = torch.randn(n * 8, 1, 36, generator=g)
        smooth = torch.nn.functional.conv1d(white, kernel)[..., :32].reshape(n, 8, 32).transpose(1, 2)
        return smooth, torch.randn(n, 32, 8, generator=g)

    opt = torch.optim.Adam(d.parameters(), lr=3e-3)
    for _ in range(300):
        real, fake = batch(32)
        loss = discriminator_loss(d({"f": real}), d({"f": fake}), "hinge").mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    real, fake = batch(400)
    with torch.no_grad():
        lr, lf = d({"f": real}), d({"f": fake})
    assert lr.shape == (400, 32)
    assert auc(lr.mean(1), lf.mean(1)) > 0.85


def test_auc_at_known_scores():
    from common.critics.discriminator import auc

    assert auc(torch.tensor([2.0, 3.0]), torch.tensor([0.0, 1.0])) == 1.0
    assert auc(torch.tensor([0.0, 1.0]), torch.tensor([2.0, 3.0])) == 0.0
    assert auc(torch.tensor([1.0, 1.0]), torch.tensor([1.0])) == 0.5  # ties count one half
    # real [0, 2] vs fake [1]: one pair of two above
    assert auc(torch.tensor([0.0, 2.0]), torch.tensor([1.0])) == 0.5
    assert auc(torch.tensor([0.0, 2.0, 3.0]), torch.tensor([1.0, 2.0])) == (0 + 1 + 1 + 0.5 + 1) / 6
    with pytest.raises(ValueError, match="at least one real and one generated"):
        auc(torch.tensor([]), torch.tensor([1.0]))
