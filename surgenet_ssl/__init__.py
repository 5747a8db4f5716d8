"""surgenet-ssl: DINO self-supervised pretraining of surgical foundation models (SurgeNet recipe)."""

__version__ = "0.1.0"
