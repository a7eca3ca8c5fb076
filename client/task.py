"""What a site does in one training round: load its own scans, plan the DP mechanism against its privacy ledger,
train the autoencoder or the latent diffusion UNet with Opacus DP-SGD, and say what it spent.

Nothing here sends anything: `client_app.py` turns the returned `RoundResult` into a Flower reply.
Privacy is per patient: the site loader yields one record (slice or volume) per patient and DP-SGD samples
records with Poisson sampling, so a step's sampling rate is a patient's probability of being in the batch.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

from client import canaries, replay
from common.config import ModelConfig, SiteConfig, model_config
from common.messages import RoundPlan
from common.model import (
    autoencoder_loss,
    build_autoencoder,
    build_unet,
    ddpm_scheduler,
    diffusion_loss,
    drop_labels,
    encode,
    lesion_weight_map,
    select_trainable,
)
from common.site import (
    SiteData,
    assign_holdout,
    load_lesion_masks,
    load_site,
    split_by_assignment,
)
from privacy.accounting import (
    MechanismStep,
    calibrate_noise_multiplier,
    default_delta,
    epsilon_for,
)
from privacy.dp import batch_loss, make_private, sample_rate_of
from privacy.ledger import LEDGER_FILENAME, NO_DP, PrivacyLedger
from privacy.noise_level import (
    NoiseLevelRelease,
    patient_noise_levels,
    release_noise_level,
    release_step,
)
from privacy.sampling import patient_loader

log = logging.getLogger("fedsynth.site")
# the ledger phase of a noise-level release (privacy/noise_level.py); it shares the round number of the diffusion
# round that makes it
NOISE_LEVEL_PHASE = "noise-level"


@dataclass(frozen=True)
class DPPlan:
    """The mechanism a site will run this round, decided before any record is touched."""

    enabled: bool
    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float
    delta: float
    accountant: str
    epsilon_before: float
    epsilon_after: float
    epsilon_budget: float
    # this round also releases the site's noise level (one Gaussian mechanism over every training patient)
    noise_level: bool = False

    @property
    def protection(self) -> str:
        if not self.enabled:
            return "none"
        return f"formal sample-level DP per patient ({self.accountant.upper()} accountant, delta={self.delta:.2e})"


@dataclass
class RoundResult:
    site_name: str
    refused: str = ""  # non-empty: the site declined the round, and why
    state_dict: dict[str, torch.Tensor] | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    privacy: dict[str, Any] = field(default_factory=dict)
    # the reply this site released for the round before, sent again (client/replay.py)
    replayed: bool = False


def round_seed(site: SiteConfig, plan: RoundPlan) -> int:
    """The seed of the round's other randomness (the loss's timesteps and noise, the class dropout of classifier-free
    guidance, the autoencoder's sampling).

    Under DP it is the site's own (OS entropy), not the server's: those draws are consumed batch position by batch
    position, so with a stream the server knows, one patient's presence would shift the draws of every patient
    after it and their gradients would move by more than the clipping norm. Drawn fresh and unknown, they are
    exchangeable and the DP-SGD analysis holds. (Noise and Poisson sampling have their own generators:
    privacy/dp.py.) Without DP (experiments, no claim) the server's seed makes the round reproducible.
    """
    return secrets.randbits(63) if site.dp else plan.seed * 1_000_003 + plan.server_round


def configure_compute(site: SiteConfig) -> torch.device:
    if site.threads > 0:
        torch.set_num_threads(site.threads)
    return select_device(site.device)


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_training_data(
    site: SiteConfig, cfg: ModelConfig, ledger: PrivacyLedger | None = None
) -> tuple[SiteData, SiteData]:
    """The site's records split by PATIENT into (train, audit hold-out); the hold-out is never trained on.

    Each patient's side is decided once, when the patient first appears, and persisted in the privacy ledger:
    a later change of `holdout-fraction` only affects new patients, so a patient once trained on is never a
    non-member later."""
    data = load_site(
        site.site_dir,
        class_names=cfg.class_names,
        spatial_dims=cfg.spatial_dims,
        image_size=cfg.image_size,
    )
    for problem in data.problems:
        log.warning("site %s: %s", site.name, problem)
    ledger = ledger or open_ledger(site)
    known = ledger.assignments()
    side = assign_holdout(data, site.holdout_fraction, known=known)
    trained = ledger.trained_patients()
    if any(
        side[p] == "holdout" for p in trained if p in side
    ):  # only a hand-edited ledger gets here
        raise ValueError(
            f"{ledger.path}: a patient trained on is assigned to the hold-out; refusing"
        )
    ledger.assign({p: s for p, s in side.items() if p not in known}, site.holdout_fraction)
    return split_by_assignment(data, side)


def accounting_delta(site: SiteConfig, ledger: PrivacyLedger, n_patients: int) -> float:
    """The site's delta (configured, or the default for its patient count), never larger than one it already
    planned a round at: with the default, patients joining or leaving would otherwise move delta and with it the
    epsilon of past spend, and a budget spent at one delta could be spent again at a looser one."""
    delta = site.delta or default_delta(max(1, n_patients))
    before = ledger.min_delta()
    return delta if before is None else min(delta, before)


def open_ledger(site: SiteConfig) -> PrivacyLedger:
    """The site's ledger (keyed by nothing but the site's state folder: renaming the site keeps its history)."""
    site.state_path.mkdir(parents=True, exist_ok=True)
    return PrivacyLedger(site.state_path / LEDGER_FILENAME)


def steps_per_round(n_patients: int, plan: RoundPlan) -> tuple[float, int]:
    """Patient sampling rate and DP-SGD steps of one local round: q = 1 / ceil(P / B), ceil(P / B) steps/epoch,
    run exactly (privacy/sampling.py), so the mechanism run is the one the ledger records."""
    batches = max(1, math.ceil(n_patients / plan.batch_size))
    return 1.0 / batches, batches * plan.local_epochs


def noise_level_due(ledger: PrivacyLedger, plan: RoundPlan) -> bool:
    """Whether the run asks for this site's noise level and has not had it yet: no release of it in this run whose
    round's update left the site (one whose round crashed before its update left released nothing: it is made, and
    charged, again)."""
    if not plan.release_noise_level:
        return False
    return not any(
        e["run_id"] == plan.run_id
        and e["phase"] == NOISE_LEVEL_PHASE
        and ledger.release_of(plan.run_id, e["server_round"], "diffusion") is not None
        for e in ledger.entries()
    )


def plan_privacy(
    site: SiteConfig, ledger: PrivacyLedger, train: SiteData, plan: RoundPlan
) -> tuple[DPPlan | None, str]:
    """Calibrate this round's noise so the whole remaining run fits the budget of EVERY patient in it, given each
    one's past spend (the worst patient decides), and refuse a round that would take any patient past it. A noise-level
    release the run still owes is part of the remaining run: planned from the first round, made in the first
    diffusion round (`DPPlan.noise_level`).

    Returns (plan, "") or (None, reason to refuse).
    """
    patients = train.patients
    q, steps = steps_per_round(len(patients), plan)
    delta = accounting_delta(site, ledger, len(patients))
    due = noise_level_due(ledger, plan)
    release_now = due and plan.phase == "diffusion"
    if not site.dp:
        return DPPlan(
            False,
            0.0,
            q,
            steps,
            site.max_grad_norm,
            delta,
            "none",
            0.0,
            math.inf,
            math.inf,
            release_now,
        ), ""
    reserved = [release_step(site.noise_level_multiplier)] if due else []
    past = ledger.histories(patients)
    worst_now = max(epsilon_for(h, delta, site.accountant) for h in past)
    eps_now = ledger.epsilon(delta, site.accountant)
    if math.isinf(worst_now):
        return None, (
            "privacy budget: patients in this round were already trained without DP (or with no finite "
            "guarantee), so no DP claim can be made for them; train them only with dp=false, or remove them"
        )
    remaining_steps = steps * plan.remaining_rounds
    try:
        sigma = max(
            calibrate_noise_multiplier(
                site.epsilon,
                delta,
                q,
                remaining_steps,
                accountant=site.accountant,
                prior=list(h) + reserved,
                max_noise=site.max_noise_multiplier,
            )
            for h in past
        )
    except ValueError as err:
        return (
            None,
            f"privacy budget: {err} (worst patient in this round has spent epsilon={worst_now:.3f} of "
            f"{site.epsilon} at delta={delta:.2e})",
        )
    this_round = [MechanismStep(noise_multiplier=sigma, sample_rate=q, steps=steps)] + reserved
    decision = ledger.check_budget(this_round, patients, site.epsilon, delta, site.accountant)
    if not decision.allowed:
        return None, decision.reason
    return (
        DPPlan(
            True,
            sigma,
            q,
            steps,
            site.max_grad_norm,
            delta,
            site.accountant,
            eps_now,
            decision.epsilon_after,
            site.epsilon,
            release_now,
        ),
        "",
    )


def _train_loop(
    module: torch.nn.Module,
    dataset: TensorDataset,
    plan: RoundPlan,
    dp: DPPlan,
    loss_fn: Callable[[torch.nn.Module, tuple[torch.Tensor, ...]], torch.Tensor],
    device: torch.device,
    grad_sample_mode: str = "bookkeeping",
    groups: list[list[int]] | None = None,
    canary_set: canaries.CanaryState | None = None,
) -> dict[str, float]:
    """Local DP-SGD (Opacus, Poisson sampling of patients) for `plan.local_epochs` epochs; returns mean loss and
    step count. `groups`: each patient's record indices (default: one record per patient); a sampled patient
    contributes one of its records, chosen at random.

    `grad_sample_mode`: how the clipped per-sample gradients are computed (privacy/dp.py make_private).
    `canary_set`: the site's gradient canaries, trained on with the patients (client/canaries.py attach)."""
    module.to(device).train()
    global_params = [p.detach().clone() for p in module.parameters()]
    # only the trainable parameters (common/model.py select_trainable); frozen ones keep the global values
    optimizer = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=plan.lr)
    groups = groups or [[i] for i in range(len(dataset))]
    if dp.steps % plan.local_epochs:
        raise ValueError(f"planned {dp.steps} steps do not split into {plan.local_epochs} epochs")
    # exactly the planned rate and steps (Opacus' own loader can run one step fewer than it was asked for);
    # under DP, make_private gives its sampler a generator seeded from the site's OS entropy
    loader = patient_loader(dataset, groups, dp.sample_rate, dp.steps // plan.local_epochs)
    if dp.enabled:
        module, optimizer, loader = make_private(
            module,
            optimizer,
            loader,
            noise_multiplier=dp.noise_multiplier,
            max_grad_norm=dp.max_grad_norm,
            grad_sample_mode=grad_sample_mode,
        )
        if sample_rate_of(loader) != dp.sample_rate or len(loader) != dp.steps // plan.local_epochs:
            raise RuntimeError(
                f"the private loader samples at {sample_rate_of(loader)} for {len(loader)} steps per epoch, "
                f"not the planned and recorded {dp.sample_rate} for {dp.steps // plan.local_epochs}"
            )
    canaries.attach(
        optimizer,
        _unwrap(module),
        canary_set,
        dp.sample_rate,
        dp.max_grad_norm,
        max(1, int(len(groups) * dp.sample_rate)),
    )
    losses, steps = [], 0
    for _ in range(plan.local_epochs):
        for batch in loader:
            batch = tuple(t.to(device) for t in batch)
            optimizer.zero_grad(set_to_none=True)
            if (
                len(batch[0]) == 0
            ):  # Poisson sampling can draw an empty batch: the step still adds noise
                _empty_step(module, optimizer)
            else:
                loss = batch_loss(
                    optimizer, loss_fn(module, batch)
                )  # the batch mean (Opacus' wrapper in ghost mode)
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
            if (
                plan.proximal_mu > 0
            ):  # FedProx: a data-independent pull towards the global model (no privacy cost)
                with torch.no_grad():
                    for p, g in zip(module.parameters(), global_params, strict=False):
                        p.sub_(plan.lr * plan.proximal_mu * (p - g))
            steps += 1
    if steps != dp.steps:
        raise RuntimeError(f"ran {steps} DP-SGD steps but planned and recorded {dp.steps}")
    return {"loss": sum(losses) / max(1, len(losses)), "steps": float(steps)}


def _empty_step(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """An empty Poisson batch: zero per-sample gradients, so the DP optimizer releases pure noise as DP-SGD requires.

    (hooks mode reads `grad_sample`, ghost mode `grad`; bookkeeping mode sees no forward pass: zero as well.)"""
    for p in module.parameters():
        if p.requires_grad:
            p.grad_sample = torch.zeros((0,) + tuple(p.shape), device=p.device, dtype=p.dtype)
            p.grad = torch.zeros_like(p)
    optimizer.step()


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    return getattr(module, "_module", module)


def run_training_round(
    site: SiteConfig,
    plan: RoundPlan,
    arrays: dict[str, torch.Tensor],
    autoencoder_arrays: dict[str, torch.Tensor] | None = None,
) -> RoundResult:
    """One round at one site. `arrays` is the component to train; in the diffusion phase `autoencoder_arrays` is the
    frozen global autoencoder used to encode the site's images.

    A round this site already released an update for (same run id, round and phase) is not trained again: the
    same request gets the same reply, a different one a refusal (client/replay.py)."""
    t0 = time.time()
    cfg = model_config(plan.preset)
    ledger = open_ledger(site)
    request = replay.request_json(plan, arrays, autoencoder_arrays)
    try:
        kept, reason = replay.kept_reply(site, ledger, plan, request), ""
    except (
        replay.NotReplayable
    ) as err:  # released once, and this request cannot be answered: refused below
        kept, reason = None, str(err)
    if kept is not None:
        log.info(
            "site %s round %d %s: released before (ledger mechanism %d); the same update sent again, "
            "nothing trained, nothing spent",
            site.name,
            plan.server_round,
            plan.phase,
            kept.mechanism_id,
        )
        return RoundResult(
            site.name,
            state_dict=kept.state_dict,
            metrics=kept.metrics,
            privacy=kept.privacy,
            replayed=True,
        )
    device = configure_compute(site)
    torch.manual_seed(round_seed(site, plan))
    train, holdout = load_training_data(site, cfg, ledger)
    dp = None
    if not reason:
        dp, reason = plan_privacy(site, ledger, train, plan)
    if dp is None:
        log.warning("site %s refuses round %d: %s", site.name, plan.server_round, reason)
        return RoundResult(
            site.name,
            refused=reason,
            privacy=privacy_summary(site, ledger, train, None, plan.run_id),
        )

    # The spend, and which patients it covers, is committed before any record touches the mechanism: a crash
    # from here on can only over-count. A round without DP is recorded too: its patients lose any guarantee.
    mechanism_id = ledger.record(
        run_id=plan.run_id,
        server_round=plan.server_round,
        phase=plan.phase,
        noise_multiplier=dp.noise_multiplier if dp.enabled else 0.0,
        sample_rate=dp.sample_rate,
        steps=dp.steps,
        clipping_norm=dp.max_grad_norm,
        accountant=dp.accountant if dp.enabled else NO_DP,
        delta=dp.delta,
        patients=train.patients,
    )
    noise_level = _release_noise_level(site, ledger, plan, dp, train) if dp.noise_level else None
    # One-run audit canaries (client/canaries.py): gradient canaries in the diffusion UNet, one sampling unit each,
    # drawn at the patients' rate and added to the clipped, noised sum; the rate, steps and noise above come from
    # the patient count alone, so no patient's mechanism depends on them.
    canary_set = canaries.load_or_create(site, len(train.patients), dp.delta)
    groups = train.records_by_patient()
    images = torch.from_numpy(train.images)
    labels = torch.from_numpy(train.labels)
    if plan.phase == "autoencoder":
        module: torch.nn.Module = build_autoencoder(cfg)
        module.load_state_dict(arrays)
        trainable, total = select_trainable(module, plan.dp_trainable_autoencoder)
        log.info(
            "site %s: DP training %s of the autoencoder: %d of %d parameters (%.1f %%)",
            site.name,
            plan.dp_trainable_autoencoder,
            trainable,
            total,
            100.0 * trainable / total,
        )
        dataset = TensorDataset(images)
        stats = _train_loop(
            module,
            dataset,
            plan,
            dp,
            lambda m, b: autoencoder_loss(m, b[0], plan.kl_weight),
            device,
            site.grad_sample_mode,
            groups,
        )
    else:
        if autoencoder_arrays is None:
            raise ValueError("diffusion phase needs the global autoencoder")
        ae = build_autoencoder(cfg)
        ae.load_state_dict(autoencoder_arrays)
        ae.to(device).eval()
        mu, sigma = encode(ae, images.to(device))
        module = build_unet(cfg)
        module.load_state_dict(arrays)
        # DP-SGD on the chosen parameters only (the rest frozen, returned unchanged); same accounting for any set
        trainable, total = select_trainable(module, plan.dp_trainable)
        log.info(
            "site %s: DP fine-tuning %s of the UNet: %d of %d parameters (%.1f %%)",
            site.name,
            plan.dp_trainable,
            trainable,
            total,
            100.0 * trainable / total,
        )
        scheduler = ddpm_scheduler(cfg)
        scale = plan.latent_scale

        def loss(m: torch.nn.Module, b: tuple[torch.Tensor, ...]) -> torch.Tensor:
            z = (b[0] + b[1] * torch.randn_like(b[0])) * scale
            # classifier-free guidance: drawn from the round's generator, seeded from the site's OS entropy
            # under DP (round_seed), like the latent sample, the timesteps and the noise
            y = drop_labels(b[2], plan.class_dropout, cfg.null_class)
            return diffusion_loss(m, scheduler, z, y, weight=b[3])

        weights = lesion_weights(site, train, cfg, plan.lesion_weight)
        dataset = TensorDataset(mu.cpu(), sigma.cpu(), labels, weights)
        stats = _train_loop(
            module, dataset, plan, dp, loss, device, site.grad_sample_mode, groups, canary_set
        )
    state = {k: v.detach().cpu() for k, v in _unwrap(module).state_dict().items()}
    seconds = time.time() - t0
    metrics = {
        "num-examples": len(train),
        "loss": stats["loss"],
        "steps": stats["steps"],
        "seconds": seconds,
    }
    if noise_level is not None:
        metrics.update({"noise-level": noise_level.sigma, "noise-level-std": noise_level.std})
    privacy = privacy_summary(site, ledger, train, dp, plan.run_id)
    metrics.update({"epsilon": privacy["epsilon"], "delta": privacy["delta"]})
    log.info(
        "site %s round %d %s: loss %.4f, %d steps, epsilon %.3f, %.1fs",
        site.name,
        plan.server_round,
        plan.phase,
        stats["loss"],
        stats["steps"],
        privacy["epsilon"],
        seconds,
    )
    del holdout
    # kept, and its release in the ledger, before the update can leave: a repeated request gets this same reply
    replay.keep(site, ledger, mechanism_id, plan, request, state, metrics, privacy)
    return RoundResult(site.name, state_dict=state, metrics=metrics, privacy=privacy)


def _release_noise_level(
    site: SiteConfig, ledger: PrivacyLedger, plan: RoundPlan, dp: DPPlan, train: SiteData
) -> NoiseLevelRelease:
    """The site's scanner noise level, released under DP (privacy/noise_level.py): charged to every training patient
    in the ledger (as planned by plan_privacy) before anything is computed, so a crash can only over-count. Without
    DP (experiments) the exact level, recorded without a guarantee."""
    multiplier = site.noise_level_multiplier if dp.enabled else 0.0
    ledger.record(
        run_id=plan.run_id,
        server_round=plan.server_round,
        phase=NOISE_LEVEL_PHASE,
        noise_multiplier=multiplier,
        sample_rate=1.0,
        steps=1,
        clipping_norm=site.noise_level_clip,
        accountant=dp.accountant if dp.enabled else NO_DP,
        delta=dp.delta,
        patients=train.patients,
    )
    levels, unusable = patient_noise_levels(train.images, train.records_by_patient())
    release = release_noise_level(levels, site.noise_level_clip, multiplier)
    log.info(
        "site %s: noise level %.4f released (DP noise std %.4f; %d of %d patients without a usable background)",
        site.name,
        release.sigma,
        release.std,
        unusable,
        len(levels),
    )
    return release


def lesion_weights(
    site: SiteConfig, train: SiteData, cfg: ModelConfig, lesion_weight: float
) -> torch.Tensor:
    """Each training record's diffusion-loss weights (common/model.py lesion_weight_map) from its own lesion
    mask in the site's masks/ folder; all ones with `lesion_weight` 0 and for healthy-class records (their masks
    are not read). A record without a usable mask trains with the plain loss; lesion-class patients without one are
    counted in the log, an unreadable mask is named."""
    shape = (len(train), 1) + (cfg.latent_size,) * cfg.spatial_dims
    if lesion_weight == 0:
        return torch.ones(shape)
    # only lesion-class records are read: a healthy record's weights are 1 whatever its mask holds
    lesion = cfg.class_names.index("lesion") if "lesion" in cfg.class_names else -1
    rows = [i for i, y in enumerate(train.labels) if y == lesion]
    found, problems = load_lesion_masks(
        site.site_dir,
        [train.subject_ids[i] for i in rows],
        spatial_dims=cfg.spatial_dims,
        image_size=cfg.image_size,
    )
    for problem in problems:
        log.warning("site %s: %s", site.name, problem)
    unmasked = sum(m is None for m in found)
    if unmasked:
        log.warning(
            "site %s: %d lesion-class records have no lesion mask in %s/masks/: they train with the plain "
            "diffusion loss (add masks/<subject_id>.nii.gz to weight their lesions)",
            site.name,
            unmasked,
            site.site_dir,
        )
    weights = torch.ones(shape)
    masked = [(i, m) for i, m in zip(rows, found, strict=True) if m is not None]
    if masked:
        stacked = torch.from_numpy(np.stack([m for _, m in masked]))
        weights[[i for i, _ in masked]] = lesion_weight_map(stacked, cfg.latent_size, lesion_weight)
    return weights


def _protection(accountant: str, delta: float) -> str:
    return (
        f"formal sample-level DP per patient ({accountant.upper()} accountant, delta={delta:.2e})"
    )


def privacy_summary(
    site: SiteConfig,
    ledger: PrivacyLedger,
    train: SiteData,
    dp: DPPlan | None,
    run_id: str = "",
) -> dict[str, Any]:
    """What the site reports about its spend: the WORST spend of the patients in run `run_id` and in this
    round's training set, each composed over every mechanism they were ever in (whatever run, site name or
    hold-out fraction), labelled with the protection. At the end of a run it equals the audit-time claim of that
    run (`run_privacy_claim`)."""
    patients = ledger.patients_of(run_id) | set(train.patients) if run_id else set(train.patients)
    delta = accounting_delta(site, ledger, len(train.patients))
    eps = ledger.epsilon(delta, site.accountant, patients) if site.dp else math.inf
    history = max(ledger.histories(patients), key=lambda h: sum(s.steps for s in h))
    last = ledger.entries()[-1] if ledger.entries() else None
    return {
        "site": site.name,
        "protection": _protection(site.accountant, delta)
        if site.dp and math.isfinite(eps)
        else "none",
        "epsilon": eps,
        "epsilon_budget": site.epsilon,
        "delta": delta,
        "accountant": site.accountant,
        "noise_multiplier": dp.noise_multiplier
        if dp
        else (last["noise_multiplier"] if last else 0.0),
        "sample_rate": dp.sample_rate if dp else (last["sample_rate"] if last else 0.0),
        "steps_total": sum(s.steps for s in history),
        "clipping_norm": site.max_grad_norm,
        "patients_trained_on": len(train.patients),
    }


def run_privacy_claim(site: SiteConfig, ledger: PrivacyLedger, run_id: str) -> dict[str, Any]:
    """The privacy claim for a checkpoint of run `run_id`, at audit time: the worst spend of the patients that
    run trained on, composed over every mechanism they were in up to the run's last one (`epsilon`; their spend
    to date is `epsilon_to_date`). "none" when the ledger has no entry for the run, or the run trained without
    DP: never "formal DP, epsilon 0"."""
    last = ledger.last_mechanism_of(run_id)
    patients = ledger.patients_of(run_id)
    base = {"site": site.name, "run_id": str(run_id), "epsilon_budget": site.epsilon}
    if last is None:
        delta = accounting_delta(site, ledger, len(ledger.trained_patients()))
        return {
            **base,
            "protection": "none",
            "epsilon": math.inf,
            "delta": delta,
            "accountant": "none",
            "note": "the site's privacy ledger has no entry for this run",
        }
    runs = [m for m in ledger.entries() if m["run_id"] == str(run_id)]
    delta = ledger.min_delta(
        up_to=int(last["id"])
    )  # what the run's last round was planned and claimed at
    if any(m["accountant"] == NO_DP for m in runs):
        return {
            **base,
            "protection": "none",
            "epsilon": math.inf,
            "delta": delta,
            "accountant": "none",
            "note": "this run trained without DP at this site",
        }
    accountant = runs[-1]["accountant"]
    return {
        **base,
        "protection": _protection(accountant, delta),
        "epsilon": ledger.epsilon(delta, accountant, patients, up_to=int(last["id"])),
        "epsilon_to_date": ledger.epsilon(delta, accountant, patients),
        "delta": delta,
        "accountant": accountant,
        "noise_multiplier": float(last["noise_multiplier"]),
        "sample_rate": float(last["sample_rate"]),
        "steps_total": sum(int(m["steps"]) for m in runs),
        "clipping_norm": float(last["clipping_norm"]),
    }
