"""The generic Livepeer AI runner process: HTTP surface, lifecycle, health."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("livepeer-llm-runner")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"
