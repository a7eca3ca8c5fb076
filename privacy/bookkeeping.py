"""Book-keeping DP-SGD (Bu et al. 2022): exact per-sample clipping for the price of about one extra backward pass.

Opacus' hooks mode lets autograd compute every weight gradient, then computes and stores every per-sample
gradient of every layer, clips them and sums them: the weight gradients are thrown away and the per-sample
gradients (32 x the model, ~360 MB for the small UNet) cost memory passes. Here, for a batch of N samples:

1. forward with the parameters detached (`requires_grad` off while the graph is recorded), so the backward
   pass computes only the gradients flowing between layers, never a weight gradient. Forward hooks keep each
   layer's input x and register a hook on its output that keeps dL/dy, the "backprop" of that layer;
2. from (x, dL/dy) of every layer, the per-sample gradient NORMS: for a Linear or Conv2d layer with T
   positions per sample (tokens, output pixels), either the "ghost norm" ||dy_i^T x_i||^2 = <x_i x_i^T,
   dy_i dy_i^T> (Gram matrices of size T x T, cheap when T is small: attention at 4x4, time embeddings) or the
   per-sample gradient itself, computed and reduced to its norm (cheap when T is large: 16x16 feature maps);
   whichever takes fewer multiply-adds. GroupNorm and Embedding per-sample gradients are tiny and computed;
3. the clip factor of each sample from its norm over ALL parameters (flat clipping, Opacus' formula);
4. each parameter's clipped gradient sum in one pass: where step 2 computed the per-sample gradients g_i
   (biases, GroupNorm, convolutions on large maps) the product sum_i c_i g_i; elsewhere the non-private
   weight-gradient computation with dL/dy_i scaled by sample i's clip factor: sum_i c_i dy_i^T x_i.

Measured on the small UNet (docs/PERFORMANCE.md, bench/bench_dp.py, batch 32, 1 and 2 threads): 0.66-0.67x the
non-private throughput where Opacus' hooks and ghost modes reach 0.33-0.38x, with 1.14-1.16x the non-private peak
memory instead of 1.64x for hooks.

Noise, its generator, the division by the expected batch size and skipped steps stay Opacus'
(`DPOptimizerFastGradientClipping`, which adds noise to `p.grad` as given); only the clipped sum is ours.
The per-sample gradient is the gradient of sample i's own loss: the training loss must be the MEAN of the
per-sample losses over the batch (Opacus' loss_reduction="mean"), and samples must not interact (no
BatchNorm: `privacy.dp.check_model`). tests/privacy/test_grad_samplers.py checks every layer path and the
tiny and small UNets against clipped torch.func per-sample gradients; tests/privacy/test_dp.py a whole step
(noise included) against Opacus' hooks mode, the noise, empty batches and the refused preconditions.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from opacus.optimizers import DPOptimizerFastGradientClipping
from torch import nn

from privacy.grad_samplers import conv2d_grad_sample

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
SUPPORTED = (nn.Linear, *_CONV, nn.GroupNorm, nn.Embedding)


@dataclass
class _Record:
    """One layer's call in the current step: its input and, after backward, dL/d(output)."""

    x: torch.Tensor
    dy: torch.Tensor | None = None


class BookKeepingModule(nn.Module):
    """Wraps a model so that a forward + backward pass records, per layer, what the clipped gradient needs.

    One forward and one backward pass per optimizer step (no gradient accumulation); a new forward starts a new
    step. `clipped_grad_sum` turns the records into `p.grad` = sum over samples of the clipped gradients.
    """

    def __init__(self, module: nn.Module):
        super().__init__()
        self._module = (
            module  # the name Opacus' GradSampleModule uses: callers unwrap with `._module`
        )
        self._records: dict[nn.Module, _Record] = {}
        self._recording = False  # only calls through this wrapper's forward are recorded
        self._layers: list[nn.Module] = []
        self._hooks = []
        owner: dict[int, str] = {}
        unsupported = []
        for name, layer in module.named_modules():
            own = [p for p in layer.parameters(recurse=False) if p.requires_grad]
            if not own:
                continue
            if (
                type(layer) not in SUPPORTED
            ):  # exact types: a subclass may compute something else in forward
                unsupported.append(f"{name} ({type(layer).__name__})")
                continue
            for p in own:
                if (
                    id(p) in owner
                ):  # a shared parameter's per-sample gradient spans two layers: not handled
                    unsupported.append(f"{name} shares a parameter with {owner[id(p)]}")
                owner[id(p)] = name
            self._layers.append(layer)
            self._hooks.append(layer.register_forward_hook(self._capture))
        if unsupported:
            raise ValueError(
                "book-keeping clipping supports trainable Linear, Conv1d/2d/3d, GroupNorm and "
                "Embedding layers only; use grad_sample_mode='hooks' for: " + ", ".join(unsupported)
            )

    @contextlib.contextmanager
    def _detached_parameters(self) -> Iterator[None]:
        """Record the graph without parameter edges: backward then skips every weight gradient (step 1)."""
        params = [p for p in self._module.parameters() if p.requires_grad]
        for p in params:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in params:
                p.requires_grad_(True)

    def forward(self, *args, **kwargs):
        self._records.clear()
        if not (self.training and torch.is_grad_enabled()):  # evaluation: an ordinary forward pass
            return self._module(*args, **kwargs)
        self._recording = True
        try:
            with self._detached_parameters():
                return self._module(*args, **kwargs)
        finally:
            self._recording = False

    def close(self) -> nn.Module:
        """Remove the hooks; returns the wrapped model, as it was."""
        for h in self._hooks:
            h.remove()
        self._hooks, self._records = [], {}
        return self._module

    def _capture(self, layer: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if not (self._recording and layer.training):
            return
        if layer in self._records:  # the per-sample gradient would be a sum over calls; not handled
            raise RuntimeError(
                f"{type(layer).__name__} called twice in one forward pass; book-keeping clipping "
                "needs one call per layer (use grad_sample_mode='hooks')"
            )
        record = _Record(inputs[0].detach())
        self._records[layer] = record
        if (
            not output.requires_grad
        ):  # nothing upstream needs a gradient (first conv, embeddings): start here
            output.requires_grad_(True)
        ref = weakref.ref(record)  # the graph must not keep records alive past the step
        output.register_hook(lambda g: _store(ref, g))

    @torch.no_grad()
    def clipped_grad_sum(self, max_grad_norm: float) -> torch.Tensor:
        """Set `p.grad` to the sum over the batch of per-sample gradients clipped to `max_grad_norm` (flat).

        Returns the per-sample gradient norms before clipping. An empty batch (or no forward pass since the
        last step) gives zero gradients: the optimizer then releases noise only, as DP-SGD requires.
        """
        records, self._records = list(self._records.items()), {}
        params = [
            p for layer in self._layers for p in layer.parameters(recurse=False) if p.requires_grad
        ]
        n = records[0][1].x.shape[0] if records else 0
        if n > 0 and all(r.dy is None for _, r in records):
            raise RuntimeError("optimizer step after a forward pass without backward()")
        live = [
            (layer, r) for layer, r in records if r.dy is not None and n > 0
        ]  # dy None: loss not reached
        dtype = params[0].dtype if params else torch.float32
        sq_norms = torch.zeros(n, dtype=dtype, device=params[0].device if params else None)
        materialised: list[dict[nn.Parameter, torch.Tensor]] = []
        for layer, r in live:
            if r.x.shape[0] != n:
                raise RuntimeError(
                    f"{type(layer).__name__} saw {r.x.shape[0]} samples, the first layer {n}"
                )
            sq, per_sample = _NORMS[type(layer)](layer, r.x, r.dy)
            sq_norms += sq
            materialised.append(per_sample)
        # The loss is the batch MEAN of per-sample losses, so dL/dy = (dl_i/dy_i) / n: the per-sample gradients
        # are n x what the records give. Then Opacus' clip factor (DPOptimizer.clip_and_accumulate).
        norms = sq_norms.sqrt() * n
        weights = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0) * n
        for p in params:
            p.grad = None
        for (layer, r), per_sample in zip(live, materialised, strict=False):
            for (
                p,
                g,
            ) in per_sample.items():  # computed for the norm already: sum_i w_i g_i is one GEMV
                p.grad = (weights.to(g.dtype) @ g.reshape(n, -1)).view_as(p)
            _WEIGHTED_SUM[type(layer)](layer, r.x, r.dy, weights.to(r.dy.dtype), skip=per_sample)
        for (
            p
        ) in params:  # layers the loss did not reach this step (or an empty batch): zero gradient
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        return norms


def _store(ref: weakref.ref[_Record], grad: torch.Tensor) -> None:
    record = ref()
    if record is not None:
        record.dy = grad if record.dy is None else record.dy + grad


def _trains(p: nn.Parameter | None) -> bool:
    return p is not None and p.requires_grad


def _sq_norms(per_sample: torch.Tensor) -> torch.Tensor:
    """Squared norm of each sample's gradient. vector_norm: one pass, ~10x faster than square().sum() or a
    batched dot product on 32 x 110k floats here."""
    return torch.linalg.vector_norm(per_sample.reshape(len(per_sample), -1), dim=1).square()


# Per layer type, two functions of the layer, its input x and dy = dL/d(output) (batch first):
#   _NORMS:        (squared per-sample gradient norms over the layer's trainable parameters, shape (N,),
#                   {param: (N, ...) per-sample gradients} for the parameters whose gradients it computed);
#   _WEIGHTED_SUM: sets p.grad = sum_i w_i * (per-sample gradient of p) for the parameters not in `skip`.


# ---------------------------------------------------------------------------------------------- Linear
def _linear_norms(layer: nn.Linear, x: torch.Tensor, dy: torch.Tensor):
    n = x.shape[0]
    x, dy = (
        x.reshape(n, -1, x.shape[-1]),
        dy.reshape(n, -1, dy.shape[-1]),
    )  # (N, T, in), (N, T, out)
    t, d_in, d_out = x.shape[1], x.shape[2], dy.shape[2]
    sq, per_sample = dy.new_zeros(n), {}
    if _trains(layer.bias):
        per_sample[layer.bias] = gb = dy.sum(1)
        sq += _sq_norms(gb)
    if not layer.weight.requires_grad:
        pass  # a frozen weight (the bias alone trains)
    elif t == 1:  # outer product: ||dy x^T||^2 = ||dy||^2 ||x||^2
        sq += dy.square().sum((1, 2)) * x.square().sum((1, 2))
    elif (
        t * (d_in + d_out) <= d_in * d_out
    ):  # ghost norm: T x T Gram matrices are smaller than the gradient
        sq += (torch.bmm(x, x.transpose(1, 2)) * torch.bmm(dy, dy.transpose(1, 2))).sum((1, 2))
    else:
        per_sample[layer.weight] = gw = torch.bmm(dy.transpose(1, 2), x)
        sq += _sq_norms(gw)
    return sq, per_sample


def _linear_weighted_sum(
    layer: nn.Linear, x: torch.Tensor, dy: torch.Tensor, w: torch.Tensor, skip
) -> None:
    """The weight's non-private gradient with sample i's dy scaled by w_i (the bias is always in `skip`)."""
    if _trains(layer.weight) and layer.weight not in skip:
        dyw = (dy.reshape(dy.shape[0], -1, dy.shape[-1]) * w[:, None, None]).reshape(
            -1, dy.shape[-1]
        )
        layer.weight.grad = dyw.t() @ x.reshape(-1, x.shape[-1])


# ---------------------------------------------------------------------------------------------- Conv
def _conv_input(layer: nn.modules.conv._ConvNd, x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """The layer's input with any padding the convolution itself does not apply, and the padding it applies."""
    d = len(layer.kernel_size)
    if (
        layer.padding_mode != "zeros"
    ):  # reflect / replicate / circular: pad exactly as the layer's forward does
        return F.pad(x, layer._reversed_padding_repeated_twice, mode=layer.padding_mode), [0] * d
    if layer.padding == "valid":
        return x, [0] * d
    if layer.padding == "same":
        lo = [dil * (k - 1) // 2 for dil, k in zip(layer.dilation, layer.kernel_size, strict=False)]
        hi = [
            dil * (k - 1) - low
            for dil, k, low in zip(layer.dilation, layer.kernel_size, lo, strict=False)
        ]
        if lo == hi:
            return x, lo
        pads = [
            v for low, h in zip(reversed(lo), reversed(hi), strict=False) for v in (low, h)
        ]  # F.pad: last dim first
        return F.pad(x, pads), [0] * d
    return x, list(layer.padding)


def _conv_norms(layer: nn.modules.conv._ConvNd, x: torch.Tensor, dy: torch.Tensor):
    n = x.shape[0]
    dy_flat = dy.reshape(n, layer.out_channels, -1)  # (N, O, L)
    sq, per_sample = dy.new_zeros(n), {}
    if _trains(layer.bias):
        per_sample[layer.bias] = gb = dy_flat.sum(2)
        sq += _sq_norms(gb)
    if not layer.weight.requires_grad:
        return sq, per_sample
    length = dy_flat.shape[2]
    d = layer.weight[0].numel()  # inputs per output: C/groups * prod(kernel)
    if (
        isinstance(layer, nn.Conv2d)
        and layer.groups == 1
        and length * (d + layer.out_channels) < d * layer.out_channels
    ):
        xp, pad = _conv_input(
            layer, x
        )  # ghost norm over the L x L Gram matrices of the im2col columns
        cols = F.unfold(
            xp, layer.kernel_size, dilation=layer.dilation, padding=pad, stride=layer.stride
        )
        gram_x = torch.bmm(cols.transpose(1, 2), cols)
        gram_dy = torch.bmm(dy_flat.transpose(1, 2), dy_flat)
        return sq + (gram_x * gram_dy).sum((1, 2)), per_sample
    if isinstance(
        layer, nn.Conv2d
    ):  # the exact per-sample samplers of privacy.grad_samplers (tested vs Opacus)
        gw = conv2d_grad_sample(layer, [x], dy)[layer.weight]
    else:  # Conv1d / Conv3d: batch folded into the groups, one weight-gradient convolution for all samples
        xp, pad = _conv_input(layer, x)
        g = layer.groups
        shape_only = x.new_zeros(()).expand(
            (n * layer.out_channels,) + tuple(layer.weight.shape[1:])
        )
        _, gw, _ = torch.ops.aten.convolution_backward(
            dy.reshape((1, -1) + tuple(dy.shape[2:])),
            xp.reshape((1, -1) + tuple(xp.shape[2:])),
            shape_only,
            None,
            list(layer.stride),
            pad,
            list(layer.dilation),
            False,
            [0] * len(pad),
            n * g,
            [False, True, False],
        )
    per_sample[layer.weight] = gw = gw.reshape(n, -1)
    return sq + _sq_norms(gw), per_sample


def _conv_weighted_sum(
    layer: nn.modules.conv._ConvNd, x: torch.Tensor, dy: torch.Tensor, w: torch.Tensor, skip
) -> None:
    """The weight's non-private gradient with sample i's dy scaled by w_i (the bias is always in `skip`)."""
    if _trains(layer.weight) and layer.weight not in skip:
        dyw = dy * w.view((-1,) + (1,) * (dy.dim() - 1))
        xp, pad = _conv_input(layer, x)
        _, layer.weight.grad, _ = torch.ops.aten.convolution_backward(
            dyw,
            xp,
            layer.weight.detach(),
            None,
            list(layer.stride),
            pad,
            list(layer.dilation),
            False,
            [0] * len(pad),
            layer.groups,
            [False, True, False],
        )


# ---------------------------------------------------------------------------------------------- GroupNorm
def _groupnorm_norms(layer: nn.GroupNorm, x: torch.Tensor, dy: torch.Tensor):
    """Per-sample gradients (N, C) of weight and bias: sums over positions of dy * x_hat and of dy."""
    n, c = x.shape[:2]
    sq, per_sample = dy.new_zeros(n), {}
    if _trains(layer.weight):
        x_hat = F.group_norm(x, layer.num_groups, eps=layer.eps)
        per_sample[layer.weight] = gw = (dy * x_hat).reshape(n, c, -1).sum(2)
        sq += _sq_norms(gw)
    if _trains(layer.bias):
        per_sample[layer.bias] = gb = dy.reshape(n, c, -1).sum(2)
        sq += _sq_norms(gb)
    return sq, per_sample


def _nothing_left(
    layer: nn.Module, x: torch.Tensor, dy: torch.Tensor, w: torch.Tensor, skip
) -> None:
    """For layers whose per-sample gradients are all computed by their _NORMS function."""


# ---------------------------------------------------------------------------------------------- Embedding
def _embedding_dy(
    layer: nn.Embedding, idx: torch.Tensor, dy: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    n = idx.shape[0]
    idx, dy = idx.reshape(n, -1), dy.reshape(n, -1, layer.embedding_dim)
    if layer.padding_idx is not None:  # the padding row receives no gradient
        dy = dy * (idx != layer.padding_idx).unsqueeze(-1)
    return idx, dy


def _embedding_norms(layer: nn.Embedding, idx: torch.Tensor, dy: torch.Tensor):
    """Ghost norm: sample i's gradient adds dy_t into row idx_t, so ||g_i||^2 = sum over t, s with idx_t = idx_s
    of <dy_t, dy_s>."""
    if not layer.weight.requires_grad:
        return dy.new_zeros(idx.shape[0]), {}
    idx, dy = _embedding_dy(layer, idx, dy)
    same_row = (idx.unsqueeze(2) == idx.unsqueeze(1)).to(dy.dtype)
    return (same_row * torch.bmm(dy, dy.transpose(1, 2))).sum((1, 2)), {}


def _embedding_weighted_sum(
    layer: nn.Embedding, idx: torch.Tensor, dy: torch.Tensor, w: torch.Tensor, skip
) -> None:
    if not layer.weight.requires_grad:
        return
    idx, dy = _embedding_dy(layer, idx, dy)
    rows = (dy * w[:, None, None]).reshape(-1, layer.embedding_dim)
    layer.weight.grad = dy.new_zeros(layer.weight.shape).index_add_(0, idx.reshape(-1), rows)


_NORMS: dict[type, Callable[..., tuple[torch.Tensor, dict[nn.Parameter, torch.Tensor]]]] = {
    nn.Linear: _linear_norms,
    nn.Conv1d: _conv_norms,
    nn.Conv2d: _conv_norms,
    nn.Conv3d: _conv_norms,
    nn.GroupNorm: _groupnorm_norms,
    nn.Embedding: _embedding_norms,
}
_WEIGHTED_SUM: dict[type, Callable[..., None]] = {
    nn.Linear: _linear_weighted_sum,
    nn.Conv1d: _conv_weighted_sum,
    nn.Conv2d: _conv_weighted_sum,
    nn.Conv3d: _conv_weighted_sum,
    nn.GroupNorm: _nothing_left,
    nn.Embedding: _embedding_weighted_sum,
}


class BookKeepingDPOptimizer(DPOptimizerFastGradientClipping):
    """Opacus' optimizer for fast gradient clipping (noise on `p.grad`, divide by the expected batch size, step
    hooks, skipped steps), fed the clipped gradient sum of a `BookKeepingModule` at each step."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, module: BookKeepingModule, **kwargs):
        super().__init__(optimizer, **kwargs)
        self._bk_module = module

    def pre_step(self, closure=None):
        self._bk_module.clipped_grad_sum(self.max_grad_norm)
        return super().pre_step(closure)

    def accumulate(self):
        """Opacus deep-copies `p.grad` into `p.summed_grad`; ours is a fresh tensor nobody else holds, so it
        is adopted as is (saves a copy of the model's size and its page faults every step)."""
        for p in self.params:
            if (
                p.summed_grad is not None
            ):  # the previous step was skipped: keep adding, as Opacus does
                p.summed_grad.add_(p.grad.data)
            else:
                p.summed_grad = p.grad.data
