"""The demo's release policy relaxes only what the demo's size makes unreachable or unmeasurable."""

from dataclasses import asdict

from privacy.policy import ALLOWED_UNMEASURED, DEFAULT_POLICY
from server.demo import demo_policy


def test_demo_policy_keeps_every_privacy_limit_of_the_default():
    demo, default = asdict(demo_policy(DEFAULT_POLICY)), asdict(DEFAULT_POLICY)
    changed = {k for k in default if demo[k] != default[k]}
    assert changed == {
        "max_delta",
        "min_precision",
        "min_coverage",
        "min_tstr_balanced_accuracy",
        "allow_unmeasured",
        "required_approvals",
    }
    assert demo["max_delta"] <= 2e-3  # 1 / (10 x ~90 training patients) fits, nothing looser
    assert set(demo["allow_unmeasured"]) <= set(ALLOWED_UNMEASURED)
    for key in (
        "max_epsilon",
        "max_membership_auc",
        "max_tpr_at_1pct_fpr",
        "max_near_copies",
        "withhold_near_copies",
        "max_withheld_share",
        "allow_inconclusive",
        "min_attack_records",
    ):
        assert demo[key] == default[key], key


def test_demo_dims_3_trains_both_phases_with_dp_on_volumes(tmp_path):
    from pathlib import Path

    import pytest

    from common.config import model_config
    from server.demo import DemoOptions, demo_run_config

    opts = DemoOptions(out=tmp_path, dims=3)
    run = demo_run_config(opts, Path(tmp_path) / "run")
    assert opts.preset == "tiny3d" and model_config(run.preset).spatial_dims == 3
    assert run.autoencoder_source == "federated" and run.federated_autoencoder_rounds >= 1
    assert run.diffusion_rounds >= 1  # both phases trained at the sites, with DP-SGD
    assert DemoOptions(out=tmp_path).preset == "small"
    with pytest.raises(ValueError, match="3-D preset"):
        DemoOptions(out=tmp_path, dims=3, preset="small")
