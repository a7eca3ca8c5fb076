"""Faster exact per-sample gradients for Opacus "hooks" mode (Conv2d and Linear), same numbers as Opacus'.

Where a hooks-mode DP-SGD step of the small diffusion UNet spent its extra time on this 2-core CPU (one thread,
CPU time per step, the non-private step being ~0.26 s): the Conv2d per-sample products (~0.14 s), Opacus
copying every per-sample gradient into a freshly zeroed (max_batch_len, ...) tensor (~0.07-0.09 s), page
faults on the ~360 MB of per-sample gradients allocated anew each step (up to ~0.1 s), clipping (~0.04 s).
The samplers here remove the second and third and shrink the first:

- Conv2d: for feature maps of >= 8x8 pixels and >= 16 channels per group, the batch is folded into the channels
  and ATen's weight-gradient of one convolution with N * groups groups gives all per-sample gradients at once
  (oneDNN; up to 2x faster than im2col + matmul there); elsewhere Opacus' im2col and a single bmm written
  straight in the weight's layout (a group's channels are contiguous blocks, so no block diagonal is extracted).
  Non-zero padding modes are applied as the layer applies them (stock Opacus ignores them).
- Linear: one bmm (an outer product for 2-D inputs) written straight into the output buffer.
- Output memory: in Opacus' hook, each parameter's (N, *shape) gradients go into a buffer kept on the parameter
  and reused by the next step (`_fast_grad_sample_buffer`), and are handed to Opacus as the parameter's
  `_current_grad_sample`, which is what its `create_or_accumulate_grad_sample` would build by zero-filling and
  copying. A buffer is only reused when the parameter holds no per-sample gradients (`grad_sample is None`:
  the optimizer consumed them and `zero_grad` dropped them), so accumulation over several backward passes
  gets fresh memory. Consequence: a reference to `p.grad_sample` kept past `zero_grad` is overwritten by the
  next backward pass; clone it to keep it. `release_grad_sample_buffers(model)` frees the buffers.

Exactness is the privacy guarantee (clipping must see the true per-sample norms): tests/privacy/
test_grad_samplers.py checks the samplers against Opacus' own and against torch.func vmap(grad), on layers and
on the tiny UNet through make_private. Nothing is registered at import: call `install_fast_grad_samplers()`
before `make_private`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from opacus.grad_sample import GradSampleModule
from opacus.grad_sample.utils import register_grad_sampler
from opacus.utils.tensor_utils import unfold2d
from torch import nn

GradSampler = Callable[
    [nn.Module, list[torch.Tensor], torch.Tensor], dict[nn.Parameter, torch.Tensor]
]
_BUFFER = "_fast_grad_sample_buffer"


def _in_opacus_hook(layer: nn.Module, param: nn.Parameter, n: int) -> bool:
    """Called from Opacus' backward hook, first contribution of this pass, full batch, nothing pending."""
    return (
        getattr(layer, "max_batch_len", None) == n
        and getattr(param, "grad_sample", None) is None
        and not hasattr(param, "_current_grad_sample")
    )


def _output(layer: nn.Module, param: nn.Parameter, n: int, like: torch.Tensor) -> torch.Tensor:
    """Contiguous (n, *param.shape) memory for `param`'s per-sample gradients: the reusable buffer if allowed."""
    shape = (n,) + tuple(param.shape)
    if not _in_opacus_hook(layer, param, n):
        return like.new_empty(shape)
    buf = getattr(param, _BUFFER, None)
    if (
        buf is None
        or buf.shape[0] < n
        or buf.shape[1:] != param.shape
        or buf.dtype != like.dtype
        or buf.device != like.device
    ):
        buf = like.new_empty((n + n // 8,) + tuple(param.shape))  # headroom for Poisson batch sizes
        setattr(param, _BUFFER, buf)
    return buf[:n]


def _hand_over(
    layer: nn.Module, grads: dict[nn.Parameter, torch.Tensor]
) -> dict[nn.Parameter, torch.Tensor]:
    """Give Opacus each first full-batch gradient directly as `_current_grad_sample`; return the rest.

    What is returned goes through Opacus' `create_or_accumulate_grad_sample` (zeros + copy, or `+=` for a
    module called twice per forward pass). The tensors made here are fresh or this parameter's own buffer,
    never views of activations or backprops, so adopting them is what that function would produce, minus
    the two passes over memory.
    """
    rest = {}
    for param, gs in grads.items():
        if _in_opacus_hook(layer, param, gs.shape[0]) and gs.is_contiguous():
            param._current_grad_sample = gs
        else:
            rest[param] = gs
    return rest


def release_grad_sample_buffers(model: nn.Module) -> int:
    """Drop the reusable per-sample gradient buffers of `model`'s parameters; returns how many were dropped."""
    dropped = 0
    for p in model.parameters():
        if hasattr(p, _BUFFER):
            delattr(p, _BUFFER)
            dropped += 1
    return dropped


def _padding(layer: nn.Conv2d, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """The layer's input and the symmetric zero padding (h, w) still to apply; any other padding is applied."""
    if (
        layer.padding_mode != "zeros"
    ):  # reflect / replicate / circular: pad exactly as Conv2d.forward does
        return F.pad(x, layer._reversed_padding_repeated_twice, mode=layer.padding_mode), (0, 0)
    if layer.padding == "valid":
        return x, (0, 0)
    if layer.padding == "same":
        pads: list[int] = []  # F.pad order: width (left, right), then height (top, bottom)
        for d, k in zip(reversed(layer.dilation), reversed(layer.kernel_size), strict=False):
            pads += [d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2]
        if pads[0] != pads[1] or pads[2] != pads[3]:  # even kernels: asymmetric
            return F.pad(x, pads), (0, 0)
        return x, (pads[2], pads[0])
    return x, (int(layer.padding[0]), int(layer.padding[1]))


def _prefer_grouped_conv(layer: nn.Conv2d, out_pixels: int) -> bool:
    """Measured per layer of the small UNet on a 2-core AMD EPYC (AVX-512), one thread: the grouped convolution
    wins (1.1-2x) on maps of >= 16x16, and on 8x8 maps unless 128x128 channels wide; im2col + bmm wins on 4x4
    maps (up to 6x), for 1x1 kernels and for layers with < 16 channels per group."""
    cin, cout = layer.in_channels // layer.groups, layer.out_channels // layer.groups
    if layer.kernel_size == (1, 1) or min(cin, cout) < 16 or out_pixels < 64:
        return False
    return out_pixels >= 256 or cin * cout < 128 * 128


def conv2d_grad_sample(
    layer: nn.Conv2d, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of a Conv2d: (N, *weight.shape) and (N, out_channels)."""
    x = activations[0].to(backprops.dtype)
    n, g = x.shape[0], layer.groups
    dy = backprops.reshape(n, layer.out_channels, -1)  # (N, O, L)
    ret: dict[nn.Parameter, torch.Tensor] = {}
    if layer.weight.requires_grad:
        if n == 0:
            ret[layer.weight] = backprops.new_zeros((0,) + tuple(layer.weight.shape))
        elif _prefer_grouped_conv(layer, dy.shape[-1]):
            x, pad = _padding(layer, x)
            weight = x.new_zeros(()).expand(
                (n * layer.out_channels,) + tuple(layer.weight.shape[1:])
            )  # shape only
            _, gw, _ = torch.ops.aten.convolution_backward(
                backprops.reshape((1, -1) + tuple(backprops.shape[-2:])),
                x.reshape((1, -1) + tuple(x.shape[-2:])),
                weight,
                None,
                list(layer.stride),
                list(pad),
                list(layer.dilation),
                False,
                [0, 0],
                n * g,
                [False, True, False],
            )
            gw = gw.view((n,) + tuple(layer.weight.shape))
            if _in_opacus_hook(
                layer, layer.weight, n
            ):  # into the reused buffer: a copy costs less than the
                gw = _output(layer, layer.weight, n, dy).copy_(
                    gw
                )  # page faults of fresh memory every step
            ret[layer.weight] = gw
        else:
            x, pad = _padding(layer, x)
            if layer.kernel_size == (1, 1) and layer.stride == (1, 1) and pad == (0, 0):
                cols = x.reshape(n, x.shape[1], -1)  # 1x1 kernels need no im2col
            else:
                cols = unfold2d(
                    x,
                    kernel_size=layer.kernel_size,
                    padding=pad,
                    stride=layer.stride,
                    dilation=layer.dilation,
                )  # (N, C*kh*kw, L), channel-major like the weight
            out = _output(layer, layer.weight, n, dy)
            length = dy.shape[-1]
            # group j's outputs and inputs are contiguous blocks of rows: (batch, group) is the bmm batch
            torch.bmm(
                dy.reshape(n * g, -1, length),
                cols.reshape(n * g, -1, length).transpose(1, 2),
                out=out.view(n * g, layer.out_channels // g, -1),
            )
            ret[layer.weight] = out
    if layer.bias is not None and layer.bias.requires_grad:
        ret[layer.bias] = torch.sum(dy, dim=2, out=_output(layer, layer.bias, n, dy))
    return _hand_over(layer, ret)


def linear_grad_sample(
    layer: nn.Linear, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of a Linear layer on inputs (N, ..., in): (N, out, in) and (N, out)."""
    x = activations[0].to(backprops.dtype)
    n = x.shape[0]
    dy = backprops.reshape(n, -1, backprops.shape[-1])  # (N, T, out)
    ret: dict[nn.Parameter, torch.Tensor] = {}
    if layer.weight.requires_grad:
        out = _output(layer, layer.weight, n, dy)
        if dy.shape[1] == 1:  # one token per sample: an outer product
            torch.mul(dy.transpose(1, 2), x.reshape(n, 1, -1), out=out)
        else:
            torch.bmm(dy.transpose(1, 2), x.reshape(n, -1, x.shape[-1]), out=out)
        ret[layer.weight] = out
    if layer.bias is not None and layer.bias.requires_grad:
        ret[layer.bias] = torch.sum(dy, dim=1, out=_output(layer, layer.bias, n, dy))
    return _hand_over(layer, ret)


FAST_GRAD_SAMPLERS: dict[type[nn.Module], GradSampler] = {
    nn.Conv2d: conv2d_grad_sample,
    nn.Linear: linear_grad_sample,
}


def install_fast_grad_samplers() -> dict[type[nn.Module], GradSampler | None]:
    """Register the samplers above with Opacus (its hooks and fast-gradient-clipping registries); idempotent.

    Affects every GradSampleModule built afterwards in this process. Returns what was registered before, for
    `restore_grad_samplers`.
    """
    previous = {cls: GradSampleModule.GRAD_SAMPLERS.get(cls) for cls in FAST_GRAD_SAMPLERS}
    for cls, fn in FAST_GRAD_SAMPLERS.items():
        register_grad_sampler(cls)(fn)
    return previous


def restore_grad_samplers(previous: dict[type[nn.Module], GradSampler | None]) -> None:
    """Put back the samplers `install_fast_grad_samplers` returned (None: remove the entry)."""
    for cls, fn in previous.items():
        if fn is None:
            GradSampleModule.GRAD_SAMPLERS.pop(cls, None)
        else:
            register_grad_sampler(cls)(fn)


def fast_grad_samplers_installed() -> bool:
    return all(
        GradSampleModule.GRAD_SAMPLERS.get(cls) is fn for cls, fn in FAST_GRAD_SAMPLERS.items()
    )
