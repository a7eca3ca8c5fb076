"""The privacy audit a site runs on a candidate cohort, on its own data; only aggregates leave.

Members are the site's training records, non-members its audit hold-out (never trained on). The site returns:
- memorization: distances from each synthetic image to its nearest member / non-member, summarised coarsely
  (share closer to a member and its permutation test, near-copy count, histograms on fixed bins with at least
  `privacy.memorization.MIN_BIN_COUNT` values per bin) plus the ids of flagged SYNTHETIC images (no patient ids);
  no exact distance, no near-copy threshold, no median: nothing that is a distance between one synthetic image
  and one patient (privacy/memorization.py);
- membership inference: ROC summaries (AUC and its interval, TPR at the fixed FPR points
  `privacy.audit_stats.ROC_FPR_POINTS`, counts; no curve, no score, no threshold) and an empirical epsilon lower
  bound (counts only) and per-member test counts (privacy.audit_stats.per_member_tests) for (a) a white-box loss
  attack on the global model, (b) the same loss calibrated per record against a reference UNet (the one the run
  started from at this site, client/reference.py; paired draws) when the site has one, and (c) a black-box
  distance-to-cohort attack; and the one-run audit of the site's gradient canaries (client/canaries.py);
- fidelity and utility: Frechet distance and precision/recall/density/coverage of radiomics features, and
  train-synthetic-test-real vs train-real-test-real classification (radiomics logistic regression and a small CNN
  with a recipe fixed in advance, privacy/utility.py), with the share of each class's synthetic images that the
  CNN trained on real patients recognises (lesion detectable), rounded to 0.01.
Per-patient scores, features and images stay here: `audit_site` returns a dict of summaries only.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import numpy as np
import torch

from client import canaries, reference
from client.extraction import site_extraction
from client.task import configure_compute, load_training_data, open_ledger, run_privacy_claim
from common.config import ModelConfig, SiteConfig
from common.model import (
    build_autoencoder,
    build_unet,
    ddpm_scheduler,
    decode,
    diffusion_loss,
    encode,
)
from common.site import MIN_PER_SIDE, SiteData
from privacy.audit_schema import MIN_RECORDS
from privacy.audit_stats import (
    empirical_epsilon_lower_bound,
    paired_calibrated_scores,
    per_member_tests,
    roc_summary,
)
from privacy.fidelity import (
    feature_moments,
    frechet_distance,
    precision_recall_coverage,
    radiomics_features,
)
from privacy.memorization import memorization_audit, pairwise_min_distances
from privacy.noise_level import add_rician_noise
from privacy.power import annotate, holdout_power
from privacy.utility import cnn_recipe, cnn_utility, radiomics_utility

log = logging.getLogger("fedsynth.site.audit")
WHITE_BOX_TIMESTEPS = (
    50,
    100,
    200,
    400,
)  # loss attack: low-noise steps are where memorisation shows


@torch.no_grad()
def loss_matrix(
    ae,
    unets: list,
    cfg: ModelConfig,
    data: SiteData,
    latent_scale: float,
    device: torch.device,
    repeats: int = 4,
    seed: int = 0,
) -> list[np.ndarray]:
    """Each record's diffusion loss under each UNet in `unets`, per draw: a list of (records, draws) arrays whose
    column j uses the SAME timestep and noise for every model (paired draws: `WHITE_BOX_TIMESTEPS` x `repeats`).
    Computed and kept at the site."""
    gen = torch.Generator().manual_seed(seed)
    mu, _ = encode(ae, torch.from_numpy(data.images).to(device))
    z = mu * latent_scale
    labels = torch.from_numpy(data.labels).to(device)
    scheduler = ddpm_scheduler(cfg)
    columns: list[list[np.ndarray]] = [[] for _ in unets]
    for t in WHITE_BOX_TIMESTEPS:
        for _ in range(repeats):
            noise = torch.randn(z.shape, generator=gen).to(device)
            ts = torch.full((len(z),), t, device=device, dtype=torch.long)
            for col, unet in zip(columns, unets, strict=True):
                col.append(diffusion_loss(unet, scheduler, z, labels, ts, noise).cpu().numpy())
    return [np.stack(col, axis=1).astype(np.float64) for col in columns]


def loss_scores(
    ae,
    unet,
    cfg: ModelConfig,
    data: SiteData,
    latent_scale: float,
    device: torch.device,
    repeats: int = 4,
    seed: int = 0,
) -> np.ndarray:
    """White-box membership score per record: minus the mean diffusion loss over fixed timesteps and noise draws
    (members of an overfit model have lower loss). Computed and kept at the site."""
    (losses,) = loss_matrix(ae, [unet], cfg, data, latent_scale, device, repeats, seed)
    return -losses.mean(axis=1)


def calibrated_scores(
    ae, unet, reference_unet, cfg, data: SiteData, latent_scale: float, device, repeats: int = 4
) -> tuple[np.ndarray, np.ndarray]:
    """(uncalibrated, calibrated) scores of each record: minus its mean loss under the audited UNet, and its mean
    paired loss difference reference - audited (privacy.audit_stats.paired_calibrated_scores)."""
    target, ref = loss_matrix(ae, [unet, reference_unet], cfg, data, latent_scale, device, repeats)
    return -target.mean(axis=1), paired_calibrated_scores(target, ref)


def _mia(
    member_scores: np.ndarray, nonmember_scores: np.ndarray, delta: float, claimed: float
) -> dict[str, Any]:
    out = roc_summary(member_scores, nonmember_scores)
    bound = empirical_epsilon_lower_bound(member_scores, nonmember_scores, delta=delta)
    # beside the bound: the largest one this many members and non-members could give (privacy/power.py)
    power = holdout_power(len(member_scores), len(nonmember_scores), delta)
    out["epsilon_lower_bound"] = annotate(bound, power, claimed)
    out["per_member"] = per_member_tests(member_scores, nonmember_scores)
    return out


def class_coverage(member_labels, nonmember_labels, class_names) -> dict[str, dict]:
    """How each class was tested for membership, with its counts (nothing is dropped silently):
    "tested": its own attacks rest on MIN_RECORDS+ members and non-members; "pooled": fewer (its own figures are
    shown but not judged), its records count in the all-class attacks; "untestable": members but no non-member
    (or the reverse): no attack can test its members at this site; "absent": no patient of the class."""
    out = {}
    for c, name in enumerate(class_names):
        m, n = int(np.sum(member_labels == c)), int(np.sum(nonmember_labels == c))
        if m == 0:
            status = "absent" if n == 0 else "no members"
        elif n == 0:
            status = "untestable"
        elif min(m, n) < MIN_RECORDS:
            status = "pooled"
        else:
            status = "tested"
        out[name] = {
            "n_members": m,
            "n_nonmembers": n,
            "status": status,
            "min_records": MIN_RECORDS,
        }
    return out


def utility(
    synthetic: np.ndarray,
    synthetic_labels: np.ndarray,
    train: SiteData,
    holdout: SiteData,
    class_names,
    device: torch.device | str = "cpu",
    cnn_steps: int = 0,
) -> dict:
    """Train-synthetic-test-real vs train-real-test-real on the site's hold-out (privacy/utility.py): a logistic
    regression on radiomics features (top level, what the release policy reads) and a small CNN on the images
    (`cnn`, with the share of each class's synthetic images the real-trained CNN recognises, e.g. how many
    lesion-class images show a detectable lesion). Fixed classifiers, never tuned here; coarse figures. `cnn_steps`:
    the CNNs' steps (the site's utility-cnn-steps; 0: the recipe's), named in the `cnn` block's classifier."""
    args = (synthetic, synthetic_labels, train.images, train.labels, holdout.images, holdout.labels)
    recipe = cnn_recipe(np.asarray(synthetic).ndim - 2)  # (N, 1, *spatial)
    return {
        **radiomics_utility(*args),
        "cnn": cnn_utility(
            *args,
            class_names=list(class_names),
            recipe=recipe.fixed(cnn_steps) if cnn_steps else recipe,
            device=device,
        ),
    }


def fidelity(
    synthetic: np.ndarray,
    synthetic_labels: np.ndarray,
    real: SiteData,
    class_names,
    references: dict[str, np.ndarray] | None = None,
) -> dict:
    """Synthetic vs the site's training patients, overall and per class; `references` are other image sets scored
    the same way (e.g. the hold-out patients, and the hold-out patients passed through the autoencoder), so that a
    reader can tell a weak generator from figures that even real images or the autoencoder cannot reach."""
    f_syn, names = radiomics_features(synthetic)
    f_real, _ = radiomics_features(real.images)
    out: dict[str, Any] = {"features": names, "overall": _fid(f_real, f_syn), "per_class": {}}
    for c, name in enumerate(class_names):
        r, s = f_real[real.labels == c], f_syn[synthetic_labels == c]
        if len(r) >= 2 and len(s) >= 2:
            out["per_class"][name] = _fid(r, s)
    out["reference"] = {
        name: _fid(f_real, radiomics_features(images)[0])
        for name, images in (references or {}).items()
    }
    return out


@torch.no_grad()
def autoencoder_reconstructions(
    ae, data: SiteData, latent_scale: float, device: torch.device
) -> np.ndarray:
    """The records passed through the global autoencoder (encode to the latent mean, decode): the best any
    generator working in this latent space could produce for them."""
    mu, _ = encode(ae, torch.from_numpy(data.images).to(device))
    return decode(ae, mu * latent_scale, latent_scale).cpu().numpy()


def _fidelity_references(synthetic, holdout, ae, latent_scale, device, noise_level) -> dict:
    """Image sets scored like the cohort, for scale: the real hold-out and the hold-out through the autoencoder;
    with the scanner noise level this site released under DP in the run (`noise_level`, privacy/noise_level.py),
    also both decoded sets with that noise added (drawn from the site's entropy): the autoencoder denoises and the
    radiomics read the noise, so these say how much of the gap decoding with the site's level would close. The
    released level, not the site's exact one: an exact level would be one more aggregate of its patients."""
    recon = autoencoder_reconstructions(ae, holdout, latent_scale, device)
    out = {"holdout_patients": holdout.images, "holdout_through_autoencoder": recon}
    if noise_level is not None:
        rng = np.random.default_rng()
        out["holdout_through_autoencoder_with_site_noise"] = add_rician_noise(
            recon, float(noise_level), rng
        )
        out["synthetic_with_site_noise"] = add_rician_noise(synthetic, float(noise_level), rng)
    return out


def _fid(real_feats: np.ndarray, synth_feats: np.ndarray) -> dict[str, float]:
    res = {
        "frechet_distance": float(
            frechet_distance(feature_moments(real_feats), feature_moments(synth_feats))
        ),
        "n_real": int(len(real_feats)),
        "n_synthetic": int(len(synth_feats)),
    }
    k = min(5, len(real_feats) - 2, len(synth_feats) - 2)  # prdc needs k + 2 records per set
    if k >= 1:
        res.update(
            {
                k_: float(v)
                for k_, v in precision_recall_coverage(real_feats, synth_feats, k=k).items()
            }
        )
    return res


def audit_site(
    site: SiteConfig,
    cfg: ModelConfig,
    synthetic: np.ndarray,
    synthetic_ids: list[str],
    synthetic_labels: np.ndarray,
    ae_state: dict,
    unet_state: dict,
    latent_scale: float,
    run_id: str = "",
    extraction_samples: int = 0,
    sampler: dict | None = None,
    noise_level: float | None = None,
) -> dict[str, Any]:
    """Everything the site computes about a candidate cohort; the result holds aggregates only.

    The claimed privacy is that of run `run_id`'s patients (client/task.py run_privacy_claim): "none" when the
    site's ledger has no entry for the run. Members are the patients that run trained on (all training patients
    when the ledger has no entry for it); non-members are the persisted hold-out, never trained on.

    `extraction_samples`: samples the site draws itself from the model for the extraction search
    (client/extraction.py; capped by the site's max-extraction-samples), with `sampler` ({steps, guidance_scale}:
    the cohort's, from its manifest; default the preset's steps, no guidance); images it flags among the released
    cohort join the memorization flags (they are withheld like near-copies)."""
    device = configure_compute(site)
    stages = _Stages(site.name)
    ledger = open_ledger(site)
    train, holdout = load_training_data(site, cfg, ledger)
    in_run = ledger.patients_of(run_id) if run_id else set()
    if (
        in_run
    ):  # members: the patients this run trained on (not newcomers assigned to training since)
        train = train.with_patients(in_run)
    if len(train) < MIN_PER_SIDE or len(holdout) < MIN_PER_SIDE:
        raise ValueError(
            f"site {site.name}: needs >= {MIN_PER_SIDE} training and >= {MIN_PER_SIDE} hold-out patients to "
            f"audit (has {len(train)} and {len(holdout)})"
        )
    privacy = run_privacy_claim(site, ledger, run_id)
    delta = float(privacy["delta"])
    claimed = math.inf if privacy.get("epsilon") is None else float(privacy["epsilon"])
    log.info(
        "site %s: auditing %d synthetic images against %d members and %d non-members",
        site.name,
        len(synthetic),
        len(train),
        len(holdout),
    )
    stages.done("data")
    mem = memorization_audit(
        synthetic,
        list(synthetic_ids),
        train.images,
        holdout.images,
        synthetic_labels=synthetic_labels,
        member_labels=train.labels,
        nonmember_labels=holdout.labels,
        class_names=list(cfg.class_names),
    )
    stages.done("memorization")
    ae, unet = build_autoencoder(cfg), build_unet(cfg)
    ae.load_state_dict(ae_state)
    unet.load_state_dict(unet_state)
    ae, unet = ae.to(device).eval(), unet.to(device).eval()
    extraction = site_extraction(
        site,
        cfg,
        ae,
        unet,
        latent_scale,
        device,
        synthetic,
        list(synthetic_ids),
        train,
        holdout,
        extraction_samples,
        **(sampler or {}),
    )
    mem["extraction"] = extraction
    mem["flagged_ids"] = sorted(set(mem["flagged_ids"]) | set(extraction["flagged_ids"]))
    mem["n_near_copies"] = len(mem["flagged_ids"])
    stages.done("extraction")
    # The calibrated attack's reference: the UNet this run started from at this site (client/reference.py); it
    # never saw the site's records, so every hold-out patient stays a non-member of the test.
    ref_state = reference.load(site, run_id) if run_id else None
    ref_unet, ref_problem = None, ""
    if ref_state is not None:
        ref_unet = build_unet(cfg)
        try:
            ref_unet.load_state_dict(ref_state)
            ref_unet = ref_unet.to(device).eval()
        except (
            RuntimeError
        ) as err:  # a reference of another architecture: no calibrated attack, and why
            ref_unet, ref_problem = (
                None,
                f"the site's reference model does not fit this checkpoint ({err})",
            )
    if ref_unet is not None:
        white_m, cal_m = calibrated_scores(ae, unet, ref_unet, cfg, train, latent_scale, device)
        white_n, cal_n = calibrated_scores(ae, unet, ref_unet, cfg, holdout, latent_scale, device)
    else:
        white_m = loss_scores(ae, unet, cfg, train, latent_scale, device)
        white_n = loss_scores(ae, unet, cfg, holdout, latent_scale, device)
    # Black box: a record close to some synthetic image is guessed "member" (score = minus the distance).
    black_m = -pairwise_min_distances(train.images, synthetic)[0]
    black_n = -pairwise_min_distances(holdout.images, synthetic)[0]
    scores = {"white_box": (white_m, white_n), "black_box": (black_m, black_n)}
    if ref_unet is not None:
        scores["calibrated"] = (cal_m, cal_n)
    membership: dict[str, Any] = {
        kind: _mia(m_, n_, delta, claimed) for kind, (m_, n_) in scores.items()
    }
    if ref_unet is None:
        membership["calibrated_unavailable"] = ref_problem[:300] or (
            "no reference model at this site for this run (a site keeps the UNet it first receives in a run's "
            "diffusion phase, client/reference.py): the calibrated attack was not run"
        )
    per_class: dict[str, Any] = {}
    for c, name in enumerate(cfg.class_names):
        m, n = train.labels == c, holdout.labels == c
        if m.sum() >= 1 and n.sum() >= 1:
            per_class[name] = {
                kind: _mia(m_[m], n_[n], delta, claimed) for kind, (m_, n_) in scores.items()
            }
    membership["per_class"] = per_class
    membership["class_coverage"] = class_coverage(train.labels, holdout.labels, cfg.class_names)
    # One-run canary audit (client/canaries.py): the gradient canaries' movement from the run's starting UNet (the
    # reference above, kept by the site when the run began) to the audited one.
    membership["canaries"] = canaries.audit_canaries(
        canaries.load(site),
        unet,
        unet_state,
        ref_state if ref_unet is not None else None,
        delta,
        claimed,
    )
    stages.done("membership")
    fid = fidelity(
        synthetic,
        synthetic_labels,
        train,
        cfg.class_names,
        references=_fidelity_references(synthetic, holdout, ae, latent_scale, device, noise_level),
    )
    stages.done("fidelity")
    util = utility(
        synthetic,
        synthetic_labels,
        train,
        holdout,
        cfg.class_names,
        device,
        cnn_steps=site.utility_cnn_steps,
    )
    stages.done("utility")
    return {
        "site": site.name,
        "n_members": int(len(train)),
        "n_nonmembers": int(len(holdout)),
        "claimed_privacy": privacy,
        "memorization": mem,
        "membership": membership,
        "fidelity": fid,
        "utility": util,
        "seconds": stages.seconds,
    }


class _Stages:
    """Seconds per stage of a site's audit, logged as each ends: an audit takes minutes, and the site's operator
    (and the audit.json) see where they went."""

    def __init__(self, site: str):
        self.site, self.seconds, self.start = site, {}, time.monotonic()

    def done(self, stage: str) -> None:
        now = time.monotonic()
        self.seconds[stage] = round(now - self.start, 1)
        self.start = now
        log.info("site %s: audit stage %s done in %.1f s", self.site, stage, self.seconds[stage])
