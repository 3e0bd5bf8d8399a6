"""Guildcast: a real-time notification fanout server.

``from guildcast import Server, Config`` gives the embedded node; the imports
are lazy so that ``guildcast.protocol`` and ``guildcast.client`` stay light.
The repository's ``server/`` folder is this package; ``clients/`` is
``guildcast.client`` and ``loadtest/`` is ``guildcast.loadtest``
(``pyproject.toml`` maps them).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from guildcast.config import Config
    from guildcast.node import Server

__all__ = ["Config", "Server", "__version__"]

#: The installed version, read on first use (``__getattr__``).
__version__: str


def _version() -> str:
    # Read on first use: importlib.metadata cost 0.05-0.1 s of every import
    # of the package, a node's restart included.
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("guildcast")
    except PackageNotFoundError:  # running from a tree that was never installed
        return "0+unknown"


def __getattr__(name: str) -> Any:
    if name == "__version__":
        v = globals()["__version__"] = _version()
        return v
    if name == "Server":
        from guildcast.node import Server

        return Server
    if name == "Config":
        from guildcast.config import Config

        return Config
    raise AttributeError(name)
