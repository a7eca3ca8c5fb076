"""Canaries for the one-run audit (privacy/one_run.py): gradient-space (Dirac) canaries in the diffusion UNet.

A site makes m canaries. Canary i is a fixed per-sample gradient: the clipping norm C times a sign s_i on ONE
coordinate k_i of the UNet's parameters (a Dirac gradient, Nasr et al. 2023; the white-box canary of Steinke, Nasr
& Jagielski 2023). Coordinates and signs are drawn from the site's secret seed among the parameters trained under
every `dp-trainable` choice (the attention and conditioning set, common/model.py), distinct for distinct canaries.
Each canary is included in the site's diffusion training with probability 1/2, drawn ONCE from the site's OS
entropy (`secrets`) and kept in the site's state (`<state>/canaries.json`, written and read only here); nothing the
server sends touches the seed or the inclusion.

An included canary is one more sampling unit of DP-SGD: at every step it is in the batch with the patients'
sampling rate q (its own generator, seeded from OS entropy), and when it is, its gradient C s_i e_k_i joins the sum
of the patients' clipped gradients, divided by the same expected batch size (`attach`). It has norm C, so clipping
leaves it as it is; it is added after the Gaussian noise, which is the same mechanism (the noise is additive and
independent of what it is added to). So every canary is protected exactly like a patient (same C, sigma, q and
steps), and no patient's mechanism depends on the canaries: the DP plan is made from the patient count alone, and
the canaries only add an independent term to the released update.

After training, the site scores each canary by how far its coordinate moved against its sign between the run's
starting UNet (client/reference.py, kept by the site when the run began) and the audited one:
score_i = -s_i (theta_audited[k_i] - theta_start[k_i]). `audit_canaries` turns the scores and the secret inclusion
into Steinke et al.'s epsilon lower bound, with its power (the bound a perfect attack would reach with this m).
Scoring reads m numbers of two state dicts: no forward pass. Training adds a sparse addition of at most m values
per step (measured in docs/PERFORMANCE.md).

What this audits: the mechanism that releases the site's update (clipping norm, noise, sampling rate, steps, the
accountant's epsilon, Adam and the federation after it). What it does not: the per-sample gradient computation of
real records (a canary's gradient is given, not computed); the membership attacks on the site's own patients
(client/audit.py) look at that path.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common.config import SiteConfig
from common.io import write_json_atomic
from common.model import trainable_names
from privacy import one_run
from privacy.dp import entropy_generator
from privacy.power import canary_power, is_underpowered, range_of_interest

STATE_FILE = "canaries.json"
FORMAT_VERSION = 2
# Canaries live on parameters trained under every dp-trainable choice (common/config.py DP_TRAINABLE).
CANARY_PARAMETERS = "attention-conditioning"
# The auto default's ceiling. A canary costs one sparse addition per step and one subtraction at the audit, so the
# count is set by the power it buys (privacy/power.py), not by training time.
MAX_CANARIES = 4000
# Coordinates per canary: its gradient is C / sqrt(DIMENSIONS) on each (norm C). Under DP-SGD this changes nothing
# (the noise is isotropic: a canary's signal-to-noise ratio is C / (sigma C) whatever its direction); under Adam,
# which moves every coordinate by about the learning rate whatever its gradient's size, the score averages the
# coordinates' unrelated movement away (measured on the positive control: docs/AUDIT.md).
DIMENSIONS = 8
ATTACK = (
    "white-box gradient (Dirac) canaries: how far each canary's coordinates moved against its signs between the "
    "run's starting UNet and the audited one (higher = included)"
)


@dataclass(frozen=True)
class CanaryState:
    """The site's canary set: how many, the seed of their coordinates and signs, and which were included
    (secret, site-only)."""

    n: int
    seed: int
    included: tuple[bool, ...]
    format_version: int = FORMAT_VERSION

    @property
    def n_included(self) -> int:
        return sum(self.included)


@dataclass(frozen=True)
class Coordinates:
    """Where the canaries live: canary i is `signs[i, j] / sqrt(DIMENSIONS)` on element `index[i, j]` of parameter
    `names[i][j]`, for j < DIMENSIONS (shapes (m, DIMENSIONS))."""

    names: tuple[tuple[str, ...], ...]
    index: np.ndarray
    signs: np.ndarray


def state_path(site: SiteConfig) -> Path:
    return site.state_path / STATE_FILE


def auto_count(site: SiteConfig, n_patients: int, delta: float) -> int:
    """The default number of canaries: the fewest whose perfect attack certifies the claim's range of interest
    (half the claimed epsilon, privacy/power.py), at most MAX_CANARIES (a large delta caps the power whatever m:
    then MAX_CANARIES, and the audit says it is underpowered). None without DP: no claim to audit."""
    del (
        n_patients
    )  # canaries cost no patient anything and almost no time: their number does not depend on it
    if not site.dp:
        return 0
    try:
        return one_run.canaries_for_power(
            range_of_interest(site.epsilon),
            delta,
            n_tests=len(one_run.DEFAULT_GUESS_FRACTIONS),
            limit=MAX_CANARIES,
        )
    except ValueError:  # unreachable: as many as allowed (underpowered, and said)
        return MAX_CANARIES


def load_or_create(site: SiteConfig, n_patients: int, delta: float) -> CanaryState:
    """The site's canaries: read from its state, or drawn now (seed and inclusion from OS entropy) and saved
    atomically.

    `site.canaries`: -1 = auto (`auto_count`), 0 = no canaries, m > 0 = exactly m. A saved set is kept for the
    site's lifetime (models trained on it must be audited against the same inclusion); asking for a different m
    afterwards is refused with what to do."""
    path = state_path(site)
    if path.exists():
        state = _read(path)
        if site.canaries >= 0 and site.canaries != state.n:
            raise ValueError(
                f"site {site.name}: {path} holds {state.n} canaries but the node config asks for "
                f"{site.canaries}; set canaries={state.n} (or -1), or move {path} away to draw a new set "
                "(models already trained with the old set can then no longer be canary-audited)"
            )
        return state
    n = auto_count(site, n_patients, delta) if site.canaries < 0 else site.canaries
    rng = secrets.SystemRandom()
    state = CanaryState(
        n=n, seed=rng.getrandbits(63), included=tuple(rng.getrandbits(1) == 1 for _ in range(n))
    )
    write_json_atomic(
        path,
        {
            "format_version": FORMAT_VERSION,
            "n": state.n,
            "seed": state.seed,
            "included": [int(b) for b in state.included],
        },
    )
    return state


def load(site: SiteConfig) -> CanaryState | None:
    """The site's saved canary set, or None when it never drew one (the audit then has no canaries to score:
    drawing a set after training would audit canaries no model ever saw)."""
    path = state_path(site)
    return _read(path) if path.exists() else None


def _read(path: Path) -> CanaryState:
    try:
        raw = json.loads(path.read_text())
        version = raw.get("format_version")
        if version == 1:
            raise ValueError(
                "format_version 1 holds image canaries, which this version replaced by gradient canaries"
            )
        if version != FORMAT_VERSION:
            raise ValueError(f"format_version {version!r}, expected {FORMAT_VERSION}")
        unknown = set(raw) - {"format_version", "n", "seed", "included"}
        if unknown:
            raise ValueError(f"unknown keys {sorted(unknown)}")
        included = tuple(bool(int(b)) for b in raw["included"])
        if len(included) != int(raw["n"]):
            raise ValueError(f"{len(included)} inclusion flags for n={raw['n']}")
        return CanaryState(int(raw["n"]), int(raw["seed"]), included)
    except (OSError, KeyError, TypeError, ValueError) as err:
        raise ValueError(
            f"{path}: unreadable canary state ({err}); restore it from a backup, or move it away to draw a new "
            "set (models trained with the old set can then no longer be canary-audited)"
        ) from err


def coordinates(state: CanaryState, unet: torch.nn.Module) -> Coordinates:
    """The canaries' coordinates and signs in this UNet: m x DIMENSIONS distinct elements of the CANARY_PARAMETERS
    set, drawn from the state's seed (the same for training and audit)."""
    params = dict(unet.named_parameters())
    names = trainable_names(unet, CANARY_PARAMETERS)
    sizes = np.array([params[n].numel() for n in names], dtype=np.int64)
    total, need = int(sizes.sum()), state.n * DIMENSIONS
    if need > total:
        raise ValueError(
            f"{state.n} canaries need {need} coordinates but this UNet has {total} ({CANARY_PARAMETERS}); move "
            f"the canary state away and set canaries <= {total // DIMENSIONS}"
        )
    rng = np.random.default_rng(state.seed)
    flat = rng.choice(total, size=need, replace=False).reshape(state.n, DIMENSIONS)
    signs = rng.choice(np.array([-1.0, 1.0]), size=(state.n, DIMENSIONS))
    starts = np.concatenate([[0], np.cumsum(sizes)])
    which = np.searchsorted(starts, flat, side="right") - 1
    return Coordinates(
        tuple(tuple(names[w] for w in row) for row in which), flat - starts[which], signs
    )


def attach(
    optimizer: torch.optim.Optimizer,
    unet: torch.nn.Module,
    state: CanaryState | None,
    sample_rate: float,
    max_grad_norm: float,
    expected_batch_size: int,
) -> int:
    """Make `optimizer` (a torch optimizer, or Opacus' wrapper around one) train on the included canaries: before
    each update, every included canary is drawn with probability `sample_rate` and its gradient (norm C), divided
    by the batch divisor (Opacus' `expected_batch_size` under DP, else `expected_batch_size`), is added to the
    gradient the update uses (after clipping and noise). Returns the number of included canaries."""
    if state is None or state.n_included == 0:
        return 0
    coords = coordinates(state, unet)
    params = dict(unet.named_parameters())
    keep = np.flatnonzero(state.included)
    divisor = float(getattr(optimizer, "expected_batch_size", None) or max(1, expected_batch_size))
    value = max_grad_norm / np.sqrt(DIMENSIONS) / divisor
    # per parameter: the flat indices it holds, their values, and which included canary (0..len(keep)) owns each
    per_param: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    owner = np.repeat(np.arange(len(keep)), DIMENSIONS)
    names = np.array([n for i in keep for n in coords.names[i]])
    index, signs = coords.index[keep].reshape(-1), coords.signs[keep].reshape(-1)
    for name in sorted(set(names.tolist())):
        at = names == name
        device = params[name].device
        per_param[name] = (
            torch.from_numpy(index[at]).to(device),
            torch.from_numpy(signs[at] * value).to(device, params[name].dtype),
            torch.from_numpy(owner[at]),
        )
    generator = entropy_generator()  # the canaries' own Poisson draws, from the site's OS entropy
    # Opacus' wrapper steps the torch optimizer it wraps after clipping, noise and scaling: hook that one
    base = getattr(optimizer, "original_optimizer", optimizer)

    def add_canaries(_optimizer, _args, _kwargs) -> None:
        drawn = torch.rand(len(keep), generator=generator) < sample_rate
        with torch.no_grad():
            for name, (idx, val, own) in per_param.items():
                p, sel = params[name], drawn[own]
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                p.grad.view(-1).index_add_(0, idx[sel.to(idx.device)], val[sel.to(val.device)])

    base.register_step_pre_hook(add_canaries)
    return len(keep)


def scores(state: CanaryState, unet: torch.nn.Module, audited: dict, start: dict) -> np.ndarray:
    """Each canary's score: how far its coordinates moved against their signs from `start` to `audited` (UNet
    state dicts; `unet` gives the parameter layout), averaged over its DIMENSIONS coordinates. Computed and kept
    at the site."""
    coords = coordinates(state, unet)
    flat = {
        name: (_flat(audited[name]) - _flat(start[name])).numpy()
        for name in set(n for row in coords.names for n in row)
    }
    moved = np.array(
        [
            [flat[n][k] for n, k in zip(row, idx, strict=True)]
            for row, idx in zip(coords.names, coords.index, strict=True)
        ]
    )
    return (-coords.signs * moved).mean(axis=1)


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().reshape(-1).double()


def audit_canaries(
    state: CanaryState | None,
    unet: torch.nn.Module,
    audited: dict,
    start: dict | None,
    delta: float,
    claimed_epsilon: float,
    alpha: float = 0.05,
) -> dict:
    """The one-run audit of the site's canaries on the audited UNet against the run's starting one: counts,
    bound and power. No score and no inclusion flag leaves this function."""
    if state is None or state.n == 0:
        return _none(
            "no canaries at this site (node config canaries=0, DP off with the auto default, or no training "
            "round since canaries were introduced)"
        )
    if start is None:
        return _none(
            f"{state.n} canaries, but no starting UNet of this run at this site (client/reference.py): their "
            "movement cannot be measured, so they were not scored"
        )
    s = scores(state, unet, audited, start)
    out = one_run.audit(s, np.array(state.included), delta=delta, alpha=alpha)
    out["power"] = canary_power(state.n, delta, alpha)
    out["range_of_interest"] = (
        range_of_interest(claimed_epsilon) if np.isfinite(claimed_epsilon) else 0.0
    )
    out["underpowered"] = is_underpowered(out["power"], claimed_epsilon)
    out["attack"] = ATTACK
    return out


def _none(note: str) -> dict:
    return {
        "n_canaries": 0,
        "epsilon_lower_bound": 0.0,
        "power": 0.0,
        "underpowered": True,
        "note": note,
    }
