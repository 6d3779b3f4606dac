"""The model store: any pipeline's models, found locally, in the store, or fetched from the Hub.

``resolve_model`` is the one entry; ``python -m pipelines.model_store`` prefetches.
"""

from pipelines.model_store.errors import DownloadLimits, DownloadStopped, ModelDownloadError
from pipelines.model_store.resolve import resolve_model, wanted_files

__all__ = ["DownloadLimits", "DownloadStopped", "ModelDownloadError", "resolve_model", "wanted_files"]
