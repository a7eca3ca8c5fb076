"""DP fine-tuning of a chosen subset of the UNet (`dp-trainable`) or of the autoencoder (`dp-trainable-autoencoder`):
frozen parameters leave the round bit-identical, the trainable ones move, and the privacy accounting is exactly that
of training every parameter."""

import dataclasses

import pytest
import torch

from client.task import run_training_round
from common.config import SiteConfig, model_config
from common.messages import MessageError, RoundPlan
from common.model import build_autoencoder, build_unet, select_trainable, trainable_names
from tests.client.conftest import tiny_plan

PLAN = tiny_plan(
    run_id="run-t",
    phase="diffusion",
    federated_autoencoder_rounds=0,
    dp_trainable="attention-conditioning",
)


@pytest.fixture(scope="module")
def site_dir(make_site_dir):
    return make_site_dir(n_subjects=16, seed=5)


def test_attention_conditioning_is_the_dp_ldm_set():
    unet = build_unet(model_config("small"))
    names = trainable_names(unet, "attention-conditioning")
    assert "class_embedding.weight" in names and "time_embed.0.weight" in names
    assert "down_blocks.1.attentions.0.attn.to_q.weight" in names
    assert "middle_block.attention.attn.to_v.weight" in names
    assert "down_blocks.0.resnets.0.time_emb_proj.weight" in names
    assert "down_blocks.0.resnets.0.conv1.conv.weight" not in names
    assert "conv_in.conv.weight" not in names and "out.2.conv.weight" not in names
    trainable, total = select_trainable(unet, "attention-conditioning")
    assert 0.10 < trainable / total < 0.20  # 16.4 % of the small UNet
    assert sum(p.numel() for p in unet.parameters() if p.requires_grad) == trainable
    assert select_trainable(unet, "all") == (total, total)
    with pytest.raises(ValueError, match="dp-trainable"):
        trainable_names(unet, "everything")


@pytest.mark.parametrize("mode", ["bookkeeping", "hooks", "ghost"])
def test_frozen_parameters_come_back_bit_identical_and_accounting_is_unchanged(
    tmp_path, site_dir, mode
):
    cfg = model_config("tiny")
    torch.manual_seed(0)
    ae, unet = build_autoencoder(cfg).state_dict(), build_unet(cfg).state_dict()
    chosen = set(trainable_names(build_unet(cfg), "attention-conditioning"))

    def train(which: str, state: str):
        site = SiteConfig(
            site_dir=str(site_dir),
            state_dir=str(tmp_path / state),
            epsilon=8.0,
            grad_sample_mode=mode,
            canaries=0,
        )
        result = run_training_round(site, dataclasses.replace(PLAN, dp_trainable=which), unet, ae)
        assert not result.refused
        return result

    part = train("attention-conditioning", "part")
    assert part.state_dict.keys() == unet.keys()  # the reply carries the full state
    params = dict(build_unet(cfg).named_parameters())
    for name in params:
        same = torch.equal(part.state_dict[name], unet[name])
        assert same == (name not in chosen), f"{name}: frozen must be unchanged, trained must move"
    if mode != "bookkeeping":
        return
    whole = train("all", "all")
    keys = ("noise_multiplier", "sample_rate", "steps_total", "epsilon", "delta", "clipping_norm")
    assert {k: part.privacy[k] for k in keys} == {k: whole.privacy[k] for k in keys}
    assert sum(not torch.equal(whole.state_dict[n], unet[n]) for n in params) > len(chosen)


@pytest.mark.parametrize(
    "field, value, wrong",
    [
        ("dp_trainable", "attention-conditioning", "lora-everything"),
        ("dp_trainable_autoencoder", "norms", "attention-conditioning"),  # a UNet set
    ],
)
def test_the_round_plan_carries_the_trainable_sets_strictly(field, value, wrong):
    key = field.replace("_", "-")
    record = dataclasses.replace(PLAN, **{field: value}).to_record()
    assert getattr(RoundPlan.from_record(record), field) == value
    with pytest.raises(MessageError, match=key):
        dataclasses.replace(PLAN, **{field: wrong})
    del record[key]
    with pytest.raises(MessageError, match=key):
        RoundPlan.from_record(record)


def test_the_autoencoder_sets_are_the_decoder_and_the_norms():
    ae = build_autoencoder(model_config("small"))
    decoder = trainable_names(ae, "decoder")
    assert "post_quant_conv.conv.weight" in decoder or "post_quant_conv.weight" in decoder
    assert all(n.startswith(("decoder.", "post_quant_conv.")) for n in decoder)
    assert not any(n.startswith("encoder.") for n in decoder)
    norms = trainable_names(ae, "norms")
    assert norms and all(".norm" in n and n.endswith((".weight", ".bias")) for n in norms)
    trainable, total = select_trainable(ae, "norms")
    assert (trainable, total) == (896, 251_569)  # the README's figure for the small preset
    assert 0.5 < select_trainable(ae, "decoder")[0] / total < 0.75
    with pytest.raises(ValueError, match="dp-trainable-autoencoder"):
        trainable_names(ae, "attention-conditioning")  # a UNet set


@pytest.mark.parametrize("which", ["decoder", "norms"])
def test_an_autoencoder_round_trains_only_its_set_with_the_same_accounting(
    tmp_path, site_dir, which
):
    cfg = model_config("tiny")
    torch.manual_seed(0)
    ae = build_autoencoder(cfg).state_dict()
    chosen = set(trainable_names(build_autoencoder(cfg), which))
    plan = dataclasses.replace(
        PLAN, phase="autoencoder", federated_autoencoder_rounds=1, dp_trainable_autoencoder=which
    )

    def train(p: RoundPlan, state: str):
        site = SiteConfig(
            site_dir=str(site_dir), state_dir=str(tmp_path / state), epsilon=8.0, canaries=0
        )
        result = run_training_round(site, p, ae)
        assert not result.refused, result.refused
        return result

    part = train(plan, "part")
    for name, _ in build_autoencoder(cfg).named_parameters():
        same = torch.equal(part.state_dict[name], ae[name])
        assert same == (name not in chosen), f"{name}: frozen must be unchanged, trained must move"
    whole = train(dataclasses.replace(plan, dp_trainable_autoencoder="all"), "all")
    keys = ("noise_multiplier", "sample_rate", "steps_total", "epsilon", "delta", "clipping_norm")
    assert {k: part.privacy[k] for k in keys} == {k: whole.privacy[k] for k in keys}
