"""DP-SGD with Opacus, refusing to run when a precondition of the guarantee does not hold.

The guarantee the ledger accounts for assumes: every layer's per-sample gradient is well defined (no BatchNorm
mixing the samples of a batch, no running statistics learnt from private data), the model is in train mode, and
records (one per patient) are drawn with Poisson sampling at the rate the accountant is told. `make_private`
checks each and says which one failed. Opacus' engine keeps its own accountant, but it is not the source of
truth: it forgets across rounds. The site's ledger (privacy/ledger.py) is.

Randomness. The server is the adversary: if it could predict the Gaussian noise it could subtract it. So the noise
and the Poisson sampling draw from generators seeded with 64 bits of the site's OS entropy (`secrets`, i.e.
/dev/urandom), fresh for every `make_private` call (one per round), never from torch's global RNG (which a seed from
the server may fix) nor from anything in a message. The generators are torch's (Mersenne Twister on CPU, Philox on
CUDA) seeded from a CSPRNG, not a CSPRNG stream: the server sees no raw draw, only clipped, noised, Adam-processed
updates, and cannot search 2^64 seeds.
How this relates to Opacus' `secure_mode=True`, which does two things: (1) noise and sampling from torchcsprng's
/dev/urandom generator: torchcsprng has no build for current torch (last release 0.2.1, 2021, for torch 1.8; pip
finds none for this Python), so `PrivacyEngine(secure_mode=True)` fails to import; the entropy-seeded generators
stand in for it. (2) Each noise tensor as the mean of four Gaussians, against floating-point attacks that read the
low-order bits of a released noisy value (Holohan et al., arXiv:2107.10138). Not used: a site never releases a
noisy gradient, only weights after Adam steps (each divides the noisy gradient by a running estimate of its own
magnitude and adds it to float32 weights), so those bits do not reach the server; and it costs 3.3x the noise
time, measured 0.049 -> 0.162 s per step for the `small` UNet on one CPU thread, against a 0.31 s bookkeeping
step (bench/bench_noise.py, docs/PERFORMANCE.md). `SECURE_NOISE` switches it on for every mode.
"""

from __future__ import annotations

import secrets
import warnings

import torch
from opacus import PrivacyEngine
from opacus.data_loader import DPDataLoader
from opacus.utils.module_utils import trainable_modules
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from opacus.validators import ModuleValidator
from torch.utils.data import DataLoader

from privacy.bookkeeping import BookKeepingDPOptimizer, BookKeepingModule

# "bookkeeping" (privacy/bookkeeping.py): exact per-sample clipping at ~1.8x the throughput of Opacus' hooks or
# ghost modes on the diffusion UNet (docs/PERFORMANCE.md); "hooks" and "ghost": Opacus' own, for comparison and
# for layer types bookkeeping does not handle (it refuses them by name).
GRAD_SAMPLE_MODES = ("bookkeeping", "hooks", "ghost")
# Opacus' four-Gaussian noise against floating-point attacks (module docstring: why it is off).
SECURE_NOISE = False

# Normalisation layers leak across samples (batch statistics) or through running statistics even when frozen.
_ALWAYS_CHECKED = (
    torch.nn.modules.batchnorm._BatchNorm,
    torch.nn.modules.instancenorm._InstanceNorm,
)


class PrivacyPreconditionError(Exception):
    """Training would not have the DP guarantee we would claim; the message says why."""


def check_model(model: torch.nn.Module) -> None:
    """Refuse layers without a per-sample gradient (BatchNorm, InstanceNorm with running stats, ...) and eval mode.

    Uses Opacus' registered module validators, run per named module so the message says which module failed.
    """
    trainable = {id(m) for _, m in trainable_modules(model)}
    problems = []
    for name, module in model.named_modules():
        validator = ModuleValidator.VALIDATORS.get(type(module))
        if validator is None or not (
            id(module) in trainable or isinstance(module, _ALWAYS_CHECKED)
        ):
            continue
        for err in validator(module):
            problems.append(f"{name or '<root>'} ({type(module).__name__}): {err}")
    if problems:
        raise PrivacyPreconditionError(
            "the model has layers incompatible with per-sample DP-SGD (replace them, e.g. BatchNorm -> GroupNorm "
            "with opacus ModuleValidator.fix):\n  " + "\n  ".join(problems)
        )
    if not model.training:
        raise PrivacyPreconditionError(
            "the model is in eval mode; DP-SGD needs train mode (call model.train())"
        )


def check_loader(loader: DataLoader) -> None:
    """Refuse a loader that does not draw records by Poisson sampling (what the accountant assumes)."""
    sampler = getattr(loader, "batch_sampler", None)
    if not isinstance(loader, DPDataLoader) and not isinstance(
        sampler, UniformWithReplacementSampler
    ):
        raise PrivacyPreconditionError(
            f"the data loader ({type(loader).__name__} with {type(sampler).__name__}) does not use Poisson "
            "sampling (Opacus DPDataLoader / UniformWithReplacementSampler); the accountant's sampling rate "
            "would not describe how records were drawn"
        )


def sample_rate_of(loader: DataLoader) -> float:
    """The Poisson sampling rate a private loader draws each record with: what the ledger must record."""
    check_loader(loader)
    sampler = loader.batch_sampler
    return float(getattr(loader, "sample_rate", None) or sampler.sample_rate)


def make_private(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    grad_sample_mode: str = "bookkeeping",
    test_seed: int | None = None,
) -> tuple[torch.nn.Module, torch.optim.Optimizer, DataLoader]:
    """Opacus' make_private with Poisson sampling, after checking the preconditions.

    A loader that already draws by Poisson sampling (privacy/sampling.py `patient_loader`: patients, at the
    planned rate, for exactly the planned steps) is kept as it is; any other is wrapped by Opacus (rate
    1 / len(loader), which Opacus turns back into int(len(loader)) steps, one short for some lengths).

    grad_sample_mode: "bookkeeping" (the default, fastest here), or Opacus' "hooks" or "ghost"; all exact. The
    training loop is the same in every mode: `loss = batch_loss(optimizer, per_sample_losses); loss.backward();
    optimizer.step()`, one forward and one backward pass per step (ghost clipping's second backward pass runs
    inside `loss.backward()`, Opacus' criterion wrapper).
    The noise and the Poisson sampler draw from `entropy_generator()`s (the module docstring says why).
    `test_seed` is for tests only: it makes both reproducible, i.e. predictable to whoever knows it, which voids
    the guarantee. Production code never passes it.
    """
    if not noise_multiplier > 0 or not max_grad_norm > 0:
        raise PrivacyPreconditionError(
            f"noise_multiplier and max_grad_norm must be > 0, got {noise_multiplier} and {max_grad_norm}"
        )
    if isinstance(loader, DataLoader) and len(loader.dataset) == 0:  # type: ignore[arg-type]
        raise PrivacyPreconditionError("the data loader has no records to train on")
    if grad_sample_mode not in GRAD_SAMPLE_MODES:
        raise ValueError(
            f"grad_sample_mode must be one of {GRAD_SAMPLE_MODES}, got {grad_sample_mode!r}"
        )
    check_model(model)
    poisson_already = isinstance(
        getattr(loader, "batch_sampler", None), UniformWithReplacementSampler
    )
    with (
        warnings.catch_warnings()
    ):  # "Secure RNG turned off": our generators are seeded from OS entropy
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant="rdp", secure_mode=False)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    generator = _generator(device, test_seed)
    if grad_sample_mode == "bookkeeping":
        model, optimizer, loader = _make_private_bookkeeping(
            engine,
            model,
            optimizer,
            loader,
            noise_multiplier,
            max_grad_norm,
            generator,
            poisson_already,
        )
    else:
        kwargs = dict(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            poisson_sampling=not poisson_already,
            grad_sample_mode=grad_sample_mode,
            noise_generator=generator,
        )
        if grad_sample_mode == "ghost":
            model, optimizer, criterion, loader = engine.make_private(
                criterion=_MeanOfPerSampleLosses(), **kwargs
            )
            optimizer.dp_criterion = criterion  # what batch_loss reduces with
        else:
            model, optimizer, loader = engine.make_private(**kwargs)
        if (
            poisson_already
        ):  # Opacus assumed one record per sampled unit: divide by the expected patients
            optimizer.expected_batch_size = _expected_batch_size(loader)
    check_loader(loader)
    optimizer.secure_mode = SECURE_NOISE
    # Opacus builds the Poisson sampler with the loader's generator (None: torch's global RNG): replace it
    loader.batch_sampler.generator = _generator(
        torch.device("cpu"), None if test_seed is None else test_seed + 1
    )
    return model, optimizer, loader


def entropy_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator seeded with 64 bits of the OS's entropy: what a site's DP noise and sampling draw from."""
    return torch.Generator(device=device).manual_seed(secrets.randbits(64))


def _generator(device: torch.device, test_seed: int | None) -> torch.Generator:
    if test_seed is None:
        return entropy_generator(device)
    return torch.Generator(device=device).manual_seed(test_seed)


def _expected_batch_size(loader: DataLoader) -> int:
    """Expected units per Poisson batch: sampled units x rate (Opacus' int(len(dataset) x rate) when one record
    is one unit)."""
    sampler = loader.batch_sampler
    units = getattr(sampler, "num_samples", None) or len(loader.dataset)  # type: ignore[arg-type]
    return max(1, int(units * sample_rate_of(loader)))


def batch_loss(optimizer: torch.optim.Optimizer, per_sample_losses: torch.Tensor):
    """The loss to call `.backward()` on: the batch mean of the per-sample losses (what every mode's clipping
    assumes), wrapped by Opacus' criterion in ghost mode so that `.backward()` runs its two passes."""
    criterion = getattr(optimizer, "dp_criterion", None)
    return per_sample_losses.mean() if criterion is None else criterion(per_sample_losses)


class _MeanOfPerSampleLosses(torch.nn.Module):
    """Opacus' ghost clipping wraps a criterion and sets its `reduction`; ours gets per-sample losses already."""

    def __init__(self, reduction: str = "mean"):
        super().__init__()
        self.reduction = reduction

    def forward(self, per_sample: torch.Tensor) -> torch.Tensor:
        if self.reduction == "none":
            return per_sample
        return per_sample.mean() if self.reduction == "mean" else per_sample.sum()


def _make_private_bookkeeping(
    engine: PrivacyEngine,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    noise_multiplier: float,
    max_grad_norm: float,
    generator: torch.Generator | None,
    poisson_already: bool = False,
) -> tuple[torch.nn.Module, torch.optim.Optimizer, DataLoader]:
    """What PrivacyEngine.make_private does for flat clipping, mean loss reduction and Poisson sampling, with the
    model wrapped by BookKeepingModule and its DPOptimizer subclass (Opacus' noise, scaling and step hook)."""
    model_params = set(model.parameters())
    if any(p not in model_params for group in optimizer.param_groups for p in group["params"]):
        raise ValueError("Module parameters are different than optimizer Parameters")
    ModuleValidator.validate(model, strict=True)  # what Opacus' wrap_model checks
    module = BookKeepingModule(model)
    if not poisson_already:
        loader = DPDataLoader.from_data_loader(
            loader, generator=None
        )  # Poisson, as Opacus builds it
    sample_rate = sample_rate_of(loader)
    expected_batch_size = _expected_batch_size(loader)
    dp_optimizer = BookKeepingDPOptimizer(
        optimizer,
        module=module,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=expected_batch_size,
        loss_reduction="mean",
        generator=generator,
        secure_mode=SECURE_NOISE,
    )
    dp_optimizer.attach_step_hook(engine.accountant.get_optimizer_hook_fn(sample_rate=sample_rate))
    return module, dp_optimizer, loader
