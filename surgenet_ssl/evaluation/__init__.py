"""Evaluation of (teacher) backbones: DINO weighted k-NN, linear probe, collapse diagnostics, t-SNE maps.

Plain PyTorch / numpy / scikit-learn / matplotlib: the training callbacks and ``python -m surgenet_ssl.evaluate``
both call these functions.
"""

from .batch_norm import calibrate_batch_norm, uncalibrated_batch_norms
from .diagnostics import (
    CONSTANT_RATIO,
    ONEHOT_RATIO,
    UNIFORM_RATIO,
    CollapseTracker,
    collapse_diagnostics,
    collapse_kind,
    collapse_warning,
    effective_rank,
    entropy,
)
from .dino_linear import DinoLinearResult, dino_linear_eval, linear_input
from .embedding_map import clamp_perplexity, save_embedding_map, tsne_embedding
from .features import (
    ExtractedFeatures,
    ImageFolderDataset,
    eval_transform,
    extract_features,
    resolve_device,
)
from .knn import knn_accuracy, knn_classify
from .linear_probe import fit_linear_probe, linear_probe_accuracy

__all__ = [
    "knn_classify",
    "knn_accuracy",
    "linear_probe_accuracy",
    "fit_linear_probe",
    "dino_linear_eval",
    "DinoLinearResult",
    "linear_input",
    "collapse_diagnostics",
    "collapse_warning",
    "collapse_kind",
    "CollapseTracker",
    "entropy",
    "effective_rank",
    "UNIFORM_RATIO",
    "ONEHOT_RATIO",
    "CONSTANT_RATIO",
    "save_embedding_map",
    "tsne_embedding",
    "clamp_perplexity",
    "ImageFolderDataset",
    "ExtractedFeatures",
    "extract_features",
    "eval_transform",
    "resolve_device",
    "calibrate_batch_norm",
    "uncalibrated_batch_norms",
]
