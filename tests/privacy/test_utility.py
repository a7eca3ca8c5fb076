"""TSTR / TRTR classifiers and the lesion-detectable share on images whose classes are known to differ."""

import numpy as np
import pytest

from privacy.audit_schema import check_utility
from privacy.utility import CNNRecipe, SmallCNN, cnn_utility, coarse, radiomics_utility

FAST = CNNRecipe(steps=60, batch_size=16)
CLASSES = ("healthy", "lesion")


def heads(rng, n, lesion, size=16, dims=2):
    """Noisy discs; the lesion class carries a dark spot at a random place inside."""
    grid = np.mgrid[(slice(0, size),) * dims] / size
    out = []
    for is_lesion in lesion:
        img = (np.sqrt(((grid - 0.5) ** 2).sum(0)) < 0.4) * 0.7 + rng.normal(
            0, 0.03, grid.shape[1:]
        )
        if is_lesion:
            c = rng.uniform(0.35, 0.65, dims).reshape((dims,) + (1,) * dims)
            img[np.sqrt(((grid - c) ** 2).sum(0)) < 0.12] = 0.15
        out.append(img)
    return np.clip(np.asarray(out, np.float32)[:, None], 0, 1)


@pytest.fixture(scope="module")
def site():
    rng = np.random.default_rng(0)
    y_tr, y_te = (rng.random(120) < 0.3).astype(int), (rng.random(60) < 0.3).astype(int)
    return heads(rng, 120, y_tr), y_tr, heads(rng, 60, y_te), y_te, rng


def test_cnn_learns_from_a_good_cohort_and_sees_a_missing_lesion(site):
    x_tr, y_tr, x_te, y_te, rng = site
    y_syn = np.repeat([0, 1], 40)
    good = cnn_utility(heads(rng, 80, y_syn), y_syn, x_tr, y_tr, x_te, y_te, CLASSES, FAST)
    assert good["train_real_test_real"]["balanced_accuracy"] >= 0.9
    assert good["train_synthetic_test_real"]["balanced_accuracy"] >= 0.9
    assert good["recognised"]["lesion"] >= 0.9 and good["recognised_holdout"]["lesion"] >= 0.9
    # a generator that stopped drawing lesions: "lesion" images without one
    broken = cnn_utility(heads(rng, 80, np.zeros(80)), y_syn, x_tr, y_tr, x_te, y_te, CLASSES, FAST)
    assert broken["recognised"]["lesion"] <= 0.1
    assert broken["train_synthetic_test_real"]["balanced_accuracy"] <= 0.65
    assert broken["train_real_test_real"] == good["train_real_test_real"]  # fixed seed: same TRTR
    check_utility({"cnn": good}) and check_utility({"cnn": broken})


def test_figures_are_coarse_and_one_class_is_not_measured(site):
    x_tr, y_tr, x_te, y_te, rng = site
    out = cnn_utility(x_tr, np.zeros(len(x_tr), int), x_tr, y_tr, x_te, y_te, CLASSES, FAST)
    assert out["train_synthetic_test_real"]["note"] == "needs both classes"
    assert np.isnan(out["train_synthetic_test_real"]["balanced_accuracy"])
    for v in (*out["train_real_test_real"].values(), *out["recognised"].values()):
        assert v == coarse(v) and abs(v * 100 - round(v * 100)) < 1e-6
    assert coarse(0.123456) == 0.12 and np.isnan(coarse(float("nan")))
    rad = radiomics_utility(x_tr, y_tr, x_tr, y_tr, x_te, y_te)
    assert rad["train_real_test_real"]["balanced_accuracy"] >= 0.8
    check_utility(rad | {"cnn": out})


def test_volumes():
    rng = np.random.default_rng(1)
    y = np.repeat([0, 1], 12)
    x = heads(rng, 24, y, size=8, dims=3)
    assert SmallCNN(3, 2)(__import__("torch").from_numpy(x)).shape == (24, 2)
    out = cnn_utility(x, y, x, y, x, y, CLASSES, CNNRecipe(steps=5, batch_size=4))
    assert set(out["recognised"]) == {"healthy", "lesion"}


def test_schema_rejects_unknown_and_missing_keys(site):
    x_tr, y_tr, x_te, y_te, _ = site
    good = {"cnn": cnn_utility(x_tr, y_tr, x_tr, y_tr, x_te, y_te, CLASSES, CNNRecipe(steps=2))}
    check_utility(good)
    with pytest.raises(ValueError, match="unknown key.*extra"):
        check_utility({**good, "extra": 1})
    with pytest.raises(ValueError, match="missing key.*recognised_holdout"):
        check_utility({"cnn": {k: v for k, v in good["cnn"].items() if k != "recognised_holdout"}})
    with pytest.raises(ValueError, match=r"cnn\.train_real_test_real: unknown key.*auc_ci"):
        bad = {
            **good["cnn"],
            "train_real_test_real": {"balanced_accuracy": 1, "auc": 1, "auc_ci": 0},
        }
        check_utility({"cnn": bad})


def test_volumes_get_a_cheaper_fixed_recipe():
    from privacy.utility import CNN_RECIPE, CNN_RECIPE_3D, cnn_recipe

    assert cnn_recipe(2) is CNN_RECIPE and cnn_recipe(3) is CNN_RECIPE_3D
    assert (
        CNN_RECIPE_3D.steps * CNN_RECIPE_3D.batch_size
        < CNN_RECIPE.steps * CNN_RECIPE.batch_size / 5
    )


def test_the_cnn_steps_follow_the_real_training_set_and_are_the_same_for_tstr_and_trtr(site):
    """70 epochs of the site's real training set, 500 to 4,000 steps (a site of 1,800 needs about 4,000 to learn a
    faint lesion; one of 200 learns nothing more from more steps): fixed before any training, never by a score."""
    from privacy.utility import CNN_RECIPE

    assert CNN_RECIPE.for_training_size(200).steps == 500
    assert CNN_RECIPE.for_training_size(1800).steps == 3938
    assert CNN_RECIPE.for_training_size(100_000).steps == 4000
    fixed = CNNRecipe(steps=60)
    # epochs 0: the steps as given (tests, a site's override)
    assert fixed.for_training_size(100_000) is fixed
    assert CNN_RECIPE.fixed(20).for_training_size(100_000).steps == 20
    x_tr, y_tr, x_te, y_te, _ = site
    scaled = CNNRecipe(
        steps=10, epochs=8, batch_size=16
    )  # 8 epochs of the 120 real images: 60 steps
    out = cnn_utility(x_tr[:40], y_tr[:40], x_tr, y_tr, x_te, y_te, CLASSES, scaled)
    assert (
        "60 steps of 16" in out["classifier"]
    )  # set by the real training set (120), not the synthetic (40)
