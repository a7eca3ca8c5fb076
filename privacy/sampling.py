"""Poisson sampling of PATIENTS for DP-SGD, with exactly the rate and step count the ledger records.

The privacy unit is the patient. Each step, every patient is in the batch independently with probability
`sample_rate`; a patient in the batch contributes exactly ONE of their records (scans), chosen uniformly at random
by the site. So one patient changes at most one clipped per-sample gradient per step: the sensitivity stays the
clipping norm C per patient per step, which is what the accountant assumes.

The sampler runs exactly `steps` batches per pass. Opacus' own `DPDataLoader` derives both from the loader
(sample rate 1 / len(loader), then int(1 / sample_rate) steps), and for 93, 99, 105, ... batches per epoch the
float round trip gives one step fewer than planned: the mechanism run must be the one the ledger recorded.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from opacus.data_loader import dtype_safe, shape_safe, wrap_collate_with_empty
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch.utils.data import DataLoader, Dataset
from torch.utils.data._utils.collate import default_collate


class PatientPoissonSampler(UniformWithReplacementSampler):
    """Opacus' Poisson sampler over patients; yields the record indices of one random record per drawn patient.

    `groups[i]` are the record indices of patient i. `generator` (also settable afterwards, as Opacus' is) draws
    both the Poisson mask and the record choice; None uses torch's global generator.
    """

    def __init__(
        self,
        groups: Sequence[Sequence[int]],
        sample_rate: float,
        steps: int,
        generator: torch.Generator | None = None,
    ):
        if not groups or any(len(g) == 0 for g in groups):
            raise ValueError("every patient needs at least one record")
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        if int(steps) != steps or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps}")
        super().__init__(
            num_samples=len(groups), sample_rate=sample_rate, generator=generator, steps=int(steps)
        )
        self.groups = [list(map(int, g)) for g in groups]

    def __iter__(self):
        for _ in range(self.steps):
            mask = torch.rand(self.num_samples, generator=self.generator) < self.sample_rate
            batch = []
            for patient in mask.nonzero(as_tuple=False).reshape(-1).tolist():
                records = self.groups[patient]
                pick = (
                    0
                    if len(records) == 1
                    else int(torch.randint(len(records), (1,), generator=self.generator))
                )
                batch.append(records[pick])
            yield batch


def patient_loader(
    dataset: Dataset,
    groups: Sequence[Sequence[int]],
    sample_rate: float,
    steps: int,
    generator: torch.Generator | None = None,
) -> DataLoader:
    """A loader drawing `steps` Poisson batches of patients at `sample_rate` (empty batches keep their shapes)."""
    first = dataset[groups[0][0]]
    sample = first if isinstance(first, (tuple, list)) else (first,)
    collate = wrap_collate_with_empty(
        collate_fn=default_collate,
        sample_empty_shapes=[(0, *shape_safe(x)) for x in sample],
        dtypes=[dtype_safe(x) for x in sample],
    )
    return DataLoader(
        dataset,
        batch_sampler=PatientPoissonSampler(groups, sample_rate, steps, generator),
        collate_fn=collate,
    )


def patients_per_step(loader: DataLoader) -> float:
    """The expected number of patients in a batch (what DP-SGD divides the noisy gradient sum by)."""
    sampler = loader.batch_sampler
    return sampler.num_samples * sampler.sample_rate
