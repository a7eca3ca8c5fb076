"""The latent diffusion model: MONAI AutoencoderKL + class-conditional DiffusionModelUNet, DDPM training, DDIM sampling.

Images live in [0, 1]; the diffusion model works on `latent_scale * z` where z is the autoencoder's latent mean.
Per-sample losses are returned (shape (B,)) so DP-SGD can clip per record and audits can score per record.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
import torch.nn.functional as F
from monai.networks.nets import AutoencoderKL, DiffusionModelUNet
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

from common.config import AE_TRAINABLE, DP_TRAINABLE, ModelConfig

SCHEDULE = dict(schedule="scaled_linear_beta", beta_start=0.0015, beta_end=0.0195)


# The encoder's posterior starts at sigma exp(-1.5) = 0.22 (log-variance -3), not MONAI's sigma 1. With the small KL
# weight of latent diffusion (1e-6) nothing pulls sigma down but the reconstruction's weak gradient through the noise,
# so in the few hundred steps a CPU consortium affords it stays where it starts. From sigma 1 the demo's public
# autoencoder still had sigma 0.79 against a latent std of 0.87 after 400 steps: the decoder ignored most of the
# latent (reconstruction MSE 0.018, a blurred average head) and the UNet learnt latents that were mostly noise.
# From sigma 0.007 (log-variance -10) the same 400 steps reached MSE 0.0055 and sigma had drifted up to 0.25; but a
# decoder trained with almost no latent noise is brittle: in tests/client/test_class_conditional.py (150 steps)
# the UNet's small errors decoded to bright noise in 17 % of brain pixels of HEALTHY samples and the lesion class
# no longer stood out (1.3x). Starting near where sigma settles keeps both: that test passes, and the demo's
# 400-step public autoencoder reaches MSE 0.0052 (sigma 0.28) from this start.
INITIAL_LOG_VARIANCE = -3.0


def build_autoencoder(cfg: ModelConfig) -> AutoencoderKL:
    n = len(cfg.ae_channels)
    ae = AutoencoderKL(
        spatial_dims=cfg.spatial_dims,
        in_channels=1,
        out_channels=1,
        channels=cfg.ae_channels,
        num_res_blocks=(cfg.ae_res_blocks,) * n,
        attention_levels=(False,) * n,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.ae_norm_groups,
        with_encoder_nonlocal_attn=False,
        with_decoder_nonlocal_attn=False,
    )
    log_var = ae.quant_conv_log_sigma.conv
    with torch.no_grad():
        log_var.weight.zero_()
        log_var.bias.fill_(INITIAL_LOG_VARIANCE)
    return ae


def build_unet(cfg: ModelConfig) -> DiffusionModelUNet:
    n = len(cfg.unet_channels)
    return DiffusionModelUNet(
        spatial_dims=cfg.spatial_dims,
        in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels,
        channels=cfg.unet_channels,
        attention_levels=cfg.unet_attention,
        num_res_blocks=(cfg.unet_res_blocks,) * n,
        norm_num_groups=cfg.unet_norm_groups,
        num_head_channels=cfg.unet_head_channels,
        # one embedding per class plus the null class (index cfg.null_class) of classifier-free guidance
        num_class_embeds=cfg.num_classes + 1,
    )


def init_unseen_classes(
    unet: DiffusionModelUNet, class_counts: list[int], null_class: int
) -> list[int]:
    """Give every class the training data never showed the null (unconditional) class's embedding; returns them.

    Pretraining on public data that lacks a class (the demo's public set has no lesions) leaves that class's
    embedding at its random initialisation: a label the UNet has never seen, which makes lesion images LESS likely
    under their own label than under "healthy" and must first be undone by DP fine-tuning's few noisy steps. Starting
    it at the null class (the public data's unconditional model) makes the unseen label mean "no information yet":
    the sites' DP-SGD then only has to move it towards what the class looks like. Uses only public class counts."""
    unseen = [c for c, n in enumerate(class_counts) if n == 0]
    with torch.no_grad():
        for c in unseen:
            unet.class_embedding.weight[c] = unet.class_embedding.weight[null_class]
    return unseen


# DP-LDM's trainable set: every attention block (its GroupNorm, q, k, v, output projection), the class embedding,
# the time-embedding MLP and each ResBlock's projection of the time + class embedding into its features.
_ATTENTION_CONDITIONING = re.compile(
    r"^(time_embed|class_embedding)\.|(^|\.)(attentions\.\d+|attention)\.|\.time_emb_proj\."
)


def trainable_names(model: torch.nn.Module, which: str) -> list[str]:
    """The names of the parameters trained under `which`: a UNet set (common/config.py DP_TRAINABLE) for the
    diffusion UNet, an autoencoder set (AE_TRAINABLE) for the autoencoder."""
    names = [n for n, _ in model.named_parameters()]
    autoencoder = isinstance(model, AutoencoderKL)
    choices = AE_TRAINABLE if autoencoder else DP_TRAINABLE
    if which not in choices:
        what = "dp-trainable-autoencoder" if autoencoder else "dp-trainable"
        raise ValueError(f"{what}: unknown {which!r}; choose one of {list(choices)}")
    if which == "all":
        return names
    if which == "decoder":  # and the 1x1 convolution from the latent into it
        return [n for n in names if n.startswith(("decoder.", "post_quant_conv."))]
    if which == "norms":
        return [n for n in names if re.search(r"(^|\.)norm[^.]*\.(weight|bias)$", n)]
    return [n for n in names if _ATTENTION_CONDITIONING.search(n)]


def select_trainable(model: torch.nn.Module, which: str) -> tuple[int, int]:
    """Freeze every parameter of `model` (the UNet or the autoencoder) outside the `which` set (requires_grad
    False); returns (trainable, total) counts.

    Call it before DP-SGD wraps the model: the per-sample gradients are then computed, clipped and noised for the
    trainable parameters only, and the frozen ones leave the round exactly as they came (the global model the
    server sent). DP holds for any subset: DP-SGD's guarantee is about the released trainable parameters, whose
    per-sample gradient is clipped to C and noised with sigma C whatever parameters it spans, and the frozen ones
    are a copy of what the server already had; so the accounting (sigma, q, steps) is exactly the same."""
    keep = set(trainable_names(model, which))
    trainable = total = 0
    for name, p in model.named_parameters():
        p.requires_grad_(name in keep)
        total += p.numel()
        trainable += p.numel() if name in keep else 0
    return trainable, total


def ddpm_scheduler(cfg: ModelConfig) -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=cfg.train_timesteps,
        clip_sample=False,
        prediction_type=cfg.prediction_type,
        **SCHEDULE,
    )


def ddim_scheduler(cfg: ModelConfig) -> DDIMScheduler:
    return DDIMScheduler(
        num_train_timesteps=cfg.train_timesteps,
        clip_sample=False,
        prediction_type=cfg.prediction_type,
        **SCHEDULE,
    )


def autoencoder_loss(ae: AutoencoderKL, images: torch.Tensor, kl_weight: float) -> torch.Tensor:
    """Per-sample squared-error reconstruction + weighted KL divergence, shape (B,).

    Squared error, not L1: measured here, L1 with Adam stalls at a blurred mean head (L1 0.064 after 150 steps
    on 8 phantoms) where squared error keeps improving (L1 0.035 and falling)."""
    recon, mu, sigma = ae(images)
    dims = tuple(range(1, images.ndim))
    mse = (recon - images).pow(2).mean(dim=dims)
    kl = 0.5 * (mu.pow(2) + sigma.pow(2) - torch.log(sigma.pow(2) + 1e-8) - 1).sum(dim=dims)
    return mse + kl_weight * kl


@torch.no_grad()
def encode(
    ae: AutoencoderKL, images: torch.Tensor, batch: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Latent mean and std for each image (no gradient), batched."""
    mus, sigmas = [], []
    for i in range(0, len(images), batch):
        h = ae.encoder(images[i : i + batch])
        mus.append(ae.quant_conv_mu(h))
        sigmas.append(torch.exp(torch.clamp(ae.quant_conv_log_sigma(h), -30.0, 20.0) / 2))
    return torch.cat(mus), torch.cat(sigmas)


def drop_labels(
    labels: torch.Tensor, p: float, null_class: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Classifier-free guidance's class dropout: each label independently replaced by the null class with
    probability p, so the one UNet learns both the class-conditional and the unconditional prediction.

    The draw uses `generator`, else torch's global generator: at a DP site that is seeded from the site's own OS
    entropy each round (client/task.py round_seed), never from anything the server sends."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"class dropout must be in [0, 1], got {p}")
    if p == 0.0:
        return labels
    u = torch.rand(labels.shape, generator=generator, device="cpu" if generator else labels.device)
    drop = u.to(labels.device) < p
    return torch.where(drop, torch.full_like(labels, null_class), labels)


def guided_prediction(
    unet: DiffusionModelUNet,
    x: torch.Tensor,
    timesteps: torch.Tensor,
    labels: torch.Tensor,
    null_class: int,
    guidance_scale: float = 1.0,
) -> torch.Tensor:
    """The UNet's prediction with classifier-free guidance (Ho & Salimans 2022): uncond + w (cond - uncond).

    w = 1 is the plain conditional prediction (one forward of B); otherwise one batched forward of 2B, the
    conditional half with `labels` and the unconditional half with the null class. w > 1 pushes samples towards
    what distinguishes their class, which a rare class needs to be drawn at all."""
    if guidance_scale == 1.0:
        return unet(x, timesteps=timesteps, class_labels=labels)
    null = torch.full_like(labels, null_class)
    pred = unet(
        torch.cat([x, x]),
        timesteps=torch.cat([timesteps, timesteps]),
        class_labels=torch.cat([labels, null]),
    )
    cond, uncond = pred.chunk(2)
    return uncond + guidance_scale * (cond - uncond)


def diffusion_loss(
    unet: DiffusionModelUNet,
    scheduler: DDPMScheduler,
    latents: torch.Tensor,
    labels: torch.Tensor,
    timesteps: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sample MSE of the UNet's prediction (the noise, or v, as the scheduler's prediction_type says), shape
    (B,). `latents` are already scaled. `weight` (B, 1, *latent spatial), optional: each latent pixel's weight in
    the mean (lesion_weight_map); each sample's loss still depends on that sample alone."""
    if noise is None:
        noise = torch.randn_like(latents)
    if timesteps is None:
        timesteps = torch.randint(
            0, scheduler.num_train_timesteps, (len(latents),), device=latents.device
        )
    noisy = scheduler.add_noise(original_samples=latents, noise=noise, timesteps=timesteps)
    pred = unet(noisy, timesteps=timesteps, class_labels=labels)
    target = (
        noise
        if scheduler.prediction_type == "epsilon"
        else scheduler.get_velocity(latents, noise, timesteps)
    )
    err = F.mse_loss(pred, target, reduction="none")
    if weight is not None:
        err = err * weight
    return err.mean(dim=tuple(range(1, latents.ndim)))


def lesion_weight_map(masks: torch.Tensor, latent_size: int, lesion_weight: float) -> torch.Tensor:
    """Per-latent-pixel loss weights 1 + lesion_weight x (the share of the pixel's image area that is lesion), from
    lesion masks (B, 1, *image spatial), bool or float; shape (B, 1, *[latent_size] * spatial dims).

    A lesion of a few latent pixels carries almost none of the plain diffusion loss, so the label that says
    "lesion" is never learnt (docs/RECIPE.md); weighting the region makes the lesion's reconstruction count. With
    no mask (all zeros) the weight is 1 everywhere: the plain loss."""
    if lesion_weight < 0:
        raise ValueError(f"lesion_weight must be >= 0, got {lesion_weight}")
    spatial = masks.ndim - 2
    pool = F.adaptive_avg_pool2d if spatial == 2 else F.adaptive_avg_pool3d
    return 1.0 + lesion_weight * pool(masks.float(), (latent_size,) * spatial)


@torch.no_grad()
def sample_latents(
    unet: DiffusionModelUNet,
    cfg: ModelConfig,
    labels: torch.Tensor,
    *,
    steps: int | None = None,
    sampler: str = "ddim",
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    progress: Callable[[int, int], None] | None = None,
    guidance_scale: float = 1.0,
) -> torch.Tensor:
    """Reverse diffusion from Gaussian noise for one batch of class labels (DDIM by default, DDPM for comparison).
    The starting noise is `noise` (B, *latent_shape) if given, else drawn from `generator`. `guidance_scale` w:
    classifier-free guidance (`guided_prediction`); 1 is the plain conditional model."""
    device = labels.device
    if sampler == "ddim":
        scheduler = ddim_scheduler(cfg)
        scheduler.set_timesteps(steps or cfg.ddim_steps, device=device)
    elif sampler == "ddpm":
        scheduler = ddpm_scheduler(cfg)
        scheduler.set_timesteps(steps or cfg.train_timesteps, device=device)
    else:
        raise ValueError(f"unknown sampler {sampler!r}")
    if noise is None:
        noise = torch.randn((len(labels),) + cfg.latent_shape, generator=generator, device="cpu")
    elif tuple(noise.shape) != (len(labels),) + cfg.latent_shape:
        raise ValueError(
            f"noise has shape {tuple(noise.shape)}, expected {(len(labels),) + cfg.latent_shape}"
        )
    x = noise.to(device)
    timesteps = scheduler.timesteps
    for i, t in enumerate(timesteps):
        t_batch = torch.full((len(labels),), int(t), device=device, dtype=torch.long)
        pred = guided_prediction(unet, x, t_batch, labels, cfg.null_class, guidance_scale)
        if sampler == "ddim":
            x, _ = scheduler.step(pred.float(), int(t), x, eta=0.0)
        else:
            x, _ = scheduler.step(pred.float(), int(t), x, generator=generator)
        if progress:
            progress(i + 1, len(timesteps))
    return x


@torch.no_grad()
def decode(ae: AutoencoderKL, latents: torch.Tensor, latent_scale: float) -> torch.Tensor:
    return ae.decode(latents / latent_scale).clamp(0.0, 1.0)


@torch.no_grad()
def estimate_latent_scale(ae: AutoencoderKL, public_images: torch.Tensor) -> float:
    """1 / std of the latent means of PUBLIC images (never private ones: the scale would leak their statistics)."""
    mu, _ = encode(ae, public_images)
    std = float(mu.std())
    return 1.0 / max(std, 1e-6)


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
