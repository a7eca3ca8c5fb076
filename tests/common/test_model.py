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
