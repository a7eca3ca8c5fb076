import pytest

from common.config import PRESETS, RunConfig, SiteConfig, model_config


def test_presets_build_consistent_shapes():
    for name, cfg in PRESETS.items():
        assert cfg.image_size % 2 ** (len(cfg.ae_channels) - 1) == 0, name
        assert len(cfg.unet_attention) == len(cfg.unet_channels), name
        assert cfg.latent_shape[0] == cfg.latent_channels


def test_run_config_reads_flower_keys_and_phases():
    run = RunConfig.from_flwr(
        {"num-server-rounds": "4", "autoencoder-rounds": 1, "strategy": "fedadam"}
    )
    assert run.num_server_rounds == 4 and run.strategy == "fedadam"
    assert [run.phase(r) for r in range(1, 5)] == [
        "autoencoder",
        "diffusion",
        "diffusion",
        "diffusion",
    ]
    public = RunConfig(pretrained="public.pt", autoencoder_rounds=0, num_server_rounds=2)
    assert public.phase(1) == "diffusion" and public.federated_autoencoder_rounds == 0
    assert RunConfig.from_flwr(run.to_flwr()) == run


@pytest.mark.parametrize(
    "bad",
    [
        {"strategy": "krum"},
        {"preset": "huge"},
        {"no-such-key": 1},
        {"autoencoder-rounds": 9},
        {"min-sites": 0},
        {"dp-trainable-autoencoder": "attention-conditioning"},  # a UNet set
    ],
)
def test_run_config_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        RunConfig.from_flwr(bad)


def test_site_config_from_node_config():
    site = SiteConfig.from_flwr(
        {"site-dir": "/data/site-a", "epsilon": "4", "dp": "true", "partition-id": 1}
    )
    assert site.epsilon == 4.0 and site.dp is True and site.name == "site-a"
    assert str(site.state_path).endswith(".fedsynth")
    with pytest.raises(ValueError):
        SiteConfig.from_flwr({"site-dir": "/x", "accountant": "gdp"})
    assert SiteConfig.from_flwr({"site-dir": "/x", "utility-cnn-steps": 25}).utility_cnn_steps == 25
    with pytest.raises(ValueError, match="utility-cnn-steps"):
        SiteConfig.from_flwr({"site-dir": "/x", "utility-cnn-steps": -1})
    with pytest.raises(ValueError):
        SiteConfig.from_flwr({"epsilon": 1})


@pytest.mark.parametrize("key", ["epsilonn", "max_grad_norm", "DP", "delta "])
def test_site_config_refuses_a_misspelt_key(key):
    """Attack: a site meaning `epsilonn=1` (or another misspelling) must not silently train at the default budget
    of 10; the error names the key and the known ones."""
    with pytest.raises(ValueError, match="unknown config key") as err:
        SiteConfig.from_flwr({"site-dir": "/x", key: "1"})
    assert "epsilon" in str(err.value)


@pytest.mark.parametrize("value", ["ture", "flase", "off ", "2", "", "none"])
def test_site_config_refuses_an_unclear_boolean(value):
    """Attack: `dp=ture` used to parse as False, so a typo switched DP off."""
    with pytest.raises(ValueError, match="dp"):
        SiteConfig.from_flwr({"site-dir": "/x", "dp": value})


@pytest.mark.parametrize(
    ("value", "expected"),
    [(True, True), ("true", True), ("1", True), ("yes", True), (False, False), ("false", False)]
    + [("0", False), ("no", False), ("False", False), (1, True), (0, False)],
)
def test_site_config_booleans(value, expected):
    assert SiteConfig.from_flwr({"site-dir": "/x", "dp": value}).dp is expected


def test_site_config_ignores_only_flowers_own_simulation_keys():
    site = SiteConfig.from_flwr({"site-dir": "/x", "partition-id": 0, "num-partitions": 3})
    assert site.site_dir == "/x"


def test_model_config_overrides():
    assert model_config("tiny", ddim_steps=3).ddim_steps == 3
    with pytest.raises(ValueError):
        model_config("nope")
