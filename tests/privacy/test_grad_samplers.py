"""The fast per-sample gradient samplers give the true per-sample gradients (clipping depends on them).

Each is compared with Opacus' own sampler and with torch.func vmap(grad) ground truth, per layer and on the tiny
diffusion UNet through Opacus' hooks; the reused output buffers must not leak one step into the next.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from opacus.grad_sample import GradSampleModule
from opacus.grad_sample.conv import compute_conv_grad_sample
from opacus.grad_sample.linear import compute_linear_grad_sample
from opacus.optimizers import DPOptimizer
from torch import nn
from torch.func import functional_call, grad, vmap

from common.config import model_config
from common.model import build_unet, ddpm_scheduler, diffusion_loss
from privacy.grad_samplers import (
    FAST_GRAD_SAMPLERS,
    _prefer_grouped_conv,
    conv2d_grad_sample,
    fast_grad_samplers_installed,
    install_fast_grad_samplers,
    linear_grad_sample,
    release_grad_sample_buffers,
    restore_grad_samplers,
)

RTOL, ATOL = 1e-5, 1e-6


@pytest.fixture
def fast_installed():
    previous = install_fast_grad_samplers()
    yield
    restore_grad_samplers(previous)


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    scale = b.abs().max().clamp_min(1e-12)
    err = ((a - b).abs().max() / scale).item()
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    assert err < RTOL, f"{what}: max error {err:.2e} of the largest entry"


def _vmap_grads(layer: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> dict[str, torch.Tensor]:
    """Ground truth: the gradient of <layer(x_i), dy_i> for each sample i alone."""
    params = {k: v.detach() for k, v in layer.named_parameters()}

    def inner(p, xi, dyi):
        return (functional_call(layer, p, (xi.unsqueeze(0),)) * dyi.unsqueeze(0)).sum()

    return vmap(grad(inner), in_dims=(None, 0, 0))(params, x, dy)


CONV_CASES = [  # (cin, cout, kernel, stride, padding, dilation, groups, bias, padding_mode, size)
    (3, 5, 3, 1, 1, 1, 1, True, "zeros", 7),
    (4, 6, (3, 2), (2, 1), (1, 0), 1, 1, False, "zeros", 9),
    (4, 8, 3, 1, 2, 2, 2, True, "zeros", 8),  # dilation, groups
    (6, 6, 3, 1, 1, 1, 6, True, "zeros", 6),  # depthwise
    (4, 4, 1, 1, 0, 1, 1, True, "zeros", 5),  # 1x1: no im2col
    (4, 4, 4, 1, "same", 1, 1, True, "zeros", 6),  # even kernel: asymmetric "same"
    (3, 4, 3, 1, "valid", 1, 1, True, "zeros", 6),
    (3, 4, 3, 1, 1, 1, 1, True, "reflect", 6),  # stock Opacus ignores padding modes
    (3, 4, 3, 2, 1, 1, 1, True, "circular", 7),
    (16, 16, 3, 1, 1, 1, 1, True, "zeros", 8),  # grouped-convolution path
    (32, 32, 3, 2, 1, 1, 2, True, "zeros", 16),  # grouped-convolution path, stride and groups
    (16, 16, 3, 1, "same", 2, 1, False, "zeros", 10),  # grouped-convolution path, dilation
]


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "-".join(map(str, c)))
def test_conv2d_per_sample_gradients_are_exact(case):
    cin, cout, k, stride, padding, dilation, groups, bias, mode, size = case
    torch.manual_seed(0)
    layer = nn.Conv2d(cin, cout, k, stride=stride, padding=padding, dilation=dilation, groups=groups, bias=bias,
                      padding_mode=mode)
    x = torch.randn(3, cin, size, size)
    dy = torch.randn_like(layer(x))
    ours = conv2d_grad_sample(layer, [x], dy)
    truth = _vmap_grads(layer, x, dy)
    assert set(ours) == set(layer.parameters())
    for name, p in layer.named_parameters():
        _close(ours[p], truth[name], f"{name} vs vmap")
    if mode == "zeros":
        reference = compute_conv_grad_sample(layer, [x], dy)
        for name, p in layer.named_parameters():
            _close(ours[p], reference[p], f"{name} vs Opacus")


def test_both_conv_paths_are_covered():
    paths = {_prefer_grouped_conv(nn.Conv2d(c[0], c[1], c[2], stride=c[3], groups=c[6]),
                                  ((c[9] - 1) // (c[3] if isinstance(c[3], int) else c[3][0]) + 1) ** 2)
             for c in CONV_CASES}
    assert paths == {True, False}


@pytest.mark.parametrize("shape", [(5, 6), (5, 1, 6), (5, 4, 6), (5, 2, 3, 6)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_per_sample_gradients_are_exact(shape, bias):
    torch.manual_seed(0)
    layer = nn.Linear(6, 7, bias=bias)
    x = torch.randn(shape)
    dy = torch.randn_like(layer(x))
    ours = linear_grad_sample(layer, [x], dy)
    truth = _vmap_grads(layer, x, dy)
    reference = compute_linear_grad_sample(layer, [x], dy)
    for name, p in layer.named_parameters():
        _close(ours[p], truth[name], f"{name} vs vmap")
        _close(ours[p], reference[p], f"{name} vs Opacus")


def _unet_batch(n: int = 4):
    cfg = model_config("tiny")
    torch.manual_seed(0)
    unet = build_unet(cfg).train()
    g = torch.Generator().manual_seed(1)
    x = torch.randn((n,) + cfg.latent_shape, generator=g)
    labels = torch.randint(0, cfg.num_classes, (n,), generator=g)
    t = torch.randint(0, cfg.train_timesteps, (n,), generator=g)
    noise = torch.randn(x.shape, generator=g)
    return unet, ddpm_scheduler(cfg), (x, labels, t, noise)


def _hooks_grad_samples(unet, sched, batch) -> dict[str, torch.Tensor]:
    x, labels, t, noise = batch
    gsm = GradSampleModule(unet)
    diffusion_loss(gsm, sched, x, labels, timesteps=t, noise=noise).mean().backward()  # Opacus' default reduction
    out = {name: p.grad_sample.clone() for name, p in unet.named_parameters()}
    gsm._close()
    return out


def test_tiny_unet_per_sample_gradients_match_opacus_and_vmap():
    unet, sched, batch = _unet_batch()
    stock = _hooks_grad_samples(unet, sched, batch)
    previous = install_fast_grad_samplers()
    try:
        fast = _hooks_grad_samples(unet, sched, batch)
    finally:
        restore_grad_samplers(previous)
    x, labels, t, noise = batch
    params = {k: v.detach() for k, v in unet.named_parameters()}

    def loss_one(p, xi, yi, ti, ni):
        return diffusion_loss(lambda *a, **kw: functional_call(unet, p, a, kw), sched, xi[None], yi[None],
                              timesteps=ti[None], noise=ni[None]).sum()

    truth = vmap(grad(loss_one), in_dims=(None, 0, 0, 0, 0))(params, x, labels, t, noise)
    kinds = {type(m) for m in unet.modules()}
    assert nn.Conv2d in kinds and nn.Linear in kinds
    for name in stock:
        _close(fast[name], stock[name], f"{name} vs Opacus")
        _close(fast[name], truth[name], f"{name} vs vmap")


def test_reused_buffers_do_not_leak_between_steps(fast_installed):
    """Two DP steps with zero_grad in between, then two backward passes accumulated: every result is exact."""
    unet, sched, batch = _unet_batch()
    x, labels, t, noise = batch
    gsm = GradSampleModule(unet)
    opt = DPOptimizer(torch.optim.SGD(unet.parameters(), lr=0.1), noise_multiplier=0.0, max_grad_norm=1.0,
                      expected_batch_size=len(x))
    conv = next(m for m in unet.modules() if isinstance(m, nn.Conv2d))

    def truth() -> torch.Tensor:
        conv_out = {}
        gsm.disable_hooks()  # a plain forward and backward, Opacus not involved
        h = conv.register_forward_hook(lambda m, i, o: conv_out.update(x=i[0].detach(), y=o))
        loss = diffusion_loss(unet, sched, x, labels, timesteps=t, noise=noise).sum()
        h.remove()
        dy = torch.autograd.grad(loss, conv_out["y"])[0]
        gsm.enable_hooks()
        return compute_conv_grad_sample(conv, [conv_out["x"]], dy)[conv.weight]

    buffers = []
    for _ in range(2):
        expected = truth()
        opt.zero_grad(set_to_none=True)
        diffusion_loss(gsm, sched, x, labels, timesteps=t, noise=noise).mean().backward()
        _close(conv.weight.grad_sample, expected, "step's per-sample gradient")
        buffers.append(conv.weight.grad_sample.data_ptr())
        opt.step()
    assert buffers[0] == buffers[1], "the per-sample gradient buffer should be reused across steps"

    expected = truth()
    opt.zero_grad(set_to_none=True)
    for _ in range(2):  # accumulation without zero_grad: the first result must survive the second pass
        diffusion_loss(gsm, sched, x, labels, timesteps=t, noise=noise).mean().backward()
    first, second = conv.weight.grad_sample
    assert first.data_ptr() != second.data_ptr()
    _close(first, expected, "first accumulated")
    _close(second, expected, "second accumulated")
    gsm._close()
    assert release_grad_sample_buffers(unet) > 0 and release_grad_sample_buffers(unet) == 0


def test_install_is_explicit_and_idempotent():
    code = ("import torch.nn as nn, privacy.grad_samplers as g; from opacus.grad_sample import GradSampleModule as M;"
            "from opacus.grad_sample.conv import compute_conv_grad_sample as c;"
            "assert M.GRAD_SAMPLERS[nn.Conv2d] is c, 'registered at import'")
    subprocess.run([sys.executable, "-c", code], check=True)
    first = install_fast_grad_samplers()
    try:
        second = install_fast_grad_samplers()
        assert fast_grad_samplers_installed()
        assert second == FAST_GRAD_SAMPLERS
        assert first[nn.Conv2d] is compute_conv_grad_sample
    finally:
        restore_grad_samplers(first)
    assert GradSampleModule.GRAD_SAMPLERS[nn.Conv2d] is compute_conv_grad_sample
    assert not fast_grad_samplers_installed()
