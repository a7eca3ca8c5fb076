"""Utility of a synthetic cohort, measured the DP way: train on synthetic, test on real (TSTR), beside train on
real, test on real (TRTR), with classifiers whose design is fixed in advance and never tuned on site data.

Two classifiers, both run at a site on its own data (client/audit.py); only coarse figures leave:
- `radiomics_utility`: a class-balanced logistic regression on the radiomics features of privacy/fidelity.py;
- `cnn_utility`: `SmallCNN` on the images themselves, trained by `train_cnn` with the fixed `CNN_RECIPE`.
  Beside TSTR and TRTR it reports how the TRTR classifier (trained on the site's real patients) labels the
  synthetic images of each class: the share of lesion-class synthetic images in which it detects a lesion, and
  the share of healthy-class ones it calls healthy, with the same shares on the real hold-out for scale.

Why the recipe is what it is (chosen before any measurement, and never changed by looking at evaluation or site
data: DPImageBench 2025 shows that tuning on the sensitive test set voids DP and inflates results):
- the architecture is the smallest usual image classifier: three 3x3 conv blocks (8, 16, 32 channels, GroupNorm,
  ReLU, max-pool), global average pooling, one linear layer; the same in 2-D and 3-D. The widths are set by CPU
  cost, not by accuracy: every site trains two of these in every audit on a CPU (16, 32, 64 channels measured
  2.6x slower per step here);
- Adam at its default learning rate 1e-3 with weight decay 1e-4, batches of 32, for a number of steps fixed by the
  size of the site's REAL training set before any training: 70 epochs of it, at least 500 and at most 4,000 steps
  (volumes: 150 steps of 16, `CNN_RECIPE_3D`, by CPU cost). TSTR and TRTR get that same budget, and there is no
  validation set to stop early on. Why 70 epochs (session 14, phantoms of a draw and protocol no benchmark site
  uses, 15 % lesions, tested on 600 others): from 1,800 training images this CNN reads balanced accuracy 0.50 after
  500 or 1,000 steps, 0.75 after 2,000 and 0.90 after 4,000 (the faint lesion is learnt late, at once); from 200
  or 600 images it stays at chance even after 2,000, so a small site keeps the 500 steps' CPU cost. The fixed 500
  steps before it left the audit's real-trained CNN at chance on real patients (0.50-0.57 at sites of 1,800);
- classes are sampled with equal probability in every batch (the lesion class is rare at every site), so the
  0.5 decision threshold targets balanced accuracy without choosing a threshold on any data;
- left-right flips as the only augmentation (brains are nearly symmetric; it changes no class);
- a fixed seed, so two audits of the same cohort give the same figures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn

from privacy.fidelity import radiomics_features

# Figures that leave a site are rounded to this (they are computed on patients without DP: the hold-out, and
# classifiers trained on the training patients); counts are not sent beyond the test-set size already in audit.json.
COARSE = 0.01


@dataclass(frozen=True)
class CNNRecipe:
    """The classifier's fixed training recipe (see the module docstring for why each value)."""

    channels: tuple[int, ...] = (8, 16, 32)
    steps: int = 500  # at least this many; exactly this many when `epochs` is 0
    # enough steps for this many passes over the real training set, up to max_steps (0: `steps`, fixed)
    epochs: float = 0.0
    max_steps: int = 4000
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 0

    def for_training_size(self, n_train: int) -> CNNRecipe:
        """The recipe with its step count fixed for a real training set of `n_train` images."""
        if not self.epochs:
            return self
        need = math.ceil(self.epochs * n_train / self.batch_size)
        return self.fixed(min(self.max_steps, max(self.steps, need)))

    def fixed(self, steps: int) -> CNNRecipe:
        """The recipe with exactly `steps` steps, whatever the training set (a site's override, a quick run)."""
        return replace(self, steps=steps, epochs=0.0)


CNN_RECIPE = CNNRecipe(epochs=70)
# Volumes: one step of 32 at 32^3 costs about 7x a 2-D step of 32 at 64^2 (0.37 vs 0.05 s measured on one thread),
# and every site trains two classifiers in every audit; set by CPU cost alone, like the widths.
CNN_RECIPE_3D = CNNRecipe(steps=150, batch_size=16)


def cnn_recipe(spatial_dims: int) -> CNNRecipe:
    """The fixed recipe for 2-D slices or 3-D volumes (both chosen a priori, by CPU cost)."""
    return CNN_RECIPE_3D if spatial_dims == 3 else CNN_RECIPE


def coarse(x: float) -> float:
    """A figure rounded to COARSE (NaN stays NaN: audit.json writes it as null)."""
    return float(x) if not np.isfinite(x) else round(round(float(x) / COARSE) * COARSE, 6)


class SmallCNN(nn.Module):
    """Conv blocks (3x3 conv, GroupNorm, ReLU, max-pool by 2), global average pooling, a linear layer."""

    def __init__(
        self, spatial_dims: int, num_classes: int, channels: tuple[int, ...] = (16, 32, 64)
    ):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"SmallCNN: spatial_dims must be 2 or 3, got {spatial_dims}")
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        pool = nn.MaxPool2d if spatial_dims == 2 else nn.MaxPool3d
        layers: list[nn.Module] = []
        c_in = 1
        for c in channels:
            layers += [conv(c_in, c, 3, padding=1), nn.GroupNorm(4, c), nn.ReLU(), pool(2)]
            c_in = c
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(2).mean(2))


def _check(images: np.ndarray, labels: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(images, np.float32), np.asarray(labels, np.int64)
    if x.ndim not in (4, 5) or x.shape[1] != 1 or len(x) != len(y):
        raise ValueError(
            f"{where}: expected images (N, 1, H, W) or (N, 1, D, H, W) and N labels, got {x.shape} "
            f"and {y.shape}"
        )
    return x, y


def train_cnn(
    images: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    recipe: CNNRecipe = CNN_RECIPE,
    device: torch.device | str = "cpu",
) -> SmallCNN:
    """SmallCNN trained by `recipe` (class-balanced batches, flips, fixed steps and seed) on every class present;
    raises ValueError when fewer than two classes are present."""
    x, y = _check(images, labels, "train_cnn")
    present = np.unique(y)
    if len(present) < 2:
        raise ValueError(f"train_cnn: needs two classes, got only {present.tolist()}")
    gen = torch.Generator().manual_seed(recipe.seed)
    torch.manual_seed(recipe.seed)
    model = SmallCNN(x.ndim - 2, num_classes, recipe.channels).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    counts = np.bincount(y, minlength=num_classes)
    weights = torch.from_numpy(np.where(counts[y] > 0, 1.0 / np.maximum(counts[y], 1), 0.0))
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    model.train()
    for _ in range(recipe.steps):
        idx = torch.multinomial(weights, recipe.batch_size, replacement=True, generator=gen)
        xb = xt[idx]
        flip = torch.rand(len(idx), generator=gen) < 0.5
        xb = torch.where(flip.view(-1, *[1] * (xb.ndim - 1)), xb.flip(-1), xb).to(device)
        loss = nn.functional.cross_entropy(model(xb), yt[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


@torch.no_grad()
def predict_proba(model: SmallCNN, images: np.ndarray, batch_size: int = 128) -> np.ndarray:
    """(N, classes) class probabilities."""
    device = next(model.parameters()).device
    x = torch.from_numpy(np.asarray(images, np.float32))
    out = [
        torch.softmax(model(x[s : s + batch_size].to(device)), 1).cpu()
        for s in range(0, len(x), batch_size)
    ]
    return torch.cat(out).numpy() if out else np.zeros((0, model.head.out_features))


def _scores(y_true: np.ndarray, proba: np.ndarray) -> dict[str, float]:
    """Balanced accuracy (argmax) and AUC of the last class against the rest, coarse."""
    pred = proba.argmax(1)
    return {
        "balanced_accuracy": coarse(balanced_accuracy_score(y_true, pred)),
        "auc": coarse(roc_auc_score(y_true == proba.shape[1] - 1, proba[:, -1])),
    }


def _needs_both(*label_sets: np.ndarray) -> str:
    return "" if all(len(np.unique(y)) >= 2 for y in label_sets) else "needs both classes"


def _not_measured(note: str) -> dict[str, Any]:
    return {"balanced_accuracy": float("nan"), "auc": float("nan"), "note": note}


def cnn_utility(
    synthetic: np.ndarray,
    synthetic_labels: np.ndarray,
    train_images: np.ndarray,
    train_labels: np.ndarray,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    class_names,
    recipe: CNNRecipe = CNN_RECIPE,
    device: torch.device | str = "cpu",
    trtr_model: SmallCNN | None = None,
) -> dict[str, Any]:
    """TSTR and TRTR with SmallCNN (same recipe for both), and how the TRTR classifier labels each class of the
    synthetic images (`recognised`: class -> share of that class's synthetic images it assigns to the class,
    e.g. the share of lesion-class synthetic images in which it detects a lesion) and of the real hold-out
    (`recognised_holdout`, the scale to read it against). All figures coarse. `trtr_model`: the TRTR classifier
    already trained by `train_cnn` on these training images (a benchmark scoring several cohorts against one
    site reuses it; the recipe and seed make it the same model)."""
    syn, y_syn = _check(synthetic, synthetic_labels, "cnn_utility (synthetic)")
    tr, y_tr = _check(train_images, train_labels, "cnn_utility (training)")
    te, y_te = _check(test_images, test_labels, "cnn_utility (hold-out)")
    # the same steps for TSTR and TRTR, set by the real training set's size
    recipe = recipe.for_training_size(len(tr))
    k = len(class_names)
    out: dict[str, Any] = {
        "classifier": f"SmallCNN {list(recipe.channels)}, Adam lr {recipe.lr}, {recipe.steps} steps of "
        f"{recipe.batch_size}, class-balanced, fixed a priori (privacy/utility.py)",
        "n_test": int(len(te)),
    }
    note = _needs_both(y_syn, y_te)
    out["train_synthetic_test_real"] = (
        _not_measured(note)
        if note
        else _scores(y_te, predict_proba(train_cnn(syn, y_syn, k, recipe, device), te))
    )
    note = _needs_both(y_tr, y_te)
    if note:
        out["train_real_test_real"] = _not_measured(note)
        out["recognised"] = {}
        out["recognised_holdout"] = {}
        return out
    trtr = trtr_model or train_cnn(tr, y_tr, k, recipe, device)
    p_te = predict_proba(trtr, te)
    out["train_real_test_real"] = _scores(y_te, p_te)
    pred_syn = predict_proba(trtr, syn).argmax(1) if len(syn) else np.zeros(0, int)
    pred_te = p_te.argmax(1)
    out["recognised"] = {
        name: coarse((pred_syn[y_syn == c] == c).mean())
        for c, name in enumerate(class_names)
        if (y_syn == c).any()
    }
    out["recognised_holdout"] = {
        name: coarse((pred_te[y_te == c] == c).mean())
        for c, name in enumerate(class_names)
        if (y_te == c).any()
    }
    return out


def radiomics_utility(
    synthetic: np.ndarray,
    synthetic_labels: np.ndarray,
    train_images: np.ndarray,
    train_labels: np.ndarray,
    test_images: np.ndarray,
    test_labels: np.ndarray,
) -> dict[str, Any]:
    """TSTR and TRTR with a class-balanced logistic regression on standardised radiomics features (fixed: sklearn
    defaults, C = 1), coarse."""

    def fit_eval(x_tr, y_tr, x_te, y_te) -> dict[str, Any]:
        note = _needs_both(y_tr, y_te)
        if note:
            return _not_measured(note)
        clf = make_pipeline(
            StandardScaler(), LogisticRegression(max_iter=2000, class_weight="balanced")
        )
        clf.fit(x_tr, y_tr)
        return _scores(y_te, clf.predict_proba(x_te))

    f_syn, _ = radiomics_features(synthetic)
    f_tr, _ = radiomics_features(train_images)
    f_te, _ = radiomics_features(test_images)
    return {
        "classifier": "logistic regression on radiomics features (tested on the site's hold-out)",
        "n_test": int(len(test_images)),
        "train_synthetic_test_real": fit_eval(f_syn, synthetic_labels, f_te, test_labels),
        "train_real_test_real": fit_eval(f_tr, train_labels, f_te, test_labels),
    }
