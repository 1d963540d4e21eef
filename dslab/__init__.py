"""dslab: a command-line lab for learning distributed systems on Redis."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("dslab")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"
