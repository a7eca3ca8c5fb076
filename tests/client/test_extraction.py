"""The site draws the extraction samples itself: from its own entropy (a server cannot choose or replay them),
class-balanced, at most its own limit, and searches them with its lesion masks."""

import numpy as np
import pytest
import torch

from client.extraction import draw_samples, site_extraction
from client.task import load_training_data
from common.config import SiteConfig, model_config
from common.model import build_autoencoder, build_unet
from common.phantoms import make_phantom_sites


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    cfg = model_config("tiny")
    return cfg, build_autoencoder(cfg).eval(), build_unet(cfg).eval()


def test_samples_come_from_the_sites_entropy_and_are_class_balanced(models, monkeypatch):
    cfg, ae, unet = models
    torch.set_num_threads(1)
    seen = []
    real = __import__("common.model", fromlist=["sample_latents"]).sample_latents

    def spy(unet_, cfg_, labels, **kw):
        seen.append(labels.clone())
        return real(unet_, cfg_, labels, **kw)

    monkeypatch.setattr("client.extraction.sample_latents", spy)
    torch.manual_seed(123)  # a seed the server could know: it must not decide the samples
    a, za = draw_samples(ae, unet, cfg, 1.0, 6, torch.device("cpu"))
    torch.manual_seed(123)
    b, zb = draw_samples(ae, unet, cfg, 1.0, 6, torch.device("cpu"))
    assert a.shape == (6, *cfg.image_shape) and za.shape == (6, *cfg.latent_shape)
    assert not np.allclose(za, zb)
    labels = torch.cat(seen[:1]).tolist()
    assert sorted(labels) == [0, 0, 0, 1, 1, 1]


def test_the_site_limit_caps_what_the_server_asks(models, tmp_path):
    cfg, ae, unet = models
    torch.set_num_threads(1)
    site_dir = make_phantom_sites(tmp_path / "ph", n_sites=1, n_subjects=24, size=32, seed=2)[0]
    site = SiteConfig(
        site_dir=str(site_dir), state_dir=str(tmp_path / "s"), max_extraction_samples=4
    )
    train, holdout = load_training_data(site, cfg)
    out = site_extraction(
        site,
        cfg,
        ae,
        unet,
        1.0,
        torch.device("cpu"),
        holdout.images[:3],
        ["r0", "r1", "r2"],
        train,
        holdout,
        samples_requested=1000,
    )
    assert out["samples_requested"] == 1000 and out["n_samples_drawn"] == 4
    assert out["max_extraction_samples"] == 4
    lesion = out["lesion_regions"]
    assert lesion["n_members_with_lesion_masks"] == int((train.labels == 1).sum())
    assert lesion["mask_problems"] == 0
