"""surgenet-ssl: DINO self-supervised pretraining of surgical foundation models (SurgeNet recipe)."""

from importlib.metadata import PackageNotFoundError, version

try:  # the installed distribution's version (pyproject.toml), so there is one place to bump it
    __version__ = version("surgenet-ssl")
except PackageNotFoundError:  # imported from a checkout that was never installed
    __version__ = "0+unknown"
