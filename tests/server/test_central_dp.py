"""Central (client-level) DP: exact update clipping at the sites and the server, Gaussian noise on the aggregate,
replace-one accounting (sensitivity 2C) in the consortium's ledger over every run (both phases, across a resume,
across runs).

The Federation is driven through a fake Grid whose "sites" answer in-process through the real ClientApp mod, so
the server's rounds, phase switch, records and resume run for real without a deployment (the TLS deployment is
covered in tests/integration/test_central_dp_tls.py).
"""

import json
import math

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    RecordDict,
)

from client.client_app import central_dp_clipping_mod
from common import messages
from common.config import RunConfig
from common.messages import TrainMetrics, TrainStatus
from server.central_dp import (
    LEDGER_FILE,
    CentralDP,
    CentralDPLedger,
    SitesGrid,
    sample_level,
    update_norm,
)
from server.training import Federation, make_strategy

pytestmark = pytest.mark.usefixtures("task_identity")


def _arrays(values: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v, dtype=np.float32)) for k, v in values.items()})


def _reply(
    msg: Message,
    arrays: ArrayRecord | None,
    num_examples: int = 10,
    site: str = "site",
    refused: str = "",
) -> Message:
    content = RecordDict(
        {
            messages.PRIVACY: ConfigRecord(
                {"site": site, "epsilon": 1.0, "protection": "formal sample-level DP"}
            ),
            messages.STATUS: TrainStatus(site, refused, "").to_record(),
        }
    )
    if arrays is not None:
        content[messages.ARRAYS] = arrays
        content[messages.METRICS] = TrainMetrics(
            steps=1, seconds=0.1, epsilon=1.0, delta=1e-5, loss=0.5, num_examples=num_examples
        ).to_record()
    return Message(content=content, reply_to=msg)


class FakeGrid:
    """Nodes 1..n; each answers a train message like a site would: its model moved by a random step of norm
    `step_norm`, passed through the ClientApp's central-DP mod (which clips it when the round asks)."""

    def __init__(self, n: int, step_norm: float = 5.0, seed: int = 0):
        self.nodes = list(range(1, n + 1))
        self.step_norm = step_norm
        self.rng = np.random.default_rng(seed)
        self.seen: list[Message] = []
        self.refuse: set[int] = set()

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, timeout=None):
        return [self._answer(m) for m in messages]

    def _answer(self, msg: Message) -> Message:
        self.seen.append(msg)
        node = msg.metadata.dst_node_id

        def handler(m: Message, context) -> Message:
            if node in self.refuse:
                return _reply(m, None, site=f"site-{node}", refused="privacy budget spent")
            sent = m.content["arrays"]
            nd = sent.to_numpy_ndarrays()
            steps = [self.rng.normal(size=a.shape).astype(np.float32) for a in nd]
            scale = self.step_norm / math.sqrt(sum(float((s**2).sum()) for s in steps))
            new = {k: a + s * scale for k, a, s in zip(sent.keys(), nd, steps, strict=False)}
            return _reply(m, _arrays(new), num_examples=10 * node, site=f"site-{node - 1}")

        return central_dp_clipping_mod(msg, None, handler)


def _train_msg(arrays: ArrayRecord, config: dict, frozen: ArrayRecord | None = None) -> Message:
    content = RecordDict({"arrays": arrays, "config": ConfigRecord(config)})
    if frozen is not None:
        content["autoencoder"] = frozen
    return Message(content=content, message_type=MessageType.TRAIN, dst_node_id=7)


# ---- the site's clipping ------------------------------------------------------------------------------------------
def test_clipped_update_has_norm_at_most_the_clipping_norm_and_keeps_its_direction():
    rng = np.random.default_rng(1)
    glob = {"w": rng.normal(size=(50, 20)), "b": rng.normal(size=20)}
    step = {"w": rng.normal(size=(50, 20)) * 3, "b": rng.normal(size=20) * 3}
    frozen = _arrays({"enc": np.ones(4)})
    seen = {}

    def handler(m, ctx):
        seen["autoencoder"] = (
            "autoencoder" in m.content
        )  # the frozen autoencoder still reaches the task
        return _reply(m, _arrays({k: glob[k] + step[k] for k in glob}))

    msg = _train_msg(_arrays(glob), {"server-round": 2, "clipping_norm": 0.7}, frozen)
    out = central_dp_clipping_mod(msg, None, handler)
    new = out.content["arrays"].to_numpy_ndarrays()
    g = _arrays(glob).to_numpy_ndarrays()
    assert seen["autoencoder"]
    assert update_norm(new, g) <= 0.7 * (1 + 1e-5)
    assert update_norm(new, g) == pytest.approx(
        0.7, rel=1e-4
    )  # the step was much longer: clipped to the norm
    delta = np.concatenate([(a - b).ravel() for a, b in zip(new, g, strict=False)])
    direction = np.concatenate([step[k].ravel() for k in glob])
    assert np.dot(delta, direction) / (
        np.linalg.norm(delta) * np.linalg.norm(direction)
    ) == pytest.approx(1, abs=1e-4)

    # a short update is left as it is
    small = {k: glob[k] + 1e-3 * step[k] for k in glob}
    out = central_dp_clipping_mod(
        _train_msg(_arrays(glob), {"clipping_norm": 0.7}),
        None,
        lambda m, c: _reply(m, _arrays(small)),
    )
    assert np.allclose(out.content["arrays"].to_numpy_ndarrays()[0], small["w"], atol=1e-6)


def test_clipping_mod_is_a_no_op_without_central_dp_and_passes_refusals_through():
    glob = {"w": np.zeros(10)}
    big = {"w": np.full(10, 100.0)}
    out = central_dp_clipping_mod(
        _train_msg(_arrays(glob), {"server-round": 1}), None, lambda m, c: _reply(m, _arrays(big))
    )
    assert np.allclose(
        out.content["arrays"].to_numpy_ndarrays()[0], 100.0
    )  # no clipping norm asked: untouched
    refused = central_dp_clipping_mod(
        _train_msg(_arrays(glob), {"clipping_norm": 1.0}),
        None,
        lambda m, c: _reply(m, None, refused="budget spent"),
    )
    assert not refused.has_error() and refused.content["status"]["refused"] == "budget spent"


def test_server_reclips_an_update_that_was_not_clipped_and_weighs_sites_equally(tmp_path):
    run = RunConfig(central_dp="client-side-fixed", central_dp_clipping_norm=0.5)
    glob = _arrays({"w": np.zeros(100)})
    msg = _train_msg(glob, {})
    replies = [
        _reply(msg, _arrays({"w": np.full(100, 1.0)}), num_examples=3),
        _reply(msg, _arrays({"w": np.full(100, 0.001)}), num_examples=30),
    ]
    CentralDP(run, tmp_path).prepare_replies(replies, glob)
    norms = [
        update_norm(r.content["arrays"].to_numpy_ndarrays(), glob.to_numpy_ndarrays())
        for r in replies
    ]
    assert norms[0] == pytest.approx(0.5, rel=1e-5) and norms[1] == pytest.approx(0.01, rel=1e-4)
    assert [r.content["metrics"]["central-dp-weight"] for r in replies] == [1.0, 1.0]


# ---- the server's noise -------------------------------------------------------------------------------------------
def test_aggregate_noise_std_is_noise_multiplier_times_clipping_norm_over_sites(tmp_path):
    sigma, c, n = 1.5, 0.8, 4
    run = RunConfig(
        central_dp="client-side-fixed",
        central_dp_noise_multiplier=sigma,
        central_dp_clipping_norm=c,
    )
    central = CentralDP(run, tmp_path)
    strategy = central.wrap(make_strategy(run), n)
    glob = _arrays({"w": np.zeros((200, 250)), "b": np.zeros(1000)})
    grid = FakeGrid(n)
    messages = list(
        strategy.configure_train(1, glob, ConfigRecord({"x": 1}), SitesGrid(grid, grid.nodes))
    )
    assert len(messages) == n and all(m.content["config"]["clipping_norm"] == c for m in messages)
    same = {
        "w": np.full((200, 250), 0.003),
        "b": np.full(1000, 0.003),
    }  # every site: the same update, norm 0.68
    replies = [_reply(m, _arrays(same), num_examples=5 * (i + 1)) for i, m in enumerate(messages)]
    central.prepare_replies(replies, glob)
    np.random.seed(0)
    agg, _ = strategy.aggregate_train(1, replies)
    noise = np.concatenate([a.ravel() for a in agg.to_numpy_ndarrays()]) - np.float32(0.003)
    assert noise.size == 51_000
    assert abs(noise.mean()) < 5 * sigma * c / n / math.sqrt(noise.size)
    assert noise.std() == pytest.approx(
        sigma * c / n, rel=0.02
    )  # 51k samples: the estimate is within ~0.6 %
    assert central.noise_std(n) == pytest.approx(sigma * c / n)


# ---- accounting over the run --------------------------------------------------------------------------------------
def _independent_epsilon(sigma: float, rounds: int, delta: float) -> float:
    from dp_accounting import dp_event, rdp

    acc = rdp.RdpAccountant()
    acc.compose(dp_event.GaussianDpEvent(sigma), rounds)
    return acc.get_epsilon(delta)


def _replace_one_epsilon(sigma: float, rounds: int, delta: float) -> float:
    """Replace-one: two clipped updates differ by up to 2C, the noise std is sigma x C: the Gaussian mechanism
    with multiplier sigma / 2."""
    return _independent_epsilon(sigma / 2, rounds, delta)


def _run(tmp_path, rounds: int, ae_rounds: int = 1, **kw) -> RunConfig:
    return RunConfig(
        preset="tiny",
        num_server_rounds=rounds,
        autoencoder_rounds=ae_rounds,
        min_sites=2,
        run_dir=str(tmp_path / "run"),
        synthesize_per_class=0,
        round_timeout=5.0,
        central_dp="client-side-fixed",
        central_dp_noise_multiplier=2.0,
        central_dp_clipping_norm=0.5,
        **kw,
    )


def _records(run_dir):
    privacy = json.loads((run_dir / "privacy.json").read_text())
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return privacy, metrics, json.loads((run_dir / "run.json").read_text())


def test_client_level_epsilon_over_both_phases_and_a_resume_is_replace_one(tmp_path):
    sigma, n = 2.0, 3
    run = _run(tmp_path, rounds=3)  # 1 autoencoder round, 2 diffusion rounds
    grid = FakeGrid(n)
    assert Federation(grid, run).run_rounds() is not None
    run_dir = tmp_path / "run"
    privacy, metrics, record = _records(run_dir)
    delta = 1e-5  # min(1e-5, 1 / (10 x sites))
    agg = [m for m in metrics if m["status"] == "aggregated"]
    assert [m["round"] for m in agg] == [1, 2, 3] and [m["phase"] for m in agg] == [
        "autoencoder",
        "diffusion",
        "diffusion",
    ]
    eps = [m["client-level-epsilon"] for m in agg]
    assert eps[0] < eps[1] < eps[2]  # grows every round, across the phase switch too
    for r, e in enumerate(eps, 1):
        assert e == pytest.approx(_replace_one_epsilon(sigma, r, delta), rel=1e-9)
    assert all(m["central-dp-noise-std"] == pytest.approx(sigma * 0.5 / n) for m in agg)

    cl = privacy["client_level"]
    assert cl["protection"].startswith("client-level DP, replace-one")
    assert cl["neighboring_relation"] == "replace-one" and cl["accounted_noise_multiplier"] == 1.0
    assert cl["epsilon"] == pytest.approx(eps[-1]) and cl["delta"] == pytest.approx(delta)
    assert (
        cl["rounds"] == 3
        and cl["sites"] == n
        and cl["noise_multiplier"] == sigma
        and cl["clipping_norm"] == 0.5
    )
    assert cl["epsilon_at_delta_1e-05"] == pytest.approx(cl["epsilon"])
    assert cl["epsilon_this_run"] == pytest.approx(cl["epsilon"])
    assert cl["epsilon_per_site"] == {
        s: pytest.approx(eps[-1]) for s in ("site-0", "site-1", "site-2")
    }
    assert set(privacy["sample_level"]) == {"site-0", "site-1", "site-2"}
    assert sample_level(privacy) == privacy["sample_level"]
    assert record["central_dp"]["epsilon"] == pytest.approx(eps[-1])
    # every site's update reached the server clipped
    assert all(m.content["config"]["clipping_norm"] == 0.5 for m in grid.seen)
    releases = CentralDPLedger(tmp_path / LEDGER_FILE).releases()
    assert [(r["server_round"], r["sites"]) for r in releases] == [
        (i, ["site-0", "site-1", "site-2"]) for i in (1, 2, 3)
    ]

    # Resume with two more rounds: the accountant picks up where it was (a fresh one would restart at 1 release).
    more = _run(tmp_path, rounds=5)
    assert Federation(FakeGrid(n, seed=1), more).run_rounds() is not None
    privacy, metrics, _ = _records(run_dir)
    agg = [m for m in metrics if m["status"] == "aggregated"]
    assert [m["round"] for m in agg] == [1, 2, 3, 4, 5]
    assert privacy["client_level"]["rounds"] == 5
    assert privacy["client_level"]["epsilon"] == pytest.approx(
        _replace_one_epsilon(sigma, 5, delta), rel=1e-9
    )
    assert agg[3]["client-level-epsilon"] > agg[2]["client-level-epsilon"]


def test_central_dp_off_is_labelled_none_and_weights_by_examples(tmp_path):
    run = RunConfig(**{**_run(tmp_path, rounds=1).__dict__, "central_dp": "off"})
    grid = FakeGrid(2, step_norm=0.01)
    Federation(grid, run).run_rounds()
    privacy, metrics, record = _records(tmp_path / "run")
    assert (
        privacy["client_level"]["protection"] == "none"
        and record["central_dp"]["protection"] == "none"
    )
    assert set(privacy["sample_level"]) == {"site-0", "site-1"}
    assert not any(m["status"] == "aggregated" for m in metrics)
    assert all("clipping_norm" not in m.content["config"] for m in grid.seen)
    assert not (tmp_path / LEDGER_FILE).exists()


def test_a_site_that_refuses_stops_a_central_dp_run_without_a_release(tmp_path):
    grid = FakeGrid(3)
    grid.refuse = {3}
    assert Federation(grid, _run(tmp_path, rounds=2)).run_rounds() is None
    privacy, metrics, record = _records(tmp_path / "run")
    assert record["status"] == "stopped" and "2 of 3 asked sites" in record["reason"]
    assert privacy["client_level"]["rounds"] == 0 and privacy["client_level"]["epsilon"] == 0
    assert not any(m["status"] == "aggregated" for m in metrics)


def test_max_epsilon_stops_before_the_release_that_would_pass_it(tmp_path):
    one = _replace_one_epsilon(2.0, 1, 1e-5)
    two = _replace_one_epsilon(2.0, 2, 1e-5)
    run = _run(tmp_path, rounds=3, central_dp_max_epsilon=(one + two) / 2)
    assert Federation(FakeGrid(3), run).run_rounds() is None
    privacy, _, record = _records(tmp_path / "run")
    assert (
        record["status"] == "stopped"
        and "max_epsilon" in record["reason"]
        and record["completed_round"] == 1
    )
    assert privacy["client_level"]["epsilon"] == pytest.approx(one)


# ---- configuration ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "bad, words",
    [
        ({"central_dp": "on"}, "central-dp"),
        (
            {"central_dp": "client-side-fixed", "central_dp_noise_multiplier": 0.0},
            "noise-multiplier",
        ),
        (
            {"central_dp": "client-side-fixed", "central_dp_noise_multiplier": float("inf")},
            "noise-multiplier",
        ),
        ({"central_dp": "client-side-fixed", "central_dp_clipping_norm": -1.0}, "clipping-norm"),
        ({"central_dp": "client-side-fixed", "central_dp_delta": 1.0}, "delta"),
        ({"central_dp": "client-side-fixed", "central_dp_max_epsilon": -2.0}, "max-epsilon"),
        ({"central_dp": "client-side-fixed", "strategy": "fedadam"}, "fedavg"),
    ],
)
def test_config_refuses_bad_central_dp_values(bad, words):
    with pytest.raises(ValueError, match=words):
        RunConfig(**bad)


def test_config_reads_central_dp_keys_from_flower():
    run = RunConfig.from_flwr(
        {
            "central-dp": "client-side-fixed",
            "central-dp-noise-multiplier": "1.2",
            "central-dp-clipping-norm": 3,
            "central-dp-delta": 1e-3,
        }
    )
    assert (
        run.central_dp,
        run.central_dp_noise_multiplier,
        run.central_dp_clipping_norm,
        run.central_dp_delta,
    ) == ("client-side-fixed", 1.2, 3.0, 1e-3)
    assert RunConfig().central_dp == "off"


# ---- readers ------------------------------------------------------------------------------------------------------
def test_audit_report_carries_the_client_level_label_from_the_run_record(tmp_path):
    from privacy.report import write_audit_report
    from privacy.verdict import build_audit

    site = {
        "site": "a",
        "n_members": 0,
        "n_nonmembers": 0,
        "claimed_privacy": {
            "protection": "formal sample-level DP per patient (RDP accountant, delta=1e-3)",
            "epsilon": 4.0,
            "delta": 1e-3,
            "accountant": "rdp",
        },
    }
    central = {
        "protection": "client-level DP: bounds ... whether a whole site participated (RDP, delta=3.33e-02)",
        "epsilon": 8.01,
        "rounds": 6,
        "sites": 3,
    }
    audit = build_audit(
        {"a": site}, cohort={"n_images": 2}, run_record={"run_id": "r", "central_dp": central}
    )
    assert audit["run"]["central_dp"] == central
    write_audit_report(audit, tmp_path)
    html = (tmp_path / "audit.html").read_text()
    assert "Client level (whole site)" in html and "8.01" in html and "after 6 rounds" in html
    assert sample_level({"a": {"epsilon": 1.0}}) == {
        "a": {"epsilon": 1.0}
    }  # a privacy.json from before


# ---- attacks on the client-level claim (issue 9, item 7) ----------------------------------------------------------
def test_server_clips_an_update_just_above_the_norm(tmp_path):
    """A site that does not clip sends an update of norm C(1 + 5e-5): it must not pass unclipped."""
    c = 0.5
    run = RunConfig(central_dp="client-side-fixed", central_dp_clipping_norm=c)
    rng = np.random.default_rng(3)
    glob = _arrays({"w": rng.normal(size=(40, 30)), "b": rng.normal(size=30)})
    g = glob.to_numpy_ndarrays()
    step = [rng.normal(size=a.shape) for a in g]
    scale = c * (1 + 5e-5) / math.sqrt(sum(float((s**2).sum()) for s in step))
    new = _arrays({k: a + s * scale for k, a, s in zip(glob.keys(), g, step, strict=True)})
    reply = _reply(_train_msg(glob, {}), new)
    sent_norm = update_norm(reply.content["arrays"].to_numpy_ndarrays(), g)
    assert c < sent_norm < c * (1 + 1e-4)
    CentralDP(run, tmp_path / "run").prepare_replies([reply], glob)
    assert update_norm(reply.content["arrays"].to_numpy_ndarrays(), g) <= c


@pytest.mark.parametrize("seed", range(8))
def test_site_clipping_is_exact(seed):
    """After the site's mod the update's norm is <= C exactly, as the server measures it (no float slack)."""
    rng = np.random.default_rng(seed)
    c = float(rng.uniform(0.05, 2.0))
    glob = {"w": rng.normal(size=(64, 33)) * 10, "b": rng.normal(size=7)}
    new = {k: v + rng.normal(size=v.shape) * rng.uniform(0.01, 5) for k, v in glob.items()}
    out = central_dp_clipping_mod(
        _train_msg(_arrays(glob), {"clipping_norm": c}), None, lambda m, x: _reply(m, _arrays(new))
    )
    assert (
        update_norm(out.content["arrays"].to_numpy_ndarrays(), _arrays(glob).to_numpy_ndarrays())
        <= c
    )


def test_a_second_run_of_the_consortium_keeps_counting(tmp_path):
    """A new run (new run-dir, new run id) on the same consortium starts from what the first spent, not from 0."""
    first = RunConfig(**{**_run(tmp_path, rounds=2).__dict__, "run_dir": str(tmp_path / "run-1")})
    second = RunConfig(**{**first.__dict__, "run_dir": str(tmp_path / "run-2")})
    assert Federation(FakeGrid(3), first).run_rounds() is not None
    eps_1 = json.loads((tmp_path / "run-1" / "privacy.json").read_text())["client_level"]["epsilon"]
    assert Federation(FakeGrid(3, seed=1), second).run_rounds() is not None
    privacy, metrics, record = _records(tmp_path / "run-2")
    cl = privacy["client_level"]
    assert record["run_id"] != json.loads((tmp_path / "run-1" / "run.json").read_text())["run_id"]
    agg = [m for m in metrics if m["status"] == "aggregated"]
    assert (
        agg[0]["client-level-epsilon"] > eps_1
    )  # the second run's first release adds to the first run's
    assert cl["epsilon"] > eps_1 and cl["rounds"] == 2
    assert cl["epsilon"] == pytest.approx(_independent_epsilon(1.0, 4, cl["delta"]), rel=1e-9)
    assert cl["epsilon_this_run"] == pytest.approx(eps_1, rel=1e-9)


def test_the_claim_is_replace_one_because_the_sites_are_public(tmp_path):
    """run.json names every site, so "whether a site took part" is public: an add/remove-one claim protects
    nothing. The claim must be replace-one and its epsilon accounted with sensitivity 2C (multiplier sigma / 2)."""
    sigma = 2.0
    assert Federation(FakeGrid(3), _run(tmp_path, rounds=2)).run_rounds() is not None
    privacy, _, record = _records(tmp_path / "run")
    assert set(record["sites"]) == {"site-0", "site-1", "site-2"}  # public
    cl = privacy["client_level"]
    assert (
        "replace-one" in cl["protection"]
        and "whether a whole site participated" not in cl["protection"]
    )
    assert cl["epsilon"] == pytest.approx(_independent_epsilon(sigma / 2, 2, cl["delta"]), rel=1e-9)
    assert cl["epsilon"] > _independent_epsilon(
        sigma, 2, cl["delta"]
    )  # the add/remove figure under-counts
