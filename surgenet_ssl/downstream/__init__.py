"""Downstream fine-tuning: segmentation (FPN) and frame classification datasets, joint augmentation, metrics, a
LightningModule and the runner behind ``python -m surgenet_ssl.finetune``.

Plain PyTorch / numpy apart from ``module.py`` (Lightning) and ``runner.py`` (Hydra configs at the edge).
"""

from .classification_data import (
    CHOLEC80_PHASES,
    ClassificationDataset,
    ClsSample,
    cholec80_samples,
    csv_samples,
    read_phase_annotation,
)
from .fractions import select_fraction, stable_rank_key
from .metrics import (
    average_precision,
    classification_metrics,
    confusion_matrix,
    multilabel_metrics,
    nan_to_none,
    segmentation_metrics,
)
from .segmentation_data import (
    CHOLECSEG8K_CLASSES,
    CHOLECSEG8K_COLORS,
    CHOLECSEG8K_WATERSHED,
    MaskReader,
    SegmentationDataset,
    SegSample,
    cholecseg8k_samples,
    folder_samples,
)
from .transforms import SegmentationTransform, classification_transform

__all__ = [
    "CHOLEC80_PHASES",
    "CHOLECSEG8K_CLASSES",
    "CHOLECSEG8K_COLORS",
    "CHOLECSEG8K_WATERSHED",
    "ClassificationDataset",
    "ClsSample",
    "MaskReader",
    "SegSample",
    "SegmentationDataset",
    "SegmentationTransform",
    "average_precision",
    "cholec80_samples",
    "cholecseg8k_samples",
    "classification_metrics",
    "classification_transform",
    "confusion_matrix",
    "csv_samples",
    "folder_samples",
    "multilabel_metrics",
    "nan_to_none",
    "read_phase_annotation",
    "segmentation_metrics",
    "select_fraction",
    "stable_rank_key",
]
