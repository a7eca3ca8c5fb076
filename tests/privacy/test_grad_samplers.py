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
from common.model import ddpm_scheduler, diffusion_loss
from privacy.bookkeeping import BookKeepingModule
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
from tests.privacy.conftest import trained_looking_unet

RTOL, ATOL = 1e-5, 1e-6


@pytest.fixture
def fast_installed():
    previous = install_fast_grad_samplers()
    yield
    restore_grad_samplers(previous)


def _close(
    a: torch.Tensor, b: torch.Tensor, what: str, rtol: float = RTOL, floor: float = 1e-12
) -> None:
    """Max error relative to the largest entry of b, or to `floor` for gradients that are zero up to rounding
    (the attention key bias: softmax ignores a constant added to every score)."""
    scale = b.abs().max().clamp_min(floor)
    err = ((a - b).abs().max() / scale).item()
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    assert err < rtol, f"{what}: max error {err:.2e} of the largest entry"


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
    layer = nn.Conv2d(
        cin,
        cout,
        k,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        bias=bias,
        padding_mode=mode,
    )
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
    paths = {
        _prefer_grouped_conv(
            nn.Conv2d(c[0], c[1], c[2], stride=c[3], groups=c[6]),
            ((c[9] - 1) // (c[3] if isinstance(c[3], int) else c[3][0]) + 1) ** 2,
        )
        for c in CONV_CASES
    }
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
    unet = trained_looking_unet(cfg)
    g = torch.Generator().manual_seed(1)
    x = torch.randn((n,) + cfg.latent_shape, generator=g)
    labels = torch.randint(0, cfg.num_classes, (n,), generator=g)
    t = torch.randint(0, cfg.train_timesteps, (n,), generator=g)
    noise = torch.randn(x.shape, generator=g)
    return unet, ddpm_scheduler(cfg), (x, labels, t, noise)


def _hooks_grad_samples(unet, sched, batch) -> dict[str, torch.Tensor]:
    x, labels, t, noise = batch
    gsm = GradSampleModule(unet)
    diffusion_loss(
        gsm, sched, x, labels, timesteps=t, noise=noise
    ).mean().backward()  # Opacus' default reduction
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
        return diffusion_loss(
            lambda *a, **kw: functional_call(unet, p, a, kw),
            sched,
            xi[None],
            yi[None],
            timesteps=ti[None],
            noise=ni[None],
        ).sum()

    truth = vmap(grad(loss_one), in_dims=(None, 0, 0, 0, 0))(params, x, labels, t, noise)
    kinds = {type(m) for m in unet.modules()}
    assert nn.Conv2d in kinds and nn.Linear in kinds
    floor = 1e-3 * max(float(g.abs().max()) for g in truth.values())
    for name in stock:
        _close(fast[name], stock[name], f"{name} vs Opacus", floor=floor)
        _close(fast[name], truth[name], f"{name} vs vmap", floor=floor)


def test_reused_buffers_do_not_leak_between_steps(fast_installed):
    """Two DP steps with zero_grad in between, then two backward passes accumulated: every result is exact."""
    unet, sched, batch = _unet_batch()
    x, labels, t, noise = batch
    gsm = GradSampleModule(unet)
    opt = DPOptimizer(
        torch.optim.SGD(unet.parameters(), lr=0.1),
        noise_multiplier=0.0,
        max_grad_norm=1.0,
        expected_batch_size=len(x),
    )
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
    for _ in range(
        2
    ):  # accumulation without zero_grad: the first result must survive the second pass
        diffusion_loss(gsm, sched, x, labels, timesteps=t, noise=noise).mean().backward()
    first, second = conv.weight.grad_sample
    assert first.data_ptr() != second.data_ptr()
    _close(first, expected, "first accumulated")
    _close(second, expected, "second accumulated")
    gsm._close()
    assert release_grad_sample_buffers(unet) > 0 and release_grad_sample_buffers(unet) == 0


def test_install_is_explicit_and_idempotent():
    code = (
        "import torch.nn as nn, privacy.grad_samplers as g; from opacus.grad_sample import GradSampleModule as M;"
        "from opacus.grad_sample.conv import compute_conv_grad_sample as c;"
        "assert M.GRAD_SAMPLERS[nn.Conv2d] is c, 'registered at import'"
    )
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


# ---------------------------------------------------------------------------------------------------------------
# Book-keeping clipping (privacy/bookkeeping.py): the clipped gradient SUM of one step, against the definition:
# per-sample gradients from torch.func vmap(grad), each clipped to C over all parameters (flat), summed. C is set
# between the per-sample norms so that some samples are clipped and some are not.


def _clip_and_sum_reference(
    per_sample: dict[str, torch.Tensor], n: int
) -> tuple[torch.Tensor, dict, float]:
    norms = torch.stack([g.reshape(n, -1).norm(dim=1) for g in per_sample.values()], dim=1).norm(
        dim=1
    )
    clip = float(norms.median())  # half the samples above the bound, half below (or at it)
    factor = (clip / (norms + 1e-6)).clamp(max=1.0)
    assert (norms > clip * 1.01).any() and (norms < clip * 0.99).any(), norms
    return norms, {k: torch.einsum("i,i...->...", factor, g) for k, g in per_sample.items()}, clip


def _check_bookkeeping(
    model: nn.Module, per_sample_loss, inputs: tuple[torch.Tensor, ...], rtol: float = RTOL
) -> None:
    """per_sample_loss(model, *inputs) -> (N,) losses; the model's clipped sum must match the reference."""
    n = len(inputs[0])
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}

    def loss_one(p, *xs):
        return per_sample_loss(
            lambda *a: functional_call(model, p, a), *(x[None] for x in xs)
        ).sum()

    truth = vmap(grad(loss_one), in_dims=(None,) + (0,) * len(inputs))(params, *inputs)
    norms, reference, clip = _clip_and_sum_reference(truth, n)
    assert all(g.abs().max() > 0 for g in reference.values()), (
        "every parameter must have a gradient to compare"
    )
    wrapped = BookKeepingModule(model)
    per_sample_loss(wrapped, *inputs).mean().backward()  # the mean over the batch, as in training
    assert all(p.grad is None for p in model.parameters()), (
        "autograd should compute no weight gradient"
    )
    ours = wrapped.clipped_grad_sum(clip)
    _close(ours, norms, "per-sample norms", rtol)
    floor = 1e-3 * max(float(g.abs().max()) for g in reference.values())
    for name, p in model.named_parameters():
        if p.requires_grad:
            _close(p.grad, reference[name], f"{name} clipped sum", rtol, floor)
        else:
            assert p.grad is None, f"{name} is frozen"


class _Convs(nn.Module):
    """Every Conv path of the book-keeping norms: ghost (small maps), per-sample via im2col + bmm and via the
    grouped convolution (larger maps), padding modes, even-kernel 'same', groups, no bias; then the loss."""

    def __init__(self):
        super().__init__()
        self.im2col_path = nn.Conv2d(3, 16, 3, padding=1)  # 8x8 maps: per-sample gradients
        self.grouped_path = nn.Conv2d(16, 16, 3, padding=1)
        self.groups = nn.Conv2d(16, 16, 3, padding=1, groups=2, bias=False)
        self.ghost = nn.Conv2d(16, 16, 3, stride=3)  # 8x8 -> 2x2: ghost norm
        self.ghost_reflect = nn.Conv2d(16, 16, 3, padding=1, padding_mode="reflect")
        self.ghost_same_even = nn.Conv2d(16, 8, 4, padding="same")
        self.norm = nn.GroupNorm(4, 8)

    def forward(self, x):
        h = torch.tanh(self.im2col_path(x))
        h = torch.tanh(self.groups(torch.tanh(self.grouped_path(h))))
        h = self.ghost_same_even(self.ghost_reflect(torch.tanh(self.ghost(h))))
        return self.norm(h)


class _Mixed(nn.Module):
    """Linear with 1 token (outer product), few tokens (ghost) and many (per-sample), Embedding with repeated
    rows and a padding row, Conv1d / Conv3d, a frozen parameter."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(5, 6, padding_idx=0)
        self.one_token = nn.Linear(6, 7)
        self.few_tokens = nn.Linear(6, 7)
        self.many_tokens = nn.Linear(7, 3, bias=False)
        self.conv1d = nn.Conv1d(3, 4, 3, padding=1)
        self.conv3d = nn.Conv3d(1, 2, 2)
        self.frozen = nn.Linear(4, 4)
        self.frozen.weight.requires_grad_(False)

    def forward(self, idx, vol):
        e = self.embed(idx)  # (N, 8, 6)
        h = torch.tanh(self.few_tokens(e[:, :2])).sum(1) + self.one_token(e.mean(1))  # (N, 7)
        t = torch.tanh(
            self.many_tokens(
                torch.tanh(h)[:, None, :] * torch.linspace(-1, 1, 8, dtype=h.dtype)[None, :, None]
            )
        )
        c = self.frozen(self.conv1d(t.transpose(1, 2)).mean(2))  # (N, 4)
        return c.sum(1) * self.conv3d(vol).mean((1, 2, 3, 4))


def test_bookkeeping_conv_and_groupnorm_paths_are_exact():
    torch.manual_seed(0)
    model = _Convs().double().train()  # float64: a wrong formula cannot hide in rounding
    x = (
        torch.randn(6, 3, 8, 8, dtype=torch.float64)
        * torch.linspace(0.2, 3, 6, dtype=torch.float64)[:, None, None, None]
    )
    _check_bookkeeping(
        model, lambda m, x: (m(x) - 0.5).square().flatten(1).mean(1), (x,), rtol=1e-10
    )


def test_bookkeeping_linear_embedding_conv1d_conv3d_are_exact():
    torch.manual_seed(0)
    model = _Mixed().double().train()
    idx = torch.tensor(
        [
            [1, 1, 2, 0, 3, 4, 1, 0],
            [2, 3, 4, 1, 0, 0, 2, 2],
            [4, 4, 4, 4, 1, 2, 3, 0],
            [0, 1, 2, 3, 4, 0, 1, 2],
            [3, 3, 1, 1, 2, 2, 4, 4],
            [1, 2, 1, 2, 1, 2, 1, 2],
        ]
    )
    vol = torch.randn(6, 1, 3, 4, 4, dtype=torch.float64)
    _check_bookkeeping(model, lambda m, i, v: m(i, v).square(), (idx, vol), rtol=1e-10)


@pytest.mark.parametrize("preset", ["tiny", "small", "tiny3d"])
def test_bookkeeping_unet_clipped_sum_matches_per_sample_reference(preset):
    """tiny3d: the 3-D UNet (Conv3d, GroupNorm on volumes, attention over 4^3 tokens) the CPU 3-D path trains."""
    cfg = model_config(preset)
    unet = trained_looking_unet(cfg)
    sched = ddpm_scheduler(cfg)
    g = torch.Generator().manual_seed(1)
    n = 4
    x = torch.randn((n,) + cfg.latent_shape, generator=g) * torch.tensor([0.5, 1.0, 2.0, 4.0]).view(
        (n,) + (1,) * len(cfg.latent_shape)
    )
    labels = torch.randint(0, cfg.num_classes, (n,), generator=g)
    t = torch.tensor([10, 300, 600, 990])
    noise = torch.randn(x.shape, generator=g)

    def per_sample_loss(
        m, xi, yi, ti, ni
    ):  # m takes positional arguments only (functional_call above)
        def call(noisy, timesteps, class_labels):
            return m(noisy, timesteps, None, class_labels)

        return diffusion_loss(call, sched, xi, yi, timesteps=ti, noise=ni)

    _check_bookkeeping(unet, per_sample_loss, (x, labels, t, noise))


def test_bookkeeping_refuses_what_it_cannot_clip_exactly():
    with pytest.raises(ValueError, match=r"hooks.*0 \(LSTM\)"):
        BookKeepingModule(nn.Sequential(nn.LSTM(3, 3)))
    shared = nn.Linear(3, 3)
    wrapped = BookKeepingModule(nn.Sequential(shared, nn.Tanh(), shared))  # one layer called twice
    with pytest.raises(RuntimeError, match="called twice"):
        wrapped(torch.randn(2, 3))
    wrapped = BookKeepingModule(nn.Linear(3, 1))
    wrapped(torch.randn(2, 3))
    with pytest.raises(RuntimeError, match="without backward"):
        wrapped.clipped_grad_sum(1.0)


def test_bookkeeping_records_only_training_passes_through_the_wrapper():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    wrapped = BookKeepingModule(model)
    model(torch.randn(2, 3)).sum().backward()  # the bare model: ordinary autograd, nothing recorded
    assert not wrapped._records and model[0].weight.grad is not None
    with torch.no_grad():
        wrapped(torch.randn(2, 3))
    wrapped.eval()
    wrapped(torch.randn(2, 3))
    assert not wrapped._records
    wrapped.train()
    wrapped(torch.randn(2, 3))
    assert len(wrapped._records) == 2 and all(p.requires_grad for p in model.parameters())
    assert wrapped.close() is model and not model[0]._forward_hooks


def test_bookkeeping_autoencoder_clipped_sum_matches_opacus():
    """The site trains the autoencoder with DP-SGD too (its forward draws noise: same seed for both passes)."""
    from common.model import autoencoder_loss, build_autoencoder

    cfg = model_config("tiny")
    torch.manual_seed(0)
    ae = build_autoencoder(cfg).train()
    n = 4
    images = (
        torch.rand(n, 1, cfg.image_size, cfg.image_size)
        * torch.tensor([0.2, 0.6, 1.0, 1.5])[:, None, None, None]
    )
    gsm = GradSampleModule(ae)
    torch.manual_seed(5)
    autoencoder_loss(gsm, images, 1e-3).mean().backward()
    per_sample = {name: p.grad_sample.clone() for name, p in ae.named_parameters()}
    gsm._close()
    for p in ae.parameters():
        p.grad, p.grad_sample = None, None
    norms, reference, clip = _clip_and_sum_reference(per_sample, n)
    assert all(g.abs().max() > 0 for g in reference.values())
    wrapped = BookKeepingModule(ae)
    torch.manual_seed(5)
    autoencoder_loss(wrapped, images, 1e-3).mean().backward()
    _close(wrapped.clipped_grad_sum(clip), norms, "per-sample norms")
    floor = 1e-3 * max(float(g.abs().max()) for g in reference.values())
    for name, p in ae.named_parameters():
        _close(p.grad, reference[name], f"{name} clipped sum", floor=floor)


class _SampledAE(nn.Module):
    """The autoencoder's training forward (encode, sample z = mu + sigma * eps, decode) with eps an input, so that
    torch.func can give the per-sample gradients of the very loss the sites train with."""

    def __init__(self, ae: nn.Module):
        super().__init__()
        self.ae = ae

    def forward(self, x, eps):
        h = self.ae.encoder(x)
        mu = self.ae.quant_conv_mu(h)
        sigma = torch.exp(torch.clamp(self.ae.quant_conv_log_sigma(h), -30.0, 20.0) / 2)
        return self.ae.decode(mu + sigma * eps), mu, sigma


def test_bookkeeping_3d_autoencoder_clipped_sum_matches_per_sample_reference():
    """Every layer of the 3-D autoencoder (Conv3d at every scale, GroupNorm on volumes, the upsampling convs)
    against torch.func per-sample gradients, clipped and summed (16^3 volumes: same layers as tiny3d's 32^3)."""
    from common.model import build_autoencoder

    cfg = model_config("tiny3d", image_size=16)
    torch.manual_seed(0)
    model = _SampledAE(build_autoencoder(cfg)).double().train()  # float64: no rounding to hide in
    n = 4
    g = torch.Generator().manual_seed(2)
    x = torch.rand((n,) + cfg.image_shape, generator=g, dtype=torch.float64)
    x = x * torch.tensor([0.2, 0.6, 1.0, 1.5], dtype=torch.float64).view(n, 1, 1, 1, 1)
    eps = torch.randn((n,) + cfg.latent_shape, generator=g, dtype=torch.float64)

    def per_sample_loss(m, xi, ei):
        recon, mu, sigma = m(xi, ei)
        dims = tuple(range(1, xi.ndim))
        kl = 0.5 * (mu.pow(2) + sigma.pow(2) - torch.log(sigma.pow(2) + 1e-8) - 1).sum(dims)
        return (recon - xi).pow(2).mean(dims) + 1e-3 * kl

    _check_bookkeeping(model, per_sample_loss, (x, eps), rtol=1e-9)


def test_bookkeeping_refuses_3d_layers_it_cannot_clip_by_name():
    """A 3-D layer without an exact book-keeping rule (a transposed convolution, BatchNorm3d) is refused, naming
    the module, so a site never trains it with wrong clipping."""
    model = nn.Sequential()
    model.add_module("conv", nn.Conv3d(1, 2, 3))
    model.add_module("up", nn.ConvTranspose3d(2, 2, 2, stride=2))
    model.add_module("norm", nn.BatchNorm3d(2))
    with pytest.raises(ValueError, match=r"up \(ConvTranspose3d\), norm \(BatchNorm3d\)"):
        BookKeepingModule(model)
