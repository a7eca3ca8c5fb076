"""Set-up shared by the privacy tests."""

import numpy as np


def blobs(rng, n, size=24):
    """`n` smooth random blobs with noise, (n, 1, size, size) in [0, 1]: distinct images that are alike."""
    yy, xx = np.mgrid[:size, :size] / size
    out = [
        np.clip(
            1.2
            - np.hypot(xx - rng.uniform(0.4, 0.6), yy - rng.uniform(0.4, 0.6))
            / rng.uniform(0.2, 0.35),
            0,
            1,
        )
        * rng.uniform(0.6, 1.0)
        + rng.normal(0, 0.02, (size, size))
        for _ in range(n)
    ]
    return np.clip(np.asarray(out, np.float32)[:, None], 0, 1)


def trained_looking_unet(cfg):
    """The UNet of `cfg` in training mode, seeded. MONAI zero-initialises the output convolutions (of the UNet and
    of each residual block), so at initialisation most parameters get no gradient at all and a test would compare
    zeros with zeros: every parameter is perturbed."""
    import torch

    from common.model import build_unet

    torch.manual_seed(0)
    unet = build_unet(cfg).train()
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p), alpha=0.05)
    return unet
