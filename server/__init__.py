"""Guildcast: a real-time notification fanout server.

``from guildcast import Server, Config`` gives the embedded node; the imports
are lazy so that ``guildcast.protocol`` and ``guildcast.client`` stay light.
The repository's ``server/`` folder is this package; ``clients/`` is
``guildcast.client`` and ``loadtest/`` is ``guildcast.loadtest``
(``pyproject.toml`` maps them).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from guildcast.config import Config
    from guildcast.node import Server

try:
    __version__ = version("guildcast")
except PackageNotFoundError:  # running from a tree that was never installed
    __version__ = "0+unknown"

__all__ = ["Config", "Server", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "Server":
        from guildcast.node import Server

        return Server
    if name == "Config":
        from guildcast.config import Config

        return Config
    raise AttributeError(name)
