"""Physics-based MRI brain phantoms: the simulated hospitals ("sites") behind the embedded default data.

Each subject is a head-like anatomy (scalp fat, skull, CSF rim, folded grey-matter cortex, white matter,
deep grey nuclei, butterfly lateral ventricles, optionally a tumour/oedema lesion) with random shape,
size, orientation and smooth deformation. It is imaged through the MR signal equation of the site's
protocol with partial volume (supersampled tissue fractions), a smooth multiplicative bias field and
Rician noise. Sites differ in field strength, sequence, noise, bias, resolution and lesion prevalence,
so the federation is non-IID and the "lesion" class is rare (absent at some sites).

Intensity units: each image is scaled so its noiseless (bias-included) maximum is 1, hence the Rician
sigma equals `Protocol.noise_sigma`. Anatomy lives in a frame spanning the field of view; the head fills
a fixed share of the FOV for the reference 3 mm voxel, so coarser voxels (a larger FOV) make the same head
span fewer voxels. Skull (cortical bone, no MR signal) is labelled background (0) like air.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from common.io import atomic_dir

CLASS_NAMES: tuple[str, ...] = ("healthy", "lesion")  # "lesion" is the rare class
TISSUES: dict[str, int] = {"background": 0, "csf": 1, "grey": 2, "white": 3, "fat": 4, "lesion": 5}
SEQUENCES: tuple[str, ...] = ("se", "flair", "gre")

# (T1 ms, T2 ms, PD) at 1.5 T (shared notes, section 3); lesion is the middle of the tumour/oedema range.
_TISSUES_15T: dict[str, tuple[float, float, float]] = {
    "csf": (4000.0, 2000.0, 1.00),
    "grey": (1000.0, 100.0, 0.80),
    "white": (650.0, 80.0, 0.70),
    "fat": (260.0, 85.0, 0.90),
    "lesion": (1250.0, 160.0, 0.90),
}
_LESION_RANGE = ((1100.0, 1400.0), (120.0, 200.0), (0.85, 0.95))
# Relative T1 change per tesla above 1.5 T: brain tissue and fat about +20 %/T (+30 % at 3 T), CSF little.
_T1_PER_TESLA = {"csf": 0.05, "grey": 0.20, "white": 0.20, "fat": 0.20, "lesion": 0.20}
_T2_PER_TESLA = -0.03  # T2 shortens slightly with field
_REF_VOXEL_MM = 3.0
_HEAD_FILL = 0.84  # share of the half-FOV covered by the head's long axis at the reference voxel


@dataclass(frozen=True)
class Protocol:
    """One site's acquisition protocol (public: written to site.json)."""

    name: str
    sequence: str  # "se" spin echo, "flair" inversion recovery, "gre" spoiled gradient echo
    field_t: float
    tr_ms: float
    te_ms: float
    ti_ms: float | None = None
    flip_deg: float | None = None
    noise_sigma: float = 0.02  # Rician sigma as a fraction of the image's max noiseless signal
    bias_strength: float = 0.15  # amplitude of the smooth multiplicative bias field (log scale)
    voxel_mm: float = 3.0  # in-plane voxel size (FOV = size * voxel_mm)
    slice_mm: float = 5.0  # slice thickness of 2D acquisitions (3D volumes are isotropic voxel_mm)

    def __post_init__(self) -> None:
        where = f"protocol {self.name!r}"
        if self.sequence not in SEQUENCES:
            raise ValueError(f"{where}: sequence must be one of {SEQUENCES}, got {self.sequence!r}")
        if not 0.05 <= self.field_t <= 11.7:
            raise ValueError(f"{where}: field_t {self.field_t} T is outside 0.05-11.7 T")
        if self.tr_ms <= 0 or self.te_ms <= 0 or self.te_ms >= self.tr_ms:
            raise ValueError(f"{where}: need 0 < TE < TR, got TR {self.tr_ms} TE {self.te_ms}")
        if self.sequence == "flair" and (self.ti_ms is None or not 0 < self.ti_ms < self.tr_ms):
            raise ValueError(f"{where}: FLAIR needs 0 < TI < TR, got TI {self.ti_ms}")
        if self.sequence == "gre" and (self.flip_deg is None or not 0 < self.flip_deg <= 90):
            raise ValueError(
                f"{where}: GRE needs a flip angle in (0, 90] degrees, got {self.flip_deg}"
            )
        if self.noise_sigma < 0 or self.bias_strength < 0:
            raise ValueError(f"{where}: noise_sigma and bias_strength must be >= 0")
        if self.voxel_mm <= 0 or self.slice_mm <= 0:
            raise ValueError(f"{where}: voxel_mm and slice_mm must be > 0")


@dataclass(frozen=True)
class SiteSpec:
    """A simulated hospital: its protocol and the share of its patients with a lesion."""

    name: str
    protocol: Protocol
    lesion_prevalence: float

    def __post_init__(self) -> None:
        if not 0.0 <= self.lesion_prevalence <= 1.0:
            raise ValueError(f"site {self.name!r}: lesion_prevalence must be in [0, 1]")


PROTOCOLS: dict[str, Protocol] = {
    p.name: p
    for p in (
        Protocol("t1_se_1.5t", "se", 1.5, 500.0, 15.0, noise_sigma=0.015, bias_strength=0.10),
        Protocol(
            "t1_gre_3t", "gre", 3.0, 25.0, 4.0, flip_deg=30.0, noise_sigma=0.02, bias_strength=0.30
        ),
        Protocol(
            "t1_se_1.5t_lowres",
            "se",
            1.5,
            450.0,
            20.0,
            noise_sigma=0.045,
            bias_strength=0.15,
            voxel_mm=4.0,
            slice_mm=6.0,
        ),
        Protocol(
            "t1_se_3t", "se", 3.0, 600.0, 10.0, noise_sigma=0.012, bias_strength=0.25, slice_mm=4.0
        ),
        Protocol(
            "t1_gre_1.5t",
            "gre",
            1.5,
            20.0,
            5.0,
            flip_deg=25.0,
            noise_sigma=0.025,
            bias_strength=0.20,
            voxel_mm=3.5,
        ),
        Protocol("t2_se_1.5t", "se", 1.5, 4000.0, 100.0),
        Protocol("t2_se_3t", "se", 3.0, 5000.0, 90.0),
        Protocol("flair_1.5t", "flair", 1.5, 9000.0, 120.0, ti_ms=2400.0),
        Protocol("flair_3t", "flair", 3.0, 9000.0, 120.0, ti_ms=2500.0),
        # The demo's PUBLIC data set (an open healthy-volunteer collection, say): T1-weighted like the sites, so
        # pretraining on it helps, but at a field strength, timing, noise and resolution no default site uses.
        Protocol(
            "t1_se_1t_public",
            "se",
            1.0,
            550.0,
            12.0,
            noise_sigma=0.02,
            bias_strength=0.12,
            voxel_mm=3.25,
            slice_mm=5.0,
        ),
    )
}
PUBLIC_PROTOCOL = "t1_se_1t_public"
_PUBLIC_KEY = (
    1_000_000  # the public set's seed stream: never a site index, so no site shares its draws
)
# T1-weighted protocols the default sites cycle through (a coherent modality for the federated generator).
_SITE_CYCLE: tuple[tuple[str, float], ...] = (
    ("t1_se_1.5t", 0.25),
    ("t1_gre_3t", 0.10),
    ("t1_se_1.5t_lowres", 0.0),
    ("t1_se_3t", 0.15),
    ("t1_gre_1.5t", 0.05),
)


def tissue_properties(field_t: float) -> dict[str, tuple[float, float, float]]:
    """(T1 ms, T2 ms, PD) per tissue at `field_t` tesla: T1 rises ~30 % from 1.5 T to 3 T, T2 barely moves."""
    if not 0.05 <= field_t <= 11.7:
        raise ValueError(f"field_t {field_t} T is outside 0.05-11.7 T")
    out = {}
    for name, (t1, t2, pd) in _TISSUES_15T.items():
        t1_scale = max(0.3, 1.0 + _T1_PER_TESLA[name] * (field_t - 1.5))
        t2_scale = max(0.5, 1.0 + _T2_PER_TESLA * (field_t - 1.5))
        out[name] = (t1 * t1_scale, t2 * t2_scale, pd)
    return out


def signal(protocol: Protocol, t1, t2, pd):
    """MR magnitude signal of a tissue (T1, T2 in ms, PD) under `protocol`; vectorises over numpy arrays.

    GRE uses `t2` as T2* (the phantom has no separate susceptibility term).
    """
    t1, t2, pd = (np.asarray(a, dtype=np.float64) for a in (t1, t2, pd))
    e1 = np.exp(-protocol.tr_ms / t1)
    e2 = np.exp(-protocol.te_ms / t2)
    if protocol.sequence == "se":
        s = pd * (1.0 - e1) * e2
    elif protocol.sequence == "flair":
        s = pd * np.abs(1.0 - 2.0 * np.exp(-protocol.ti_ms / t1) + e1) * e2
    else:  # spoiled gradient echo (Ernst equation)
        a = math.radians(protocol.flip_deg)
        s = pd * math.sin(a) * (1.0 - e1) / (1.0 - math.cos(a) * e1) * e2
    return float(s) if s.ndim == 0 else s


def weighting(protocol: Protocol) -> str:
    """Dominant contrast of a protocol: "T1", "T2", "PD" or "FLAIR" (a public label for site.json)."""
    if protocol.sequence == "flair":
        return "FLAIR"
    if protocol.sequence == "gre":
        return "T1" if protocol.te_ms < 15 else "T2*"
    if protocol.tr_ms < 1000:
        return "T1"
    return "T2" if protocol.te_ms >= 60 else "PD"


def default_site_specs(n_sites: int) -> list[SiteSpec]:
    """`n_sites` non-IID sites cycling through distinct T1-weighted protocols; later cycles vary noise/bias."""
    if n_sites < 1:
        raise ValueError(f"n_sites must be >= 1, got {n_sites}")
    specs = []
    for i in range(n_sites):
        name, prevalence = _SITE_CYCLE[i % len(_SITE_CYCLE)]
        protocol = PROTOCOLS[name]
        round_ = i // len(_SITE_CYCLE)
        if round_:
            protocol = dataclasses.replace(
                protocol,
                name=f"{name}_v{round_}",
                noise_sigma=round(protocol.noise_sigma * (1.0 + 0.3 * round_), 4),
                bias_strength=round(min(0.5, protocol.bias_strength + 0.05 * round_), 4),
            )
            prevalence = round(prevalence * (0.5 if round_ % 2 else 1.5), 4)
        specs.append(SiteSpec(f"site{i}", protocol, min(prevalence, 1.0)))
    return specs


# ---------------------------------------------------------------------------------------------------------
# Anatomy


def _draw_waves(rng: np.random.Generator, n: int, cycles: tuple[float, float]) -> np.ndarray:
    """n random plane waves as rows (kx, ky, kz, phase); |k| in 2*pi*cycles per unit."""
    d = rng.normal(size=(n, 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    k = d * (2 * np.pi * rng.uniform(*cycles, size=(n, 1)))
    return np.concatenate([k, rng.uniform(0, 2 * np.pi, size=(n, 1))], axis=1).astype(np.float32)


def _wave_field(waves: np.ndarray, u, v, w) -> np.ndarray:
    """Sum of cosines, scaled to unit variance."""
    out = 0.0
    for kx, ky, kz, ph in waves:
        out = out + np.cos(kx * u + ky * v + kz * w + ph)
    return out * np.float32(math.sqrt(2.0 / len(waves)))


def _draw_anatomy(rng: np.random.Generator) -> dict:
    """All random choices of one subject (drawn in a fixed order, lesion or not, for reproducibility)."""
    return {
        "axes": (rng.uniform(0.74, 0.84), rng.uniform(0.95, 1.0), rng.uniform(0.80, 0.90)),
        "taper": rng.uniform(0.04, 0.10),  # head narrower at the front
        "angles": (
            rng.normal(0, 0.08),
            rng.normal(0, 0.04),
            rng.normal(0, 0.04),
        ),  # yaw, pitch, roll (rad)
        "centre": rng.normal(0, 0.02, size=3),
        "scale": rng.uniform(0.92, 1.02),
        "deform": _draw_waves(rng, 12, (0.4, 1.0)),
        "deform_amp": rng.uniform(0.015, 0.03),
        "folds": _draw_waves(rng, 24, (3.0, 4.5)),
        "atrophy": rng.uniform(0.0, 1.0),  # wider CSF spaces and ventricles
        "ventricle": rng.uniform(0.75, 1.35),
        "slice_w": rng.uniform(0.0, 0.12),  # axial slice height (2D)
        "tissue_jitter": rng.normal(0, 0.03, size=(len(_TISSUES_15T), 3)),
        "bias": _draw_waves(rng, 4, (0.15, 0.45)),
        "lesion_centre": (
            rng.uniform(-0.45, 0.45),
            rng.uniform(-0.55, 0.55),
            rng.uniform(-0.3, 0.4),
        ),
        "lesion_radius": rng.uniform(0.0, 1.0),
        "lesion_axes": rng.uniform(0.75, 1.3, size=3),
        "lesion_shape": _draw_waves(rng, 6, (0.8, 1.6)),
        "lesion_props": tuple(rng.uniform(lo, hi) for lo, hi in _LESION_RANGE),
    }


def _label_anatomy(
    a: dict, u, v, w, voxel_units: float, lesion: bool, slice_w: float | None
) -> np.ndarray:
    """Tissue labels at head-frame points (u right, v anterior, w superior; head surface near rho = 1).

    A lesion is centred well inside the brain (on the slice `slice_w` for 2D) and spans >= 2 voxels in radius.
    """
    ax, ay, az = a["axes"]
    ax_eff = ax * (1.0 - a["taper"] * v)
    rho = np.sqrt((u / ax_eff) ** 2 + (v / ay) ** 2 + (w / az) ** 2)
    lab = np.zeros(rho.shape, dtype=np.uint8)
    lab[rho <= 1.0] = TISSUES["fat"]
    lab[rho <= 0.935] = TISSUES["background"]  # skull: no signal
    intracranial = rho <= 0.875
    lab[intracranial] = TISSUES["csf"]

    # depth below the brain surface: from the convexity and from the interhemispheric fissure
    brain_surface = 0.85 - 0.025 * a["atrophy"]
    depth = brain_surface - rho
    # the corpus callosum (between genu and splenium) blocks the fissure around the ventricles
    cc_reach = np.where(v > 0, 0.44, 0.50) * np.sqrt(
        np.clip(1.0 - ((w - 0.05) / 0.38) ** 2, 0.0, 1.0)
    )
    fissure_half = 0.010 + 0.008 * a["atrophy"]
    medial = np.hypot(
        np.maximum(np.abs(u) - fissure_half, 0.0), np.maximum(cc_reach - np.abs(v), 0.0)
    )
    depth = np.minimum(depth, medial)

    # cortical folding in the outer shell: a field constant along radial lines; its zero lines are the sulci
    brain = intracranial & (depth > 0)
    lab[brain] = TISSUES["white"]
    shell = brain & (depth < 0.2)
    su, sv, sw = u[shell], v[shell], w[shell]
    r = np.sqrt(su * su + sv * sv + sw * sw) + 1e-6
    g = _wave_field(a["folds"], su / r, sv / r, sw / r)
    crown = np.clip(np.abs(g) / 0.6, 0.0, 1.0)  # 0 at a sulcal fundus line, 1 on a gyral crown
    wm_depth = 0.065 + 0.13 * (1.0 - crown) ** 1.5
    d = depth[shell]
    shell_lab = np.where(d > wm_depth, TISSUES["white"], TISSUES["grey"]).astype(np.uint8)
    shell_lab[(crown < 0.12 + 0.06 * a["atrophy"]) & (d < wm_depth - 0.035)] = TISSUES["csf"]
    lab[shell] = shell_lab

    # deep grey nuclei (caudate heads, thalami), then the lateral ventricles (butterfly) over them
    vs = a["ventricle"] * (1.0 + 0.35 * a["atrophy"])
    for side in (-1.0, 1.0):
        for (cu, cv, cw), (su, sv, sw) in (
            ((0.10 + 0.03 * vs, 0.20, 0.06), (0.055, 0.08, 0.10)),  # caudate head
            ((0.085, -0.12, -0.02), (0.075, 0.11, 0.09)),  # thalamus
        ):
            e = ((u - side * cu) / su) ** 2 + ((v - cv) / sv) ** 2 + ((w - cw) / sw) ** 2
            lab[intracranial & (e < 1.0) & (depth > 0.1)] = TISSUES["grey"]
        t = np.clip(
            v / (0.30 * (0.8 + 0.2 * vs)), -1.3, 1.3
        )  # position along the ventricle, -1 back .. 1 front
        height = np.sqrt(np.clip(1.0 - ((w - 0.08) / (0.20 * (0.8 + 0.2 * vs))) ** 2, 0.0, 1.0))
        medial = 0.012 + 0.09 * t * t  # the horns diverge from the septum (butterfly)
        width = (
            0.065
            * vs
            * (1.0 + 0.3 * np.maximum(t, 0.0))
            * np.sqrt(np.clip(1.0 - (t / 1.25) ** 2, 0, 1))
        )
        inside = (side * u > medial) & (side * u < medial + width * height) & (np.abs(t) < 1.25)
        lab[inside] = TISSUES["csf"]
    third = (np.abs(u) < 0.008 * vs) & (v > -0.2) & (v < -0.02) & (np.abs(w) < 0.12)
    lab[third] = TISSUES["csf"]

    if lesion:
        c = np.array(a["lesion_centre"])
        if slice_w is not None:
            c[2] = slice_w
        rho_c = math.sqrt(sum((cq / s) ** 2 for cq, s in zip(c, (ax, ay, az), strict=False)))
        if rho_c > 0.6:  # keep the centre deep enough that the blob lies in the brain
            c[:2] *= math.sqrt(max(0.36 - (c[2] / az) ** 2, 0.0)) / math.hypot(c[0] / ax, c[1] / ay)
        radius = max(0.07, 2.6 * voxel_units) + a["lesion_radius"] * 0.12
        du, dv, dw = (
            (q - cq) / (radius * s)
            for q, cq, s in zip((u, v, w), c, a["lesion_axes"], strict=False)
        )
        rr = np.sqrt(du * du + dv * dv + dw * dw) + 1e-6
        wobble = 1.0 + 0.15 * np.clip(
            _wave_field(a["lesion_shape"], du / rr, dv / rr, dw / rr), -1.3, 1.3
        )
        lab[intracranial & (rr < wobble)] = TISSUES["lesion"]
    return lab


def _rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    cz, sz, cy, sy, cx, sx = (f(t) for t in (yaw, pitch, roll) for f in (math.cos, math.sin))
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    ry = np.array([[1, 0, 0], [0, cy, -sy], [0, sy, cy]])  # pitch about the left-right axis
    rx = np.array([[cx, 0, sx], [0, 1, 0], [-sx, 0, cx]])  # roll about the anterior axis
    return rz @ ry @ rx


def _affine(size: int, voxel_mm: float, slice_mm: float, n_slices: int) -> np.ndarray:
    """RAS affine: voxel (i, j, k) -> mm (x right, y anterior, z superior), centred on the FOV."""
    spacing = np.array([voxel_mm, voxel_mm, slice_mm])
    aff = np.diag([*spacing, 1.0])
    aff[:3, 3] = -0.5 * (np.array([size, size, n_slices]) - 1) * spacing
    return aff


def render_subject(
    rng: np.random.Generator,
    protocol: Protocol,
    *,
    dims: int = 2,
    size: int = 64,
    lesion: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Simulate one subject: (image float32, tissue labels uint8, 4x4 RAS affine).

    dims=2 gives one axial slice of shape (size, size, 1) (one record per patient); dims=3 gives
    (size, size, size) with isotropic voxels.
    """
    if dims not in (2, 3):
        raise ValueError(f"dims must be 2 or 3, got {dims}")
    if not 8 <= size <= 512:
        raise ValueError(f"size must be in 8..512, got {size}")
    a = _draw_anatomy(rng)
    ss = 3 if dims == 2 else 2  # supersampling per axis for partial volume
    n_hi = size * ss
    grid = (np.arange(n_hi, dtype=np.float32) + 0.5) / n_hi * 2.0 - 1.0
    units_per_mm = 2.0 / (size * protocol.voxel_mm)  # normalised FOV spans [-1, 1]
    fill = (
        _HEAD_FILL * min(1.15, _REF_VOXEL_MM / protocol.voxel_mm) * a["scale"]
    )  # head size in the FOV
    if dims == 2:
        nz, ssz = 1, 3  # sub-slices across the slice thickness
        zs = (np.arange(ssz, dtype=np.float32) + 0.5) / ssz - 0.5
        zs = zs * np.float32(protocol.slice_mm * units_per_mm) + np.float32(a["slice_w"] * fill)
    else:
        nz, ssz, zs = size, ss, grid
    x, y, z = grid[:, None, None], grid[None, :, None], zs[None, None, :]

    # head frame: undo placement and orientation, then a smooth random deformation
    rot = _rotation(*a["angles"]).astype(np.float32)
    cx, cy, cz = (np.float32(c) for c in a["centre"])
    if dims == 2:
        cz = np.float32(0.0)
    px, py, pz = x - cx, y - cy, z - cz
    u = (rot[0, 0] * px + rot[1, 0] * py + rot[2, 0] * pz) / fill
    v = (rot[0, 1] * px + rot[1, 1] * py + rot[2, 1] * pz) / fill
    w = (rot[0, 2] * px + rot[1, 2] * py + rot[2, 2] * pz) / fill
    amp = np.float32(a["deform_amp"])
    d = a["deform"]
    u, v, w = (
        u + amp * _wave_field(d[0:4], u, v, w),
        v + amp * _wave_field(d[4:8], u, v, w),
        w + amp * _wave_field(d[8:12], u, v, w),
    )
    slice_w = a["slice_w"] if dims == 2 else None
    labels_hi = _label_anatomy(
        a, u, v, w, voxel_units=2.0 / (size * fill), lesion=lesion, slice_w=slice_w
    )

    # tissue fractions per output voxel (partial volume) and the noiseless signal
    blocks = labels_hi.reshape(size, ss, size, ss, nz, ssz)
    fractions = np.stack(
        [(blocks == t).mean(axis=(1, 3, 5), dtype=np.float32) for t in range(len(TISSUES))], axis=-1
    )
    props = tissue_properties(protocol.field_t)
    if lesion:
        t1, t2, pd = a["lesion_props"]
        scale = (
            props["lesion"][0] / _TISSUES_15T["lesion"][0],
            props["lesion"][1] / _TISSUES_15T["lesion"][1],
        )
        props["lesion"] = (t1 * scale[0], t2 * scale[1], pd)
    tissue_signal = np.zeros(len(TISSUES), dtype=np.float32)
    for row, (name, (t1, t2, pd)) in enumerate(props.items()):
        j1, j2, jp = a["tissue_jitter"][row]
        tissue_signal[TISSUES[name]] = signal(
            protocol, t1 * (1 + j1), t2 * (1 + j2), pd * (1 + jp / 3)
        )
    clean = fractions @ tissue_signal

    # smooth multiplicative bias field (coil sensitivity), evaluated at output voxel centres
    centres = (np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0
    zc = zs.mean(keepdims=True) if dims == 2 else centres
    bias = _wave_field(a["bias"], centres[:, None, None], centres[None, :, None], zc[None, None, :])
    bias /= max(float(np.abs(bias).max()), 1e-6)  # in [-1, 1]: gain spans exp(+-bias_strength)
    clean = clean * np.exp(np.float32(protocol.bias_strength) * bias)
    clean /= max(float(clean.max()), 1e-12)

    # Rician noise: magnitude of the signal plus complex Gaussian noise
    sigma = np.float32(protocol.noise_sigma)
    real = clean + sigma * rng.standard_normal(clean.shape, dtype=np.float32)
    imag = sigma * rng.standard_normal(clean.shape, dtype=np.float32)
    image = np.sqrt(real * real + imag * imag).astype(np.float32)

    labels = fractions.argmax(axis=-1).astype(np.uint8)
    slice_mm = protocol.slice_mm if dims == 2 else protocol.voxel_mm
    return image, labels, _affine(size, protocol.voxel_mm, slice_mm, nz)


# ---------------------------------------------------------------------------------------------------------
# Sites on disk


def _nifti(data: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    img = nib.Nifti1Image(data, affine)
    img.header.set_zooms(tuple(float(z) for z in np.abs(np.diag(affine)[:3])))
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    return img


def _site_public(
    site_id: str, spec: SiteSpec, dims: int, size: int, counts: dict[str, int]
) -> dict:
    p = spec.protocol
    return {
        "site": site_id,
        "name": spec.name,
        "generator": "fedsynth.common.phantoms",
        "protocol": dataclasses.asdict(p),
        "weighting": weighting(p),
        "lesion_prevalence": spec.lesion_prevalence,
        "dims": dims,
        "shape": [size, size, 1 if dims == 2 else size],
        "spacing_mm": [p.voxel_mm, p.voxel_mm, p.slice_mm if dims == 2 else p.voxel_mm],
        "classes": [c for c in CLASS_NAMES if counts[c] > 0],
        "class_counts": counts,
        "tissue_labels": TISSUES,
    }


def _write_site(
    final: Path,
    spec: SiteSpec,
    key: int,
    prefix: str,
    site_id: str,
    n_subjects: int,
    dims: int,
    size: int,
    seed: int,
) -> dict[str, int]:
    """One folder in the site format (images/, masks/, labels.csv, site.json), atomically; its class counts.

    Subject j draws from SeedSequence(seed, spawn_key=(key, 1 + j)) and the lesion subjects from (key, 0)."""
    class_rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(key, 0)))
    n_lesion = 0
    if spec.lesion_prevalence > 0:
        n_lesion = min(n_subjects, max(1, round(spec.lesion_prevalence * n_subjects)))
    lesion_idx = set(class_rng.choice(n_subjects, size=n_lesion, replace=False).tolist())
    rows = []
    with atomic_dir(final) as tmp:
        (tmp / "images").mkdir()
        (tmp / "masks").mkdir()
        for j in range(n_subjects):
            rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(key, 1 + j)))
            is_lesion = j in lesion_idx
            image, labels, affine = render_subject(
                rng, spec.protocol, dims=dims, size=size, lesion=is_lesion
            )
            subject_id = f"{prefix}-sub{j:04d}"
            nib.save(_nifti(image, affine), tmp / "images" / f"{subject_id}.nii.gz")
            nib.save(_nifti(labels, affine), tmp / "masks" / f"{subject_id}.nii.gz")
            rows.append((subject_id, CLASS_NAMES[1] if is_lesion else CLASS_NAMES[0], site_id))
        with open(tmp / "labels.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["subject_id", "class", "site"])
            writer.writerows(rows)
        counts = {c: sum(r[1] == c for r in rows) for c in CLASS_NAMES}
        public = _site_public(site_id, spec, dims, size, counts)
        (tmp / "site.json").write_text(
            json.dumps(public, indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )
    return counts


def make_phantom_sites(
    out_dir: Path,
    n_sites: int = 3,
    n_subjects: int = 24,
    dims: int = 2,
    size: int = 64,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    specs: Sequence[SiteSpec] | None = None,
) -> list[Path]:
    """Write `out_dir/site-{i}/` (images/, masks/, labels.csv, site.json) per site; each site appears atomically.

    Deterministic for `seed`. A site with prevalence > 0 gets round(prevalence * n_subjects) lesion
    subjects, at least one; a site with prevalence 0 gets none. `specs` overrides default_site_specs.
    """
    if n_subjects < 1:
        raise ValueError(f"n_subjects must be >= 1, got {n_subjects}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    specs = list(specs) if specs is not None else default_site_specs(n_sites)
    out_dir = Path(out_dir)
    site_dirs = []
    for i, spec in enumerate(specs):
        final = out_dir / f"site-{i}"
        counts = _write_site(final, spec, i, f"site{i}", f"site{i}", n_subjects, dims, size, seed)
        site_dirs.append(final)
        if progress is not None:
            progress(
                f"{spec.name}: {n_subjects} subjects ({counts['lesion']} lesion), protocol {spec.protocol.name}"
            )
    return site_dirs


def public_spec() -> SiteSpec:
    """The public set: healthy subjects only, one protocol (PUBLIC_PROTOCOL) that no default site uses."""
    return SiteSpec("public", PROTOCOLS[PUBLIC_PROTOCOL], 0.0)


def make_public_phantoms(
    out_dir: Path, n_subjects: int = 300, dims: int = 2, size: int = 64, seed: int = 0
) -> Path:
    """Write a PUBLIC data folder in the site format at `out_dir` (atomically): what a consortium would download
    from an open collection. It differs from the hospitals the way real public data does: healthy volunteers
    only (lesions exist only at the sites) and one protocol of its own (the sites' protocols exist only at the
    sites). Its draws never coincide with any site's, whatever the seeds."""
    if n_subjects < 1:
        raise ValueError(f"n_subjects must be >= 1, got {n_subjects}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    out_dir = Path(out_dir)
    _write_site(
        out_dir, public_spec(), _PUBLIC_KEY, "public", "public", n_subjects, dims, size, seed
    )
    return out_dir
