"""Poisson sampling of patients runs exactly the planned steps at the planned rate, one record per patient."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from privacy.dp import make_private
from privacy.sampling import patient_loader


def _opacus_steps(n: int, batch_size: int) -> int:
    """What the private loader ran before: Opacus' own DPDataLoader over a plain loader."""
    model = torch.nn.Linear(2, 1)
    loader = DataLoader(TensorDataset(torch.zeros(n, 2)), batch_size=batch_size)
    _, _, private = make_private(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        loader,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
    )
    return len(private)


def test_opacus_own_loader_runs_one_step_short_for_some_lengths():
    """Why the site passes the planned steps: ceil(93 / 1) = 93 planned, Opacus' loader runs 92."""
    assert _opacus_steps(93, 1) == 92 and _opacus_steps(99, 1) == 98


@pytest.mark.parametrize("grad_sample_mode", ["bookkeeping", "hooks"])
def test_the_private_loader_runs_exactly_the_planned_steps(grad_sample_mode):
    for n, batch_size in [(93, 1), (186, 2), (99, 1), (105, 1), (20, 3), (7, 16)]:
        steps = math.ceil(n / batch_size)
        model = torch.nn.Linear(2, 1)
        loader = patient_loader(
            TensorDataset(torch.zeros(n, 2)), [[i] for i in range(n)], 1 / steps, steps
        )
        _, _, private = make_private(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            loader,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            grad_sample_mode=grad_sample_mode,
        )
        assert len(private) == steps and sum(1 for _ in private) == steps, (n, batch_size)
        assert private.batch_sampler.sample_rate == 1 / steps


def test_a_sampled_patient_contributes_exactly_one_of_its_records():
    groups = [[0, 1, 2], [3], [4, 5]]
    loader = patient_loader(
        TensorDataset(torch.arange(6.0)), groups, 1.0, 200, torch.Generator().manual_seed(0)
    )
    seen = set()
    for (batch,) in loader:
        ids = batch.long().tolist()
        assert len(ids) == 3  # rate 1: every patient, once
        assert [sum(i in g for i in ids) for g in groups] == [1, 1, 1]
        seen.update(ids)
    assert seen == set(range(6))  # every scan gets its turn: the choice is random


def test_empty_batches_keep_their_shapes():
    loader = patient_loader(
        TensorDataset(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long)),
        [[0], [1], [2], [3]],
        1e-9,
        3,
    )
    for x, y in loader:
        assert x.shape == (0, 3) and y.shape == (0,)
