"""DP-SGD preconditions and mechanics: clipping bounds each patient's influence, noise has the configured std."""

from __future__ import annotations

import math

import pytest
import torch
from opacus.data_loader import DPDataLoader
from scipy import stats
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from client.task import _empty_step
from common.config import model_config
from common.model import ddpm_scheduler, diffusion_loss, lesion_weight_map
from privacy.bookkeeping import BookKeepingModule
from privacy.dp import (
    GRAD_SAMPLE_MODES,
    PrivacyPreconditionError,
    batch_loss,
    check_loader,
    check_model,
    make_private,
    sample_rate_of,
)
from tests.privacy.conftest import trained_looking_unet


def _loader(n: int = 64, features: int = 16, batch_size: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(n, features, generator=g), torch.randn(n, 1, generator=g))
    return DataLoader(data, batch_size=batch_size, shuffle=True)


def _mlp(features: int = 16) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(features, 8), nn.Tanh(), nn.Linear(8, 1))


def _private(model, loader, *, sigma=1.0, clip=0.5, mode="bookkeeping"):
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    return make_private(
        model,
        opt,
        loader,
        noise_multiplier=sigma,
        max_grad_norm=clip,
        test_seed=0,
        grad_sample_mode=mode,
    )


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _summed_clipped_grad(model, opt, x, loss_fn=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-sample raw gradient norms, sum of clipped per-sample gradients) for batch x, before noise.
    `loss_fn(model, x)`: the per-sample losses (default: the squared output)."""
    opt.zero_grad()
    per_sample = (model(x) ** 2).sum(1) if loss_fn is None else loss_fn(model, x)
    per_sample.mean().backward()  # per-sample losses, averaged over the batch as in training
    params = [p for p in model.parameters() if p.requires_grad]
    if isinstance(model, BookKeepingModule):
        return model.clipped_grad_sum(opt.max_grad_norm), _flat(p.grad for p in params)
    raw = torch.stack([p.grad_sample.reshape(len(x), -1).norm(dim=1) for p in params], dim=1).norm(
        dim=1
    )
    opt.clip_and_accumulate()
    return raw, _flat(p.summed_grad for p in params)


@pytest.mark.parametrize("mode", ["bookkeeping", "hooks"])
def test_per_sample_gradients_are_clipped_to_max_grad_norm(mode):
    clip = 0.5
    model, opt, _ = _private(_mlp(), _loader(), clip=clip, mode=mode)
    x = torch.randn(12, 16, generator=torch.Generator().manual_seed(1)) * 5
    raw, _ = _summed_clipped_grad(model, opt, x)
    assert (raw > clip).any(), (
        "test needs samples whose unclipped gradient exceeds the clipping norm"
    )
    for i in range(len(x)):  # each patient's contribution to the update, alone
        raw_i, clipped_i = _summed_clipped_grad(model, opt, x[i : i + 1])
        assert clipped_i.norm() <= clip + 1e-5
        assert clipped_i.norm() == pytest.approx(min(raw_i.item(), clip), rel=1e-4)
    # sensitivity: adding one patient (an outlier) moves the summed gradient by at most the clipping norm
    outlier = torch.full((1, 16), 50.0)
    raw_all, with_outlier = _summed_clipped_grad(model, opt, torch.cat([x, outlier]))
    _, without = _summed_clipped_grad(model, opt, x)
    assert raw_all[-1] > 4 * clip
    assert (with_outlier - without).norm() <= clip + 1e-5


@pytest.mark.parametrize("mode", ["bookkeeping", "hooks"])
def test_a_lesion_weight_cannot_take_a_patient_past_the_clipping_norm(mode):
    """The sites' lesion-weighted diffusion loss (client/task.py): a patient whose weights are huge (an attacker's
    plan: lesion-weight 10^4, the patient's whole image masked) has a raw gradient far above the clipping norm, yet
    moves the clipped sum by at most C, as any patient does: the weights come from the patient's own record."""
    cfg = model_config("tiny")
    sched = ddpm_scheduler(cfg)
    g = torch.Generator().manual_seed(3)
    n = 5
    z = torch.randn((n + 1,) + cfg.latent_shape, generator=g)
    labels = torch.randint(0, cfg.num_classes, (n + 1,), generator=g)
    t = torch.randint(0, cfg.train_timesteps, (n + 1,), generator=g)
    noise = torch.randn(z.shape, generator=g)
    masks = torch.zeros((n + 1, 1) + (cfg.image_size,) * 2)
    masks[-1] = 1.0  # the outlier patient: everything is "lesion"
    weights = lesion_weight_map(masks, cfg.latent_size, 1e4)
    clip = 0.5
    data = TensorDataset(torch.randn(8 * n, *cfg.latent_shape))
    model, opt, _ = _private(
        trained_looking_unet(cfg), DataLoader(data, batch_size=n), clip=clip, mode=mode
    )

    def loss(idx):
        return lambda m, _: diffusion_loss(
            m, sched, z[idx], labels[idx], timesteps=t[idx], noise=noise[idx], weight=weights[idx]
        )

    everyone, others = torch.arange(n + 1), torch.arange(n)
    raw, with_outlier = _summed_clipped_grad(model, opt, z[everyone], loss(everyone))
    _, without = _summed_clipped_grad(model, opt, z[others], loss(others))
    assert (
        raw[-1] > 20 * clip and raw[-1] > 20 * raw[:-1].max()
    )  # the weights do inflate that gradient
    assert (with_outlier - without).norm() <= clip + 1e-5


def _noise_only_setup(mode: str, sigma: float, clip: float, batch: int):
    torch.manual_seed(0)
    model = nn.Linear(100, 100)  # 10,100 noisy coordinates
    data = TensorDataset(torch.randn(640, 100))
    model, opt, loader = make_private(
        model,
        torch.optim.SGD(model.parameters(), lr=0.0),
        DataLoader(data, batch_size=batch),
        noise_multiplier=sigma,
        max_grad_norm=clip,
        test_seed=123,
        grad_sample_mode=mode,
    )
    assert sample_rate_of(loader) == pytest.approx(batch / 640)
    assert opt.expected_batch_size == batch
    return model, opt


def _assert_pure_noise(model, sigma: float, clip: float, batch: int) -> None:
    noise = _flat(p.grad for p in model.parameters()).double()
    expected_std = (
        sigma * clip / batch
    )  # Gaussian noise std sigma*C on the sum, averaged over the expected batch
    n = noise.numel()
    assert abs(noise.mean().item()) < 5 * expected_std / math.sqrt(n)
    assert noise.std().item() == pytest.approx(expected_std, rel=0.05)
    chi2 = float(((noise / expected_std) ** 2).sum())
    p_value = 2 * min(stats.chi2.cdf(chi2, n), stats.chi2.sf(chi2, n))
    assert p_value > 1e-3, (chi2, n)


@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
def test_noise_has_the_configured_std(mode):
    sigma, clip, batch = 1.5, 2.0, 64
    model, opt = _noise_only_setup(mode, sigma, clip, batch)
    out = model(torch.randn(batch, 100))
    batch_loss(
        opt, 0.0 * out.sum(1)
    ).backward()  # every per-sample gradient is zero: the noise alone remains
    if mode == "hooks":
        assert all(float(p.grad_sample.abs().max()) == 0.0 for p in model.parameters())
    opt.step()  # lr = 0: the parameters stay, p.grad keeps the noised, averaged gradient
    _assert_pure_noise(model, sigma, clip, batch)


@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
def test_empty_poisson_batch_releases_noise_only(mode):
    sigma, clip, batch = 1.5, 2.0, 64
    model, opt = _noise_only_setup(mode, sigma, clip, batch)
    model(
        torch.ones(batch, 100)
    ).sum().backward()  # aligned gradients: leftovers of this step would show below
    opt.step()
    opt.zero_grad(set_to_none=True)
    _empty_step(model, opt)  # what the site's training loop does on an empty batch
    _assert_pure_noise(model, sigma, clip, batch)


def test_bookkeeping_step_equals_opacus_hooks_step_on_the_unet():
    """One DP-SGD step of the tiny UNet, book-keeping vs Opacus' hooks: same seed, so same noise; clipping
    bound between the per-sample norms; the noised averaged gradients must agree."""
    cfg = model_config("tiny")
    sched = ddpm_scheduler(cfg)
    g = torch.Generator().manual_seed(1)
    n = 6
    x = (
        torch.randn((n,) + cfg.latent_shape, generator=g)
        * torch.linspace(0.3, 3, n)[:, None, None, None]
    )
    labels = torch.randint(0, cfg.num_classes, (n,), generator=g)
    t = torch.randint(0, cfg.train_timesteps, (n,), generator=g)
    noise = torch.randn(x.shape, generator=g)
    data = TensorDataset(torch.randn(8 * n, *cfg.latent_shape))

    def unet():
        return trained_looking_unet(cfg)

    probe = BookKeepingModule(unet())
    diffusion_loss(probe, sched, x, labels, timesteps=t, noise=noise).mean().backward()
    norms = probe.clipped_grad_sum(1.0)
    clip = float(norms.median())
    assert (norms > 1.01 * clip).any() and (norms < 0.99 * clip).any()
    grads = {}
    for mode in ("bookkeeping", "hooks"):
        net = unet()
        model, opt, _ = make_private(
            net,
            torch.optim.SGD(net.parameters(), lr=0.0),
            DataLoader(data, batch_size=n),
            noise_multiplier=0.3,
            max_grad_norm=clip,
            test_seed=7,
            grad_sample_mode=mode,
        )
        opt.zero_grad(set_to_none=True)
        batch_loss(
            opt, diffusion_loss(model, sched, x, labels, timesteps=t, noise=noise)
        ).backward()
        opt.step()
        grads[mode] = _flat(p.grad for p in net.parameters())
    scale = grads["hooks"].abs().max()
    assert float((grads["bookkeeping"] - grads["hooks"]).abs().max() / scale) < 1e-5


def test_batchnorm_is_refused_naming_the_module():
    model = nn.Sequential()
    model.add_module("encoder", nn.Sequential(nn.Linear(16, 8)))
    model.encoder.add_module("norm", nn.BatchNorm1d(8))
    with pytest.raises(PrivacyPreconditionError, match=r"encoder\.norm \(BatchNorm1d\)"):
        check_model(model)
    frozen = nn.Sequential(
        nn.Linear(16, 8), nn.BatchNorm1d(8, affine=False)
    )  # no parameters, still mixes samples
    with pytest.raises(PrivacyPreconditionError, match=r"1 \(BatchNorm1d\)"):
        check_model(frozen)
    with pytest.raises(PrivacyPreconditionError, match="BatchNorm"):
        make_private(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            _loader(),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
        )


def test_instancenorm_with_running_stats_is_refused_and_groupnorm_is_fine():
    with pytest.raises(PrivacyPreconditionError, match=r"1 \(InstanceNorm2d\).*running stats"):
        check_model(
            nn.Sequential(
                nn.Conv2d(1, 4, 3), nn.InstanceNorm2d(4, affine=True, track_running_stats=True)
            )
        )
    check_model(
        nn.Sequential(nn.Conv2d(1, 4, 3), nn.InstanceNorm2d(4, affine=True), nn.GroupNorm(2, 4))
    )


def test_eval_mode_model_is_refused():
    model = _mlp().eval()
    with pytest.raises(PrivacyPreconditionError, match="eval mode"):
        check_model(model)
    with pytest.raises(PrivacyPreconditionError, match="eval mode"):
        _private(model, _loader())


def test_only_poisson_loaders_are_accepted():
    plain = _loader()
    with pytest.raises(PrivacyPreconditionError, match="Poisson"):
        check_loader(plain)
    with pytest.raises(PrivacyPreconditionError, match="Poisson"):
        sample_rate_of(plain)
    poisson = DPDataLoader.from_data_loader(plain)
    check_loader(poisson)
    assert sample_rate_of(poisson) == pytest.approx(1 / len(plain))


@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
def test_make_private_trains_with_poisson_batches(mode):
    model, opt, loader = _private(
        _mlp(), _loader(n=64, batch_size=8), sigma=0.5, clip=1.0, mode=mode
    )
    assert isinstance(loader, DPDataLoader) and sample_rate_of(loader) == pytest.approx(8 / 64)
    opt.original_optimizer.param_groups[0]["lr"] = 0.1
    before = _flat(p.detach().clone() for p in model.parameters())
    sizes = []
    for x, y in loader:
        opt.zero_grad()
        if len(x) == 0:
            _empty_step(model, opt)
        else:
            batch_loss(
                opt, nn.functional.mse_loss(model(x), y, reduction="none").mean(1)
            ).backward()
            opt.step()
        sizes.append(len(x))
    assert (
        len(sizes) == 8 and len(set(sizes)) > 1
    )  # Poisson: batch sizes vary around the expected 8
    assert not torch.equal(before, _flat(p.detach() for p in model.parameters()))
    with pytest.raises(PrivacyPreconditionError, match="noise_multiplier"):
        _private(_mlp(), _loader(), sigma=0.0, mode=mode)
    with pytest.raises(ValueError, match="grad_sample_mode"):
        _private(_mlp(), _loader(), mode="functorch")


def _replay_round(mode: str, sigma: float, clip: float) -> tuple[torch.Tensor, list[list[int]]]:
    """Everything the server can choose or know fixed (global seed, model, data, round): one noise draw on an
    empty batch and one epoch of Poisson batches, as a site would produce them."""
    torch.manual_seed(1234)  # what a server-chosen seed and round number fix at the site
    model = nn.Linear(100, 20)  # 2,020 noisy coordinates
    data = TensorDataset(torch.randn(64, 100, generator=torch.Generator().manual_seed(0)))
    model, opt, loader = make_private(
        model,
        torch.optim.SGD(model.parameters(), lr=0.0),
        DataLoader(data, batch_size=8),
        noise_multiplier=sigma,
        max_grad_norm=clip,
        grad_sample_mode=mode,
    )
    _empty_step(model, opt)
    noise = _flat(p.grad for p in model.parameters()).double()
    return noise, [sorted(batch) for batch in loader.batch_sampler]


@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
def test_a_replayed_round_draws_fresh_noise_and_fresh_poisson_batches(mode):
    """Attack (issue 9, item 1): the server replays a round with the same seed, round and data. If the noise were
    drawn from anything it chose, the replay would reproduce it and the server could subtract it."""
    sigma, clip, batch = 1.5, 2.0, 8
    noise_a, batches_a = _replay_round(mode, sigma, clip)
    noise_b, batches_b = _replay_round(mode, sigma, clip)
    assert not torch.equal(noise_a, noise_b), "the replay reproduced the DP noise"
    assert batches_a != batches_b, "the replay reproduced the Poisson batches"
    expected_std = sigma * clip / batch
    for noise in (noise_a, noise_b):
        assert noise.std().item() == pytest.approx(expected_std, rel=0.1)
    # independent draws: their difference has sqrt(2) times the std (a shared component would shrink it)
    assert (noise_a - noise_b).std().item() == pytest.approx(math.sqrt(2) * expected_std, rel=0.1)
