"""DP-SGD with Opacus, refusing to run when a precondition of the guarantee does not hold.

The guarantee the ledger accounts for assumes: every trainable layer's per-sample gradient is well defined
(no BatchNorm mixing samples, no running statistics), the model is in train mode, and records are drawn with
Poisson sampling at the rate the accountant is told. `make_private` checks each and says which one failed.
"""

from __future__ import annotations

import torch
from opacus import PrivacyEngine
from opacus.data_loader import DPDataLoader
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from opacus.validators import ModuleValidator
from torch.utils.data import DataLoader


class PrivacyPreconditionError(Exception):
    """Training would not have the DP guarantee we would claim; the message says why."""


def check_model(model: torch.nn.Module) -> None:
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        named = {id(m): n for n, m in model.named_modules()}
        lines = []
        for err in errors:
            module = getattr(err, "module", None)
            where = named.get(id(module), "?") if module is not None else "?"
            lines.append(f"{where or '<root>'}: {err}")
        raise PrivacyPreconditionError(
            "the model has layers incompatible with per-sample DP-SGD:\n  " + "\n  ".join(lines))
    if not model.training:
        raise PrivacyPreconditionError("the model is in eval mode; DP-SGD needs train mode (call model.train())")


def check_loader(loader: DataLoader) -> None:
    sampler = getattr(loader, "batch_sampler", None)
    if not isinstance(loader, DPDataLoader) and not isinstance(sampler, UniformWithReplacementSampler):
        raise PrivacyPreconditionError(
            "the data loader does not use Poisson sampling (Opacus DPDataLoader / UniformWithReplacementSampler); "
            "the accountant's sampling rate would not describe how records were drawn")


def make_private(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    grad_sample_mode: str = "hooks",
    seed: int | None = None,
) -> tuple[torch.nn.Module, torch.optim.Optimizer, DataLoader]:
    """Opacus' make_private with Poisson sampling, after checking the preconditions.

    The engine's own accountant is not the source of truth (it forgets across rounds): the site's ledger is.
    """
    if noise_multiplier <= 0 or max_grad_norm <= 0:
        raise PrivacyPreconditionError("noise_multiplier and max_grad_norm must be > 0")
    check_model(model)
    engine = PrivacyEngine(accountant="rdp", secure_mode=False)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm, poisson_sampling=True, grad_sample_mode=grad_sample_mode,
        noise_generator=generator,
    )
    check_loader(loader)
    check_model(model)
    return model, optimizer, loader
