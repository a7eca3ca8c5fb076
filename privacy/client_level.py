"""Client-level (central) DP: the exact update clipping and the replace-one accounting, shared by sites and server.

A site's model update is `new - global` over all arrays; its norm is measured here, in float64 over the float32
differences, by both the site (which clips) and the server (which re-checks): one definition, so "norm <= C" means
the same on both sides, with no tolerance.

Which sites take part in a run is public (run.json, privacy.json, the audit and the release name every site), so an
add/remove-one claim ("whether a site took part") protects nothing. The claim fedsynth makes is replace-one: any one
site's update replaced by any other. Two clipped updates differ by up to 2C, so the uniform mean of n updates has
sensitivity 2C / n; with Gaussian noise of std sigma x C / n on it, one release is the Gaussian mechanism with
noise multiplier sigma / 2 (`replace_one_noise_multiplier`). Releases compose with the RDP accountant of Google's
dp-accounting (no sampling amplification: every site takes part in every round).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
from dp_accounting import dp_event, rdp

NEIGHBORING_RELATION = "replace-one"
SENSITIVITY_FACTOR = 2.0  # replace-one: two updates clipped to C differ by up to 2C


def update_norm(new: Sequence[np.ndarray], old: Sequence[np.ndarray]) -> float:
    """L2 norm of the model update new - old over all arrays, accumulated in float64."""
    if len(new) != len(old):
        raise ValueError(f"update has {len(new)} arrays, the global model {len(old)}")
    total = 0.0
    for a, b in zip(new, old, strict=True):
        if np.shape(a) != np.shape(b):
            raise ValueError(
                f"update array of shape {np.shape(a)} for a global array of {np.shape(b)}"
            )
        d = np.subtract(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64))
        total += float(np.dot(d.ravel(), d.ravel()))
    return math.sqrt(total)


def clip_update(
    new: Sequence[np.ndarray], old: Sequence[np.ndarray], clipping_norm: float
) -> tuple[list[np.ndarray], float]:
    """`old + (new - old) x min(1, C / norm)` in `new`'s dtypes, with `update_norm(result, old) <= C` exactly.

    Scaling in float32 and adding back can land a hair above C (rounding); the factor is then shrunk by a few ulps
    until the stored result is within C. Returns (clipped arrays, the norm before clipping). A non-finite update
    cannot be clipped: ValueError.
    """
    if not clipping_norm > 0:
        raise ValueError(f"clipping norm must be > 0, got {clipping_norm}")
    norm = update_norm(new, old)
    if not math.isfinite(norm):
        raise ValueError("the model update is not finite (NaN or inf): it cannot be clipped")
    if norm <= clipping_norm:
        return [np.array(a, copy=True) for a in new], norm
    old64 = [np.asarray(b, dtype=np.float64) for b in old]
    diff = [np.asarray(a, dtype=np.float64) - b for a, b in zip(new, old64, strict=True)]
    scale = clipping_norm / norm
    for _ in range(100):
        out = [
            (b + d * scale).astype(np.asarray(a).dtype)
            for a, b, d in zip(new, old64, diff, strict=True)
        ]
        if update_norm(out, old) <= clipping_norm:
            return out, norm
        scale *= 1 - 2.0**-20  # float32 rounding is about 6e-8 relative: a few steps at most
    raise RuntimeError(f"could not clip an update of norm {norm:.6g} to {clipping_norm:.6g}")


def replace_one_noise_multiplier(noise_multiplier: float) -> float:
    """The Gaussian mechanism's multiplier under replace-one: noise std sigma x C over sensitivity 2C."""
    return noise_multiplier / SENSITIVITY_FACTOR


def epsilon(noise_multipliers: Iterable[float], delta: float) -> float:
    """Epsilon at `delta` of composing one Gaussian release per (replace-one) noise multiplier; 0 for none."""
    sigmas = [float(s) for s in noise_multipliers]
    if not sigmas:
        return 0.0
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    acc = rdp.RdpAccountant()
    for s in sigmas:
        acc.compose(dp_event.GaussianDpEvent(s))
    return float(acc.get_epsilon(delta))
