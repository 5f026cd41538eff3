"""The package's version, in the lowest layer so that any module may record it (reports, stage keys)."""

import importlib.metadata

try:  # pyproject.toml is the one place the version is written
    __version__ = importlib.metadata.version("antidote-llm")
except importlib.metadata.PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"
