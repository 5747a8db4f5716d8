"""Numbered checkpoints kept for good every N epochs, beside the rolling newest checkpoint."""

from __future__ import annotations

from pytorch_lightning.callbacks import ModelCheckpoint


class ArchiveCheckpoint(ModelCheckpoint):
    """A ModelCheckpoint whose state key cannot collide with the main checkpoint callback's.

    Lightning keys callback state by (monitor, mode, intervals); an archive every epoch would otherwise share the
    key of the per-epoch checkpointer and the Trainer refuses to start.
    """

    @property
    def state_key(self) -> str:
        return self._generate_state_key(kind="archive", every_n_epochs=self._every_n_epochs,
                                        every_n_train_steps=self._every_n_train_steps)  # fmt: skip
