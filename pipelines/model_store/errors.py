"""The model store's one error: the message says what went wrong and what to do."""


class ModelDownloadError(RuntimeError):
    """The model is not in the store and cannot be fetched; the message says why and what to do."""

