"""Guildcast: a real-time notification fanout server.

``from server import Server, Config`` gives the embedded node; the imports
are lazy so that ``server.protocol`` stays light for clients.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from server.config import Config
    from server.node import Server

__all__ = ["Config", "Server"]


def __getattr__(name: str) -> Any:
    if name == "Server":
        from server.node import Server

        return Server
    if name == "Config":
        from server.config import Config

        return Config
    raise AttributeError(name)
