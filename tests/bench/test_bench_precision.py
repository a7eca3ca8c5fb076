"""bench_precision: each variant of the arithmetic runs and times each of the demo's loops."""

from bench.bench_precision import VARIANTS, measure


def test_each_variant_times_each_loop():
    cost = measure("tiny", repeats=1)
    assert list(cost) == ["autoencoder train", "UNet train", "UNet forward"]
    assert all(list(c) == list(VARIANTS) and all(s > 0 for s in c.values()) for c in cost.values())
