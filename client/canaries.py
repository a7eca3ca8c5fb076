"""Canaries for the one-run audit (privacy/one_run.py): records that are not patients, half of them trained on.

A site makes m canaries: phantom images (common/phantoms.py) carrying a rare mark, a small high-contrast
checkerboard that no patient scan has, at a position of its own. Each canary is included in the site's DP training
with probability 1/2, drawn ONCE from the site's OS entropy (`secrets`) and kept in the site's state
(`<state>/canaries.json`, written and read only here); the server's seed never touches it. Included canaries are
extra records of the DP training set: Poisson-sampled, clipped and noised exactly like patients. They cost no
patient any privacy (DP-SGD's guarantee is per record; a patient's sampling rate, noise and steps are fixed by the
patient count, see `training_records`). They never enter the cohort, the audit hold-out or any message: only the
one-run audit's counts leave the site.

After training, the audit scores every canary with the white-box loss attack and `audit_canaries` turns the scores
and the secret inclusion into Steinke et al.'s epsilon lower bound, with its power (the bound a perfect attack
would reach with this m).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.config import ModelConfig, SiteConfig
from common.io import write_json_atomic
from common.phantoms import PROTOCOLS, render_subject
from common.site import SiteData
from privacy import one_run
from privacy.power import canary_power, is_underpowered, range_of_interest

STATE_FILE = "canaries.json"
FORMAT_VERSION = 1
# The auto default: the fewest canaries whose perfect attack certifies half the claimed epsilon (the claim's range
# of interest, privacy/power.py), capped so that the included half adds at most 20 % to the records a DP-SGD step
# processes (the overhead target): m / 2 <= 0.2 patients. At small sites the cap wins and the audit says
# it is underpowered; it never pretends otherwise.
MAX_OVERHEAD = 0.20
_CANARY_PROTOCOL = "t1_se_1.5t"


@dataclass(frozen=True)
class CanaryState:
    """The site's canary set: how many, how to re-render them, and which were included (secret, site-only)."""

    n: int
    render_seed: int
    included: tuple[bool, ...]
    format_version: int = FORMAT_VERSION

    @property
    def n_included(self) -> int:
        return sum(self.included)


def state_path(site: SiteConfig) -> Path:
    return site.state_path / STATE_FILE


def auto_count(site: SiteConfig, n_patients: int, delta: float) -> int:
    """The default number of canaries for this site (see MAX_OVERHEAD)."""
    if not site.dp:
        return 0
    affordable = int(2 * MAX_OVERHEAD * n_patients)
    if affordable == 0:
        return 0
    try:
        return one_run.canaries_for_power(
            range_of_interest(site.epsilon),
            delta,
            n_tests=len(one_run.DEFAULT_GUESS_FRACTIONS),
            limit=affordable,
        )
    except (
        ValueError
    ):  # unreachable within the overhead cap: as many as it allows (underpowered, and said)
        return affordable


def load_or_create(site: SiteConfig, n_patients: int, delta: float) -> CanaryState:
    """The site's canaries: read from its state, or drawn now (inclusion from OS entropy) and saved atomically.

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
        n=n,
        render_seed=rng.getrandbits(63),
        included=tuple(rng.getrandbits(1) == 1 for _ in range(n)),
    )
    write_json_atomic(
        path,
        {
            "format_version": FORMAT_VERSION,
            "n": state.n,
            "render_seed": state.render_seed,
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
        if raw.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"format_version {raw.get('format_version')!r}, expected {FORMAT_VERSION}"
            )
        unknown = set(raw) - {"format_version", "n", "render_seed", "included"}
        if unknown:
            raise ValueError(f"unknown keys {sorted(unknown)}")
        included = tuple(bool(int(b)) for b in raw["included"])
        if len(included) != int(raw["n"]):
            raise ValueError(f"{len(included)} inclusion flags for n={raw['n']}")
        return CanaryState(int(raw["n"]), int(raw["render_seed"]), included)
    except (OSError, KeyError, TypeError, ValueError) as err:
        raise ValueError(
            f"{path}: unreadable canary state ({err}); restore it from a backup, or move it away to draw a new "
            "set (models trained with the old set can then no longer be canary-audited)"
        ) from err


def mark(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Stamp the rare mark: a checkerboard patch (1/8 of the field of view, alternating 0 and 1) at a random
    position inside the central three quarters of the image. Works on (H, W) and (H, W, D) arrays."""
    out = image.copy()
    size = out.shape[0]
    side = max(2, size // 8)
    lo, hi = size // 8, size - size // 8 - side
    corner = [int(rng.integers(lo, max(lo + 1, hi))) for _ in range(out.ndim)]
    grid = np.indices((side,) * out.ndim).sum(axis=0) % 2
    out[tuple(slice(c, c + side) for c in corner)] = grid.astype(out.dtype)
    return out


def render(state: CanaryState, cfg: ModelConfig) -> SiteData:
    """All m canaries as records shaped like the site's (N, 1, *spatial) in [0, 1], labelled with the first class
    (normal). Deterministic given the state, so training and the audit see the same images."""
    rng = np.random.default_rng(state.render_seed)
    protocol = PROTOCOLS[_CANARY_PROTOCOL]
    images = np.zeros((state.n, 1) + (cfg.image_size,) * cfg.spatial_dims, dtype=np.float32)
    for i in range(state.n):
        image, _, _ = render_subject(rng, protocol, dims=cfg.spatial_dims, size=cfg.image_size)
        image = image[..., 0] if cfg.spatial_dims == 2 else image
        hi = float(np.percentile(image, 99.5)) or 1.0
        images[i, 0] = mark(np.clip(image / hi, 0.0, 1.0), rng)
    return SiteData(
        subject_ids=[f"canary-{i:05d}" for i in range(state.n)],
        images=images,
        labels=np.zeros(state.n, dtype=np.int64),
        class_names=tuple(cfg.class_names),
    )


def training_records(
    train: SiteData, state: CanaryState, cfg: ModelConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels DP-SGD trains on: the patients, then the included canaries.

    The DP plan (sampling rate, steps, noise) must be made from the PATIENT count, before this is called, so that
    no patient's mechanism depends on the canaries; each record here is then Poisson-sampled at that rate."""
    if state.n_included == 0:
        return train.images, train.labels
    canaries = render(state, cfg)
    keep = np.flatnonzero(state.included)
    return (
        np.concatenate([train.images, canaries.images[keep]]),
        np.concatenate([train.labels, canaries.labels[keep]]),
    )


def audit_canaries(
    state: CanaryState | None,
    cfg: ModelConfig,
    score: Callable[[SiteData], np.ndarray],
    delta: float,
    claimed_epsilon: float,
    alpha: float = 0.05,
) -> dict:
    """Score every canary (higher = "more likely trained on", e.g. client.audit.loss_scores on the global model)
    and return the one-run audit's counts, bound and power. No score and no inclusion flag leaves this function."""
    if state is None or state.n == 0:
        return {
            "n_canaries": 0,
            "epsilon_lower_bound": 0.0,
            "power": 0.0,
            "underpowered": True,
            "note": "no canaries at this site (node config canaries=0, DP off with the auto default, or no "
            "training round since canaries were introduced)",
        }
    scores = np.asarray(score(render(state, cfg)), dtype=np.float64)
    out = one_run.audit(scores, np.array(state.included), delta=delta, alpha=alpha)
    out["power"] = canary_power(state.n, delta, alpha)
    out["range_of_interest"] = (
        range_of_interest(claimed_epsilon) if np.isfinite(claimed_epsilon) else 0.0
    )
    out["underpowered"] = is_underpowered(out["power"], claimed_epsilon)
    out["attack"] = "white-box diffusion loss on the global model (lower loss = trained on)"
    return out
