"""An HTTP client of one node's API (docs/PROTOCOL.md "HTTP API"), for tests.

Answers are ``(status, body, headers)``: the body decoded from JSON when the
answer says it is JSON, raw bytes otherwise. Every request is bounded by
:data:`~tests.support.wait.TIMEOUT`.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson

from tests.support.wait import TIMEOUT

#: The API key every test node accepts (``api_keys`` / ``--api-key``).
KEY = "test-api-key-1"


class Api:
    """An HTTP client for one node's API; answers are ``(status, body, headers)``."""

    def __init__(self, base: str, key: str | None = KEY) -> None:
        self.base = base
        self.key = key
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT))

    async def __aenter__(self) -> Api:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.session.close()

    def _headers(self, headers: dict[str, str] | None) -> dict[str, str]:
        out = {} if self.key is None else {"Authorization": f"Bearer {self.key}"}
        out.update(headers or {})
        return out

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        data: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any, dict[str, str]]:
        h = self._headers(headers)
        if json is not None:
            data = orjson.dumps(json)
            h.setdefault("Content-Type", "application/json")
        async with self.session.request(method, self.base + path, data=data, headers=h) as r:
            raw = await r.read()
            ctype = r.headers.get("Content-Type", "")
            body: Any = orjson.loads(raw) if ctype.startswith("application/json") else raw
            return r.status, body, dict(r.headers)

    async def publish(self, body: Any, **kw: Any) -> tuple[int, Any, dict[str, str]]:
        return await self.request("POST", "/v1/publish", json=body, **kw)

    async def get(self, path: str, **kw: Any) -> tuple[int, Any, dict[str, str]]:
        return await self.request("GET", path, **kw)
