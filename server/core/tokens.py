"""Token verification and minting (PROTOCOL.md, "Tokens"): JWT, HS256 only.

:class:`TokenVerifier` keeps a bounded cache of tokens it has verified
(exact token string -> :class:`Grant` and the token's ``exp``, ``nbf`` and
``iat``), so a client that reconnects with the same token skips the
signature check and the JSON decode. Consistency: a hit is re-checked
against the clock on every use exactly as PyJWT checks it (whole seconds,
no leeway: expired once ``exp <= now``, not yet valid while ``nbf > now`` or
``iat > now``), so an expired token is refused exactly as without the
cache; failures are never cached;
the cached claims are those of a token whose signature was verified with
one of this verifier's secrets, and a token string fixes its claims, so a
hit can never grant more than verifying again would.

Secret rotation: a verifier accepts tokens signed with its secret or with
any of its ``previous`` secrets (``Config.previous_secrets``), so nodes can
accept a new secret before the token issuer signs with it, and an old one
until the tokens signed with it have expired (docs/SECURITY.md).

Fast path: a new token in the shape every common issuer mints (header
exactly ``{"alg":"HS256","typ":"JWT"}`` or ``{"alg":"HS256"}``, only the
claims Guildcast knows, integer times) is checked here with one
``hmac.digest`` per secret, compared in constant time with the token's own
signature text, and one ``orjson.loads``: about 10x cheaper than
``jwt.decode`` (whose per-call key preparation and per-character base64
check cost ~95 us, the largest single share of accepting a connection).
Anything else, including every token whose signature does not match, goes
to PyJWT, which stays the authority: the fast path can only accept a token
PyJWT would accept with the same claims (``tests/core/test_token_fast.py``
checks this against PyJWT, token by token).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import orjson

from guildcast.protocol.session import AuthError, Grant

#: Longest token accepted before any parsing; real tokens are a few hundred bytes.
MAX_TOKEN_BYTES = 8192
ALGORITHM = "HS256"
#: Verified tokens remembered (least recently used dropped first): about
#: 400 bytes each with the key and grant (measured), so at most ~1.6 MiB;
#: enough for clients that come back after a network blip (the cache does
#: not survive a restart), small enough not to count per idle connection.
CACHE_SIZE = 4096


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


#: Header segments the fast path takes (PyJWT's, jsonwebtoken's, jose's).
_FAST_HEADERS = frozenset(
    _b64(orjson.dumps(h)) for h in ({"alg": ALGORITHM, "typ": "JWT"}, {"alg": ALGORITHM})
)
#: Claims the fast path understands; a token with any other (``aud``,
#: ``iss``, ``jti``...) is left to PyJWT's rules for it.
_FAST_CLAIMS = frozenset({"sub", "guilds", "pub", "pub_rate", "exp", "nbf", "iat"})
_TIMES = ("exp", "nbf", "iat")
#: base64url without padding, as PyJWT requires of a segment.
_SEGMENT = re.compile(r"[A-Za-z0-9_-]*")


class TokenVerifier:
    """Callable that checks a token and returns its :class:`Grant`.

    Only HS256 with the server's secret is accepted (never ``none``, never an
    asymmetric algorithm: no algorithm confusion); ``exp`` and ``nbf`` are
    checked when present; ``sub`` is required. Raises :class:`AuthError`.
    """

    __slots__ = ("_cache", "_cache_size", "_clock", "_keys", "_secret", "_secrets", "hits")

    def __init__(
        self,
        secret: str,
        cache_size: int = CACHE_SIZE,
        clock: Callable[[], float] = time.time,
        previous: Sequence[str] = (),
    ) -> None:
        if not secret or not all(previous):
            raise ValueError("an empty secret would accept forged tokens")
        self._secret = secret
        #: Every secret a signature may be made with: the current one first.
        self._secrets = tuple(dict.fromkeys((secret, *previous)))
        #: The same secrets as HMAC keys (PyJWT encodes a str key as UTF-8).
        self._keys = tuple(k.encode("utf-8") for k in self._secrets)
        self._clock = clock
        self._cache_size = cache_size
        #: token -> (grant, exp or None, not-before: the later of nbf and iat,
        #: or None); bound ``cache_size``, least recently used dropped first.
        self._cache: OrderedDict[str, tuple[Grant, int | None, int | None]] = OrderedDict()
        #: Verifications answered from the cache (for tests and stats).
        self.hits = 0

    def __call__(self, token: str) -> Grant:
        if len(token) > MAX_TOKEN_BYTES:
            raise AuthError("token too long")
        cached = self._cache.get(token)
        if cached is not None:
            grant, exp, nbf = cached
            now = self._clock()
            if exp is not None and exp <= now:
                del self._cache[token]  # expired for good
            self._check_clock(exp, nbf, now)
            self._cache.move_to_end(token)
            self.hits += 1
            return grant
        claims = self._fast_claims(token)
        if claims is None:
            claims = self._decode(token)
        grant = grant_from_claims(claims)
        # Both paths have checked these are integers (PyJWT: int() of each)
        # when present; the hit path compares them with the clock the same way.
        exp = claims.get("exp")
        starts = [int(claims[k]) for k in ("nbf", "iat") if k in claims]
        entry = (grant, None if exp is None else int(exp), max(starts) if starts else None)
        self._check_clock(entry[1], entry[2], self._clock())
        if self._cache_size > 0:
            self._cache[token] = entry
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return grant

    @staticmethod
    def _check_clock(exp: int | None, nbf: int | None, now: float) -> None:
        """PyJWT's time checks (whole seconds, no leeway): expired once
        ``exp <= now``, not yet valid while ``nbf`` or ``iat`` ``> now``."""
        if exp is not None and exp <= now:
            raise AuthError("Signature has expired")
        if nbf is not None and nbf > now:
            raise AuthError("The token is not yet valid (nbf)")

    def _fast_claims(self, token: str) -> dict[str, Any] | None:
        """The claims of a token in the common shape, signed with one of the
        secrets; None leaves the verdict to PyJWT (see the module doc)."""
        header, _, rest = token.partition(".")
        if header not in _FAST_HEADERS:
            return None
        payload, dot, sig = rest.partition(".")
        if not dot or not token.isascii():
            return None
        signing = token[: len(header) + 1 + len(payload)].encode("ascii")
        for key in self._keys:
            if hmac.compare_digest(_b64(hmac.digest(key, signing, "sha256")), sig):
                break
        else:
            return None
        if _SEGMENT.fullmatch(payload) is None:
            return None
        try:
            raw = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
        except (ValueError, binascii.Error):
            return None
        if _b64(raw) != payload:
            return None  # a non-canonical encoding (unused low bits set): PyJWT refuses it
        try:
            claims = orjson.loads(raw)
        except ValueError:
            return None
        if type(claims) is not dict or "sub" not in claims or not claims.keys() <= _FAST_CLAIMS:
            return None
        for k in _TIMES:
            if k in claims and type(claims[k]) is not int:
                return None
        return claims

    def _decode(self, token: str) -> dict[str, Any]:
        """The claims of ``token`` if signed with one of the secrets (PyJWT
        checks the signature before the claims, so only a wrong signature
        moves on to the next secret). PyJWT is imported here, on the first
        token outside the fast path (0.15-0.25 s of a node's start when it
        was imported with this module)."""
        import jwt

        for key in self._secrets:
            try:
                claims: dict[str, Any] = jwt.decode(
                    token, key, algorithms=[ALGORITHM], options={"require": ["sub"]}
                )
            except jwt.InvalidSignatureError:
                continue
            except jwt.PyJWTError as e:
                raise AuthError(str(e) or type(e).__name__) from None
            return claims
        raise AuthError("Signature verification failed")


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
    import jwt

    claims: dict[str, Any] = {"sub": sub, "guilds": list(guilds), "iat": int(time.time())}
    if pub:
        claims["pub"] = list(pub)
    if pub_rate is not None:
        claims["pub_rate"] = pub_rate
    if ttl is not None:
        claims["exp"] = int(time.time() + ttl)
    return jwt.encode(claims, secret, algorithm=ALGORITHM)
