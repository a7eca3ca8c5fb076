"""The site-conditioning of the fine-tuning diagnosis: one embedding row per (site, class), none shared, the null
class's row untouched, every new row starting at its class's public row."""

from types import SimpleNamespace

import torch

from bench.bench_finetune_sites import Sites, site_conditioned
from common.config import model_config
from common.model import build_unet


def test_site_conditioning_gives_each_site_class_its_own_row_from_the_public_class():
    cfg = model_config("tiny")
    torch.manual_seed(0)
    sites = SimpleNamespace(cfg=cfg, unet=build_unet(cfg), data=[None] * 3)
    sites.label = lambda s, c: Sites.label(sites, s, c)
    rows = {(s, c): sites.label(s, c) for s in range(3) for c in range(cfg.num_classes)}
    assert len(set(rows.values())) == len(rows)  # no two (site, class) pairs share a row
    assert cfg.null_class not in rows.values()
    assert {rows[(0, c)] for c in range(cfg.num_classes)} == set(range(cfg.num_classes))

    unet = site_conditioned(sites)
    old, new = sites.unet.class_embedding.weight, unet.class_embedding.weight
    assert new.shape[0] == max(rows.values()) + 1
    assert torch.equal(new[cfg.null_class], old[cfg.null_class])
    for (s, c), row in rows.items():
        assert torch.equal(new[row], old[c]), (s, c)
    # the public model itself is not modified
    assert sites.unet.class_embedding.weight.shape[0] == cfg.num_classes + 1
