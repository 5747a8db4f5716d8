"""The ``logistic`` linear probe: multinomial logistic regression on frozen, standardised backbone features.

Why this form: a closed-form-like convex fit (scikit-learn, L-BFGS) is deterministic, needs no learning-rate
schedule and works from a handful of images to tens of thousands, which is what a quick comparison of
pretrained teachers needs. The DINO paper's linear evaluation (SGD on augmented crops for 100 epochs, ViTs on the
last 4 CLS tokens) is :mod:`.dino_linear` (``evaluate protocol=dino_linear``); the two can differ by several
points on the same backbone, so results name which one a number comes from.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

__all__ = ["linear_probe_accuracy", "fit_linear_probe"]

log = logging.getLogger(__name__)


def _to_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().double().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
    return np.asarray(x)


def fit_linear_probe(train_features, train_labels, C: float = 1.0, max_iter: int = 2000):
    """Fit standardisation + L2-regularised logistic regression; returns the scikit-learn pipeline.

    ``train_features``: ``(N, D)`` tensor or array; ``train_labels``: ``(N,)`` integer labels (>= 2 classes).
    ``C`` is the inverse L2 strength (scikit-learn convention).
    """
    x, y = _to_numpy(train_features), _to_numpy(train_labels).reshape(-1)
    if x.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"linear probe needs (N, D) features and N labels; got {x.shape} and {y.shape}.")
    classes = np.unique(y)
    if classes.size < 2:
        raise ValueError(
            f"linear probe needs at least 2 classes in the training set; found only {classes.tolist()}. "
            "Add images of another class (one subfolder per class)."
        )
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        probe.fit(x, y)
    if any(issubclass(w.category, ConvergenceWarning) for w in caught):
        log.warning(
            "Linear probe: L-BFGS did not fully converge in %d iterations; accuracy may be slightly off.", max_iter
        )
    return probe


def linear_probe_accuracy(
    train_features, train_labels, test_features, test_labels, C: float = 1.0, max_iter: int = 2000
) -> float:
    """Accuracy (fraction in [0, 1]) on the test set of a linear probe fitted on the training set.

    Features: ``(N, D)`` / ``(M, D)`` tensors or arrays (any device); labels: integer class indices. Test
    classes absent from the training set count as errors.
    """
    x_test, y_test = _to_numpy(test_features), _to_numpy(test_labels).reshape(-1)
    if x_test.shape[0] == 0:
        raise ValueError("linear probe accuracy needs at least one test sample; the test set is empty.")
    probe = fit_linear_probe(train_features, train_labels, C=C, max_iter=max_iter)
    return float(np.mean(probe.predict(x_test) == y_test))
