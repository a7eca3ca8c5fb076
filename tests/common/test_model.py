import math

import torch

from common.config import model_config
from common.model import (
    autoencoder_loss,
    build_autoencoder,
    build_unet,
    ddpm_scheduler,
    decode,
    diffusion_loss,
    encode,
    estimate_latent_scale,
    lesion_weight_map,
    sample_latents,
)


def test_losses_are_per_sample_and_differentiable():
    cfg = model_config("tiny")
    ae, unet = build_autoencoder(cfg), build_unet(cfg)
    x = torch.rand(3, *cfg.image_shape)
    loss = autoencoder_loss(ae, x, kl_weight=1e-6)
    assert loss.shape == (3,) and torch.isfinite(loss).all()
    loss.mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in ae.parameters())
    mu, sigma = encode(ae, x)
    assert mu.shape == (3, *cfg.latent_shape) and (sigma > 0).all()
    d = diffusion_loss(unet, ddpm_scheduler(cfg), mu, torch.tensor([0, 1, 0]))
    assert d.shape == (3,)


def test_diffusion_loss_uses_class_label():
    cfg = model_config("tiny")
    torch.manual_seed(0)
    unet = build_unet(cfg)
    with torch.no_grad():  # MONAI zero-initialises the output conv; make the net non-trivial
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    z = torch.randn(2, *cfg.latent_shape)
    t, noise = torch.tensor([500, 500]), torch.randn_like(z)
    a = diffusion_loss(unet, ddpm_scheduler(cfg), z, torch.tensor([0, 0]), t, noise)
    b = diffusion_loss(unet, ddpm_scheduler(cfg), z, torch.tensor([1, 1]), t, noise)
    assert not torch.allclose(a, b)


def test_the_lesion_weight_map_weighs_the_masked_latent_pixels_only():
    """2D and 3D: a mask's latent pixels get 1 + w x (their lesion share), the rest 1; a negative weight is
    refused; with an empty mask, or weight 0, the weighted loss is the plain loss, bit for bit."""
    import pytest

    mask = torch.zeros(2, 1, 8, 8, dtype=torch.bool)
    mask[0, 0, :4, :4] = (
        True  # exactly the top-left latent pixel of a 4 x 4 latent grid (2 x 2 pooling)
    )
    mask[0, 0, 4, 4] = True  # a quarter of one latent pixel
    w = lesion_weight_map(mask, 4, 20.0)
    assert w.shape == (2, 1, 4, 4)
    assert w[0, 0, :2, :2].tolist() == [[21.0, 21.0], [21.0, 21.0]]
    assert w[0, 0, 2, 2] == 1.0 + 20.0 / 4
    assert float(w[0].sum()) == 16 + 4 * 20 + 5 and (w[1] == 1).all()
    assert lesion_weight_map(torch.ones(1, 1, 8, 8, 8), 2, 3.0).shape == (1, 1, 2, 2, 2)
    with pytest.raises(ValueError, match="lesion_weight"):
        lesion_weight_map(mask, 4, -1.0)

    cfg = model_config("tiny")
    torch.manual_seed(0)
    unet, sched = build_unet(cfg), ddpm_scheduler(cfg)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    z = torch.randn(2, *cfg.latent_shape)
    y, t, noise = torch.tensor([1, 0]), torch.tensor([300, 700]), torch.randn_like(z)
    plain = diffusion_loss(unet, sched, z, y, t, noise)
    empty = torch.zeros(2, 1, cfg.image_size, cfg.image_size)
    for weight in (
        lesion_weight_map(empty, cfg.latent_size, 50.0),
        lesion_weight_map(empty + 1, cfg.latent_size, 0.0),
    ):
        assert torch.equal(diffusion_loss(unet, sched, z, y, t, noise, weight=weight), plain)
    lesion = empty.clone()
    lesion[0, :, :16, :16] = 1  # the first sample's top-left quarter
    weighted = diffusion_loss(
        unet, sched, z, y, t, noise, weight=lesion_weight_map(lesion, cfg.latent_size, 10.0)
    )
    assert weighted[1] == plain[1]  # a sample's weights are its own
    assert weighted[0] > plain[0]


def test_ddim_sampling_is_seeded_and_decodes_to_unit_range():
    cfg = model_config("tiny")
    ae, unet = build_autoencoder(cfg).eval(), build_unet(cfg).eval()
    labels = torch.tensor([0, 1])
    z1 = sample_latents(unet, cfg, labels, steps=3, generator=torch.Generator().manual_seed(1))
    z2 = sample_latents(unet, cfg, labels, steps=3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(z1, z2) and z1.shape == (2, *cfg.latent_shape)
    img = decode(ae, z1, latent_scale=1.0)
    assert img.shape == (2, *cfg.image_shape) and img.min() >= 0 and img.max() <= 1


def test_latent_scale_normalises_latent_std():
    cfg = model_config("tiny")
    ae = build_autoencoder(cfg).eval()
    x = torch.rand(8, *cfg.image_shape)
    scale = estimate_latent_scale(ae, x)
    mu, _ = encode(ae, x)
    assert abs(float((mu * scale).std()) - 1.0) < 1e-3


class Oracle(torch.nn.Module):
    """The ideal denoiser for data that is one known latent z0: what a perfectly trained UNet would predict."""

    def __init__(self, z0: torch.Tensor, scheduler, prediction_type: str):
        super().__init__()
        self.z0, self.abar, self.kind = z0, scheduler.alphas_cumprod, prediction_type

    def forward(self, x, timesteps, class_labels):
        a = self.abar[timesteps].view(-1, *([1] * (x.ndim - 1)))
        eps = (x - a.sqrt() * self.z0) / (1 - a).sqrt()
        return eps if self.kind == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * self.z0


import dataclasses  # noqa: E402

import pytest  # noqa: E402


@pytest.mark.parametrize("prediction_type", ["v_prediction", "epsilon"])
def test_samplers_and_loss_agree_on_what_the_unet_predicts(prediction_type):
    """DDIM and DDPM recover the data from a perfect predictor, and the training loss of that predictor is zero:
    a scheduler built without the config's prediction type would fail both."""
    cfg = dataclasses.replace(model_config("tiny"), prediction_type=prediction_type)
    z0 = torch.randn(1, *cfg.latent_shape).expand(2, *cfg.latent_shape)
    oracle = Oracle(z0, ddpm_scheduler(cfg), prediction_type)
    labels = torch.tensor([0, 1])
    assert diffusion_loss(oracle, ddpm_scheduler(cfg), z0, labels).max() < 1e-8
    for sampler, steps in (("ddim", 10), ("ddpm", 1000)):
        z = sample_latents(
            oracle,
            cfg,
            labels,
            steps=steps,
            sampler=sampler,
            generator=torch.Generator().manual_seed(0),
        )
        assert torch.allclose(z, z0, atol=2e-3), (sampler, (z - z0).abs().max())


def test_v_prediction_is_the_default():
    """(Old checkpoints, from before the field, load as epsilon: tests/server/test_checkpoint.py.)"""
    cfg = model_config("tiny")
    assert (
        cfg.prediction_type == "v_prediction"
        and ddpm_scheduler(cfg).prediction_type == "v_prediction"
    )


def test_a_new_autoencoders_posterior_starts_narrow_but_not_collapsed():
    """MONAI's start (sigma 1, as large as the latents) left a 400-step autoencoder ignoring its latent; a start
    near zero made a brittle decoder. Every image starts at sigma exp(-1.5), whatever the input."""
    from common.model import INITIAL_LOG_VARIANCE

    torch.manual_seed(0)
    ae = build_autoencoder(model_config("tiny"))
    _, sigma = encode(ae, torch.rand(4, 1, 32, 32))
    assert torch.allclose(sigma, torch.full_like(sigma, math.exp(INITIAL_LOG_VARIANCE / 2)))
    assert 0.1 < math.exp(INITIAL_LOG_VARIANCE / 2) < 0.5
