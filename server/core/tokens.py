"""Token verification and minting (PROTOCOL.md, "Tokens"): JWT, HS256 only."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import jwt

from server.protocol.session import AuthError, Grant

#: Longest token accepted before any parsing; real tokens are a few hundred bytes.
MAX_TOKEN_BYTES = 8192
ALGORITHM = "HS256"


class TokenVerifier:
    """Callable that checks a token and returns its :class:`Grant`.

    Only HS256 with the server's secret is accepted (never ``none``, never an
    asymmetric algorithm: no algorithm confusion); ``exp`` and ``nbf`` are
    checked when present; ``sub`` is required. Raises :class:`AuthError`.
    """

    __slots__ = ("_secret",)

    def __init__(self, secret: str) -> None:
        if not secret:
            raise ValueError("an empty secret would accept forged tokens")
        self._secret = secret

    def __call__(self, token: str) -> Grant:
        if len(token) > MAX_TOKEN_BYTES:
            raise AuthError("token too long")
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=[ALGORITHM],
                options={"require": ["sub"]},
            )
        except jwt.PyJWTError as e:
            raise AuthError(str(e) or type(e).__name__) from None
        return grant_from_claims(claims)


def _patterns(claims: dict[str, Any], key: str) -> tuple[str, ...]:
    v = claims.get(key, [])
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(p, str) and 0 < len(p) <= 256 for p in v):
        raise AuthError(f"claim {key!r} must be a list of guild patterns")
    return tuple(v)


def grant_from_claims(claims: dict[str, Any]) -> Grant:
    """Validate the claim types and build a :class:`Grant`; raises :class:`AuthError`."""
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub or len(sub) > 256:
        raise AuthError("claim 'sub' must be a non-empty string")
    rate = claims.get("pub_rate")
    if rate is not None and (
        isinstance(rate, bool) or not isinstance(rate, int | float) or rate < 0
    ):
        raise AuthError("claim 'pub_rate' must be a number >= 0")
    return Grant(
        sub=sub,
        guilds=_patterns(claims, "guilds"),
        pub=_patterns(claims, "pub"),
        pub_rate=None if rate is None else float(rate),
    )


def make_token(
    secret: str,
    sub: str,
    guilds: Sequence[str] = ("*",),
    pub: Sequence[str] = (),
    pub_rate: float | None = None,
    ttl: float | None = 3600,
) -> str:
    """Mint an HS256 token for ``sub`` (what ``guildcast token`` prints)."""
    claims: dict[str, Any] = {"sub": sub, "guilds": list(guilds), "iat": int(time.time())}
    if pub:
        claims["pub"] = list(pub)
    if pub_rate is not None:
        claims["pub_rate"] = pub_rate
    if ttl is not None:
        claims["exp"] = int(time.time() + ttl)
    return jwt.encode(claims, secret, algorithm=ALGORITHM)
