"""DINO pretraining on Lightning: the LightningModule, the data module, the Trainer set-up shared by the training
and fine-tuning entry points, loggers, continued pretraining from weights, and the teacher export.

Light on import: the submodules that need torch/Lightning import them themselves; import them directly
(``from surgenet_ssl.training.module import DINOModule``)."""
