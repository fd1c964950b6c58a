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
