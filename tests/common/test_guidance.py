"""Classifier-free guidance: the null class, class dropout, and the guided prediction."""

import pytest
import torch

from common.config import RunConfig, model_config
from common.model import build_unet, drop_labels, guided_prediction, sample_latents


@pytest.fixture()
def unet():
    cfg = model_config("tiny")
    torch.manual_seed(0)
    net = build_unet(cfg).eval()
    with torch.no_grad():  # MONAI zero-initialises the output conv; make the net non-trivial
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


def test_the_unet_has_a_null_class_after_the_real_ones():
    cfg = model_config("tiny")
    assert cfg.null_class == cfg.num_classes == 2
    assert build_unet(cfg).class_embedding.num_embeddings == cfg.num_classes + 1


def test_class_dropout_replaces_labels_by_the_null_class_at_the_rate():
    labels = torch.randint(0, 2, (20_000,))
    dropped = drop_labels(labels, 0.1, null_class=2, generator=torch.Generator().manual_seed(1))
    changed = dropped != labels
    assert set(dropped[changed].tolist()) == {2}  # only ever to the null class
    assert torch.equal(dropped[~changed], labels[~changed])
    assert abs(changed.float().mean().item() - 0.1) < 0.01
    assert torch.equal(drop_labels(labels, 0.0, 2), labels)
    assert (drop_labels(labels, 1.0, 2) == 2).all()
    with pytest.raises(ValueError, match="class dropout"):
        drop_labels(labels, 1.5, 2)


def test_guidance_scale_one_is_the_conditional_prediction_and_others_mix_in_the_null_class(unet):
    cfg = model_config("tiny")
    x = torch.randn(3, *cfg.latent_shape)
    t = torch.tensor([10, 500, 900])
    y = torch.tensor([0, 1, 1])
    with torch.no_grad():
        cond = unet(x, timesteps=t, class_labels=y)
        uncond = unet(x, timesteps=t, class_labels=torch.full_like(y, cfg.null_class))
        one = guided_prediction(unet, x, t, y, cfg.null_class, 1.0)
        three = guided_prediction(unet, x, t, y, cfg.null_class, 3.0)
        zero = guided_prediction(unet, x, t, y, cfg.null_class, 0.0)
    assert one.shape == three.shape == (3, *cfg.latent_shape)
    assert torch.equal(one, cond)
    assert not torch.allclose(cond, uncond)  # the null token is a class of its own
    torch.testing.assert_close(zero, uncond, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(three, uncond + 3.0 * (cond - uncond), rtol=1e-4, atol=1e-5)


def test_guided_sampling_is_one_batched_forward_of_twice_the_batch(unet):
    cfg = model_config("tiny")
    seen = []
    hook = unet.register_forward_hook(lambda m, args, kw_out=None: seen.append(len(args[0])))
    try:
        sample_latents(unet, cfg, torch.tensor([0, 1]), steps=2, guidance_scale=2.5)
    finally:
        hook.remove()
    assert seen == [4, 4]
    noise = torch.randn(2, *cfg.latent_shape)
    a = sample_latents(unet, cfg, torch.tensor([0, 1]), steps=2, noise=noise)
    b = sample_latents(unet, cfg, torch.tensor([0, 1]), steps=2, noise=noise, guidance_scale=1.0)
    c = sample_latents(unet, cfg, torch.tensor([0, 1]), steps=2, noise=noise, guidance_scale=4.0)
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_run_config_checks_guidance_settings():
    assert RunConfig().class_dropout == 0.1 and RunConfig().guidance_scale > 1
    with pytest.raises(ValueError, match="class-dropout"):
        RunConfig(class_dropout=1.0)
    with pytest.raises(ValueError, match="needs class-dropout"):
        RunConfig(class_dropout=0.0, guidance_scale=3.0)
    RunConfig(class_dropout=0.0, guidance_scale=1.0)
