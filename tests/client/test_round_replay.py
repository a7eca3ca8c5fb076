"""Issue 14, the SuperLink restart: the same round (run id, server round, phase) reaches a site twice.

That happens when the server dies after the sites trained round r but before it checkpointed it: the run is
submitted again, resumes from round r - 1 and asks for round r again. The site must answer with the update it
released the first time (re-releasing a released DP output is post-processing: it costs nothing), and never
train that round a second time: a server asking again, with other weights, another seed or another plan, gets
no second DP output of the same patients for the same round. The ledger holds each mechanism once, never less.
"""

import dataclasses

import pytest
import torch

from client import replay
from client.task import load_training_data, open_ledger, run_training_round
from common.config import SiteConfig, model_config
from common.messages import RoundPlan
from common.model import build_autoencoder, build_unet
from common.phantoms import make_phantom_sites
from privacy.accounting import MechanismStep, epsilon_for


@pytest.fixture(scope="module")
def site_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantoms")
    return make_phantom_sites(out, n_sites=1, n_subjects=20, size=32, seed=5)[0]


@pytest.fixture(scope="module")
def autoencoder():
    return build_autoencoder(model_config("tiny")).state_dict()


def _plan(run_id: str = "run-restarted", rounds: int = 2) -> RoundPlan:
    return RoundPlan(
        run_id=run_id,
        server_round=1,
        phase="autoencoder",
        num_server_rounds=rounds,
        federated_autoencoder_rounds=1,
        preset="tiny",
        local_epochs=1,
        batch_size=5,
        lr=1e-3,
        kl_weight=1e-6,
        latent_scale=1.0,
        proximal_mu=0.0,
        seed=0,
    )


def _site(site_dir, tmp_path, epsilon: float) -> SiteConfig:
    return SiteConfig(site_dir=str(site_dir), state_dir=str(tmp_path / "state"), epsilon=epsilon)


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _steps(entries: list[dict]) -> list[MechanismStep]:
    return [MechanismStep(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in entries]


def test_attack_a_server_asking_again_with_other_inputs_gets_no_second_dp_output(
    tmp_path, site_dir, autoencoder
):
    """Attack: after round 1, the server asks for round 1 again with other global weights, another seed or
    another learning rate, hoping for a second, fresh DP output of the same patients. The budget (epsilon 20)
    would allow a second training, so only the replay rule stands in the way: each request is refused by name,
    nothing is trained or spent, and the ledger holds round 1 once."""
    site = _site(site_dir, tmp_path, epsilon=20.0)
    first = run_training_round(site, _plan(), autoencoder)
    assert not first.refused
    ledger = open_ledger(site)
    spent = ledger.epsilon(first.privacy["delta"], "rdp")

    nudged = {k: v + 1e-3 if v.is_floating_point() else v for k, v in autoencoder.items()}
    attempts = {
        "weights": (_plan(), nudged),
        "seed": (dataclasses.replace(_plan(), seed=99), autoencoder),
        "lr": (dataclasses.replace(_plan(), lr=3e-3), autoencoder),
    }
    for what, (plan, arrays) in attempts.items():
        again = run_training_round(site, plan, arrays)
        assert again.state_dict is None or _same(again.state_dict, first.state_dict), (
            f"a request with another {what} got a second, different DP output for the same round"
        )
        assert again.refused, what  # refused, by name: not silently answered with a stale update
        assert "already" in again.refused and "run-restarted" in again.refused, again.refused
    assert "global model weights" in run_training_round(site, _plan(), nudged).refused
    assert "seed" in run_training_round(site, attempts["seed"][0], autoencoder).refused

    entries = ledger.entries()
    assert [(e["run_id"], e["server_round"], e["phase"]) for e in entries] == [
        ("run-restarted", 1, "autoencoder")
    ]
    assert ledger.epsilon(first.privacy["delta"], "rdp") == spent


def test_a_resubmitted_run_redoes_its_last_round_with_the_same_update_and_no_new_spend(
    tmp_path, site_dir, autoencoder
):
    """The gap issue 14 left: a one-round run spends the site's whole budget in its last round; the server dies
    before checkpointing it and the resubmitted run asks for that round again. The site answers with the very
    update it released (same bytes, same metrics, same reported spend) and spends nothing: no double spend (one
    mechanism in the ledger) and no lost spend (the ledger's epsilon is that mechanism's)."""
    site = _site(site_dir, tmp_path, epsilon=3.0)
    first = run_training_round(site, _plan(rounds=1), autoencoder)
    assert not first.refused and first.metrics["epsilon"] > 0.9 * 3.0  # the budget is (nearly) gone
    again = run_training_round(site, _plan(rounds=1), autoencoder)
    assert not again.refused, again.refused
    assert _same(again.state_dict, first.state_dict)
    assert again.metrics == first.metrics and again.privacy == first.privacy

    ledger = open_ledger(site)
    entries = ledger.entries()
    assert [(e["run_id"], e["server_round"]) for e in entries] == [("run-restarted", 1)]
    delta, accountant = first.privacy["delta"], first.privacy["accountant"]
    assert ledger.epsilon(delta, accountant) == pytest.approx(
        epsilon_for(_steps(entries), delta, accountant), rel=1e-12
    )
    assert again.metrics["epsilon"] == pytest.approx(ledger.epsilon(delta, accountant), rel=1e-9)


def test_a_kept_update_serves_only_its_own_round_and_a_damaged_or_dropped_one_is_refused(
    tmp_path, site_dir, autoencoder
):
    """The kept copy is bound to its ledger entry: another run id is a new run (trained and charged as such);
    the run's earlier rounds are no longer kept, and a copy that does not hash to what the ledger recorded is
    refused, saying what to do. Neither is ever trained again, and nothing is spent."""
    site = _site(site_dir, tmp_path, epsilon=20.0)
    unet = build_unet(model_config("tiny")).state_dict()
    first = _plan(rounds=10)  # a long run: budget left for another one after two rounds
    r1 = run_training_round(site, first, autoencoder)
    r2_plan = dataclasses.replace(first, server_round=2, phase="diffusion")
    r2 = run_training_round(site, r2_plan, unet, r1.state_dict)
    assert not r1.refused and not r2.refused
    ledger = open_ledger(site)
    assert [(r["server_round"], r["phase"]) for r in ledger.releases("run-restarted")] == [
        (1, "autoencoder"),
        (2, "diffusion"),
    ]
    kept = sorted((site.state_path / replay.FOLDER).glob("*.pt"))
    assert [p.name for p in kept] == [
        f"{ledger.release_of('run-restarted', 2, 'diffusion')['mechanism_id']}.pt"
    ]

    gone = run_training_round(site, first, autoencoder)  # round 1 again: its copy was dropped
    assert gone.state_dict is None and "is gone" in gone.refused and "backup" in gone.refused

    with open(kept[0], "r+b") as f:  # one byte of the kept round-2 update altered
        f.seek(-64, 2)
        byte = f.read(1)
        f.seek(-64, 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    damaged = run_training_round(site, r2_plan, unet, r1.state_dict)
    assert damaged.state_dict is None
    assert "not the one the ledger recorded" in damaged.refused and "backup" in damaged.refused
    kept[0].write_bytes(b"not a torch file")
    assert (
        "not the one the ledger recorded"
        in run_training_round(site, r2_plan, unet, r1.state_dict).refused
    )
    assert len(ledger.entries()) == 2  # nothing trained, nothing spent

    other = run_training_round(
        site, dataclasses.replace(r2_plan, run_id="run-other"), unet, r1.state_dict
    )
    assert not other.refused and not other.replayed
    assert not _same(other.state_dict, r2.state_dict)
    assert [(e["run_id"], e["server_round"]) for e in ledger.entries()] == [
        ("run-restarted", 1),
        ("run-restarted", 2),
        ("run-other", 2),
    ]


def test_a_spend_recorded_without_a_release_is_trained_again_and_charged_again(
    tmp_path, site_dir, autoencoder
):
    """The site crashed after committing round 1's spend and before keeping its update: the update never left
    (its release is recorded before it can), so a repeated request trains again, and the ledger charges both
    mechanisms (an over-count, never an under-count): what the site reports is their composition."""
    site = _site(site_dir, tmp_path, epsilon=20.0)
    train, _ = load_training_data(site, model_config("tiny"))
    ledger = open_ledger(site)
    crashed = dict(noise_multiplier=1.0, sample_rate=1 / 3, steps=3, clipping_norm=1.0, delta=1e-5)
    ledger.record(
        run_id="run-restarted",
        server_round=1,
        phase="autoencoder",
        accountant="rdp",
        patients=train.patients,
        **crashed,
    )
    redo = run_training_round(site, _plan(), autoencoder)
    assert not redo.refused and not redo.replayed
    entries = ledger.entries()
    assert [(e["run_id"], e["server_round"]) for e in entries] == [("run-restarted", 1)] * 2
    assert entries[0]["noise_multiplier"] == 1.0  # the crashed attempt's spend, still charged
    delta, accountant = redo.privacy["delta"], redo.privacy["accountant"]
    assert redo.metrics["epsilon"] == pytest.approx(
        epsilon_for(_steps(entries), delta, accountant), rel=1e-9
    )
    assert redo.metrics["epsilon"] > epsilon_for(_steps(entries[1:]), delta, accountant)
    # once released, that round is answered with the redo's update, never trained a third time
    again = run_training_round(site, _plan(), autoencoder)
    assert again.replayed and _same(again.state_dict, redo.state_dict)
    assert len(ledger.entries()) == 2


def test_the_request_fingerprint_survives_the_wire_and_a_checkpoint_and_sees_any_change(
    tmp_path, autoencoder
):
    """A resumed run sends the weights it loaded from its checkpoint through Flower: the same weights must give the
    same sha256 (or the replay of an honest resubmission would be refused); any changed value, name or dtype must
    not."""
    from flwr.app import ArrayRecord

    sha = replay.weights_sha256(autoencoder)
    assert replay.weights_sha256(ArrayRecord(autoencoder).to_torch_state_dict()) == sha
    torch.save(autoencoder, tmp_path / "w.pt")
    assert replay.weights_sha256(torch.load(tmp_path / "w.pt", weights_only=True)) == sha
    assert replay.weights_sha256(dict(reversed(list(autoencoder.items())))) == sha
    name = next(iter(autoencoder))
    changed = dict(autoencoder)
    changed[name] = autoencoder[name].clone()
    changed[name].view(-1)[0] += 1e-6
    renamed = {("x" + k if k == name else k): v for k, v in autoencoder.items()}
    retyped = {k: v.double() if k == name else v for k, v in autoencoder.items()}
    assert len({sha, *(replay.weights_sha256(w) for w in (changed, renamed, retyped))}) == 4
    assert replay.weights_sha256(None) == ""
