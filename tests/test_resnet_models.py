"""The shared ResNet blocks: any even box round-trips its shape and position, the residual path
starts near the identity, the plain variant has no skip."""

import pytest
import torch

from cryoprior.nn.models.resnet import (
    ResBlock2d,
    ResNetAutoencoder,
    ResNetClassifier,
    ResNetConfig,
    crop_back,
    fuse_batchnorm,
    pad_to_multiple,
)


@pytest.mark.parametrize("d", [32, 36, 50, 64])
def test_pad_then_crop_is_the_identity(d):
    x = torch.randn(2, 1, d, d)
    xp, off = pad_to_multiple(x, 8)
    assert xp.shape[-1] % 8 == 0
    assert torch.equal(crop_back(xp, off, (d, d)), x)


@pytest.mark.parametrize("d", [30, 48])
def test_autoencoder_keeps_the_box_and_classifier_gives_one_logit(d):
    cfg = ResNetConfig(widths=[4, 8, 8], norm="instance")
    ae, disc = ResNetAutoencoder(cfg), ResNetClassifier(cfg)
    x = torch.randn(3, 1, d, d)
    assert ae(x).shape == x.shape
    assert disc(x).shape == (3,)


def test_batched_equals_looped_in_eval():
    torch.manual_seed(0)
    ae = ResNetAutoencoder(ResNetConfig(widths=[4, 8])).eval()
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        looped = torch.cat([ae(x[i : i + 1]) for i in range(4)])
        assert torch.allclose(ae(x), looped, atol=1e-5)


def test_residual_block_passes_its_input_when_the_body_is_zero():
    block = ResBlock2d(3, norm="none")
    plain = ResBlock2d(3, norm="none", residual=False)
    for b in (block, plain):
        for p in b.parameters():
            torch.nn.init.zeros_(p)
    x = torch.rand(1, 3, 8, 8)  # positive: LeakyReLU is the identity there
    assert torch.allclose(block(x), x)
    assert torch.allclose(plain(x), torch.zeros_like(x))


def test_pixel_unshuffle_stem_keeps_every_pixel():
    """stem 2, one level, identity convolutions: the fold into channels and the unfold are exact
    inverses, so single-pixel detail survives (a pooling stem would blur it)."""
    ae = ResNetAutoencoder(ResNetConfig(widths=[4], blocks_per_level=0, norm="none", stem=2))
    for conv in (ae.encoder.net[0][0], ae.decoder.net[-1]):
        torch.nn.init.zeros_(conv.weight)
        torch.nn.init.zeros_(conv.bias)
        for c in range(4):
            conv.weight.data[c, c, 1, 1] = 1.0
    x = torch.rand(2, 1, 12, 12)  # positive: LeakyReLU is the identity there
    x[0, 0, 5, 7] += 10.0  # one odd-position pixel
    assert torch.allclose(ae(x), x, atol=1e-6)


@pytest.mark.parametrize("stem", [1, 2])
def test_folding_batch_norm_keeps_the_eval_output(stem):
    torch.manual_seed(0)
    ae = ResNetAutoencoder(ResNetConfig(widths=[4, 8], stem=stem))
    for m in ae.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 2)
            m.bias.data.uniform_(-1, 1)
    fused = fuse_batchnorm(ae)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        ref, out = ae.eval()(x), fused(x)
    assert ref.abs().max() > 0.1
    assert torch.allclose(out, ref, atol=1e-4 * float(ref.abs().max()))
