"""Known-harmless third-party messages are dropped at their source; nothing else is."""

import logging

import numpy as np
import pytest

from common.noise import KNOWN_LOG_NOISE, silence_known_noise
from common.phantoms import make_phantom_sites
from common.site import load_image

MONAI = "monai.data.nvimgcodec_pydicom_plugin"
MONAI_MESSAGE = "nvImageCodec is not available; skipping pydicom decoder plugin registration."


@pytest.fixture
def unfiltered():
    """Each test starts without our filters and leaves none behind."""
    names = {name for name, _ in KNOWN_LOG_NOISE}
    saved = {n: list(logging.getLogger(n).filters) for n in names}
    for n in names:
        logging.getLogger(n).filters.clear()
    yield
    for n, filters in saved.items():
        logging.getLogger(n).filters[:] = filters


def _messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records]


def test_monai_reader_warning_repeats_per_image_without_the_filter_and_never_with_it(
    tmp_path, unfiltered, caplog
):
    site = make_phantom_sites(tmp_path, n_sites=1, n_subjects=3, size=32, seed=0)[0]
    images = sorted((site / "images").glob("*.nii.gz"))
    caplog.set_level(logging.WARNING)
    for path in images:
        load_image(path, spatial_dims=2, image_size=32)
    assert _messages(caplog).count(MONAI_MESSAGE) == len(images)  # the noise, once per image

    caplog.clear()
    silence_known_noise()
    silence_known_noise()  # idempotent
    assert len(logging.getLogger(MONAI).filters) == 1
    for path in images:
        image, _, _ = load_image(path, spatial_dims=2, image_size=32)
        assert np.isfinite(image).all()
    assert MONAI_MESSAGE not in _messages(caplog)


def test_only_the_exact_messages_are_dropped(unfiltered, caplog):
    silence_known_noise()
    caplog.set_level(logging.DEBUG)
    logging.getLogger(MONAI).warning(MONAI_MESSAGE)
    logging.getLogger(MONAI).warning(MONAI_MESSAGE + " and something else")
    logging.getLogger(MONAI).error("a real MONAI error")
    logging.getLogger("flwr").warning("Federated evaluation failed")
    logging.getLogger("fedsynth.server").warning(MONAI_MESSAGE)  # ours: never hidden
    assert _messages(caplog) == [
        MONAI_MESSAGE + " and something else",
        "a real MONAI error",
        "Federated evaluation failed",
        MONAI_MESSAGE,
    ]
