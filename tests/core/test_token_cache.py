"""The verified-token cache of :class:`TokenVerifier` (server/core/tokens.py):
a hit is re-checked against the clock (``exp``, ``nbf``, ``iat``) exactly as
PyJWT checks a fresh token; failures are never cached; the cache is bounded."""

from __future__ import annotations

import time
from typing import Any

import jwt
import pytest

from guildcast.core.tokens import TokenVerifier, make_token
from guildcast.protocol.session import AuthError, Grant

SECRET = "token-cache-secret-" + "0123456789abcdef" * 4


class Clock:
    """A wall clock the test moves by hand (the verifier's ``clock``)."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def signed(claims: dict[str, Any]) -> str:
    return jwt.encode(claims, SECRET, algorithm="HS256")


def test_second_verification_is_a_hit_with_the_same_grant() -> None:
    v = TokenVerifier(SECRET)
    tok = make_token(SECRET, "alice", guilds=["g-*"], pub=["g-1"], pub_rate=2)
    first = v(tok)
    assert v.hits == 0
    assert v(tok) == first == Grant("alice", ("g-*",), ("g-1",), 2.0)
    assert v.hits == 1


def test_expiry_is_checked_on_a_hit() -> None:
    clock = Clock()
    v = TokenVerifier(SECRET, clock=clock)
    exp = int(clock.now) + 60
    tok = signed({"sub": "u", "exp": exp})
    assert v(tok).sub == "u"
    clock.now = exp - 0.5
    assert v(tok).sub == "u" and v.hits == 1
    clock.now = exp  # PyJWT: expired once exp <= now
    with pytest.raises(AuthError, match="expired"):
        v(tok)
    clock.now = exp - 1  # dropped: verified afresh by PyJWT (real clock), no hit
    assert v(tok).sub == "u"
    assert v.hits == 1


def test_expired_on_a_hit_agrees_with_pyjwt() -> None:
    # A token that expires while cached: the real clock, one second of TTL.
    v = TokenVerifier(SECRET)
    exp = int(time.time()) + 1
    tok = signed({"sub": "u", "exp": exp})
    try:
        v(tok)
    except AuthError:
        pytest.skip("the second turned over before the first check")
    while time.time() < exp:  # bounded: at most ~1 s
        time.sleep(0.05)
    with pytest.raises(AuthError):
        v(tok)
    with pytest.raises(jwt.ExpiredSignatureError):
        jwt.decode(tok, SECRET, algorithms=["HS256"])


def test_not_before_is_checked_on_a_hit() -> None:
    clock = Clock()
    v = TokenVerifier(SECRET, clock=clock)
    now = int(time.time())
    tok = signed({"sub": "u", "nbf": now - 1, "iat": now - 1})
    assert v(tok).sub == "u"
    clock.now = now - 10  # the wall clock stepped back before nbf/iat
    with pytest.raises(AuthError, match="not yet valid"):
        v(tok)
    clock.now = now
    assert v(tok).sub == "u"


def test_failures_are_never_cached() -> None:
    v = TokenVerifier(SECRET)
    bad = make_token("another-secret-0123456789abcdef0123", "eve")
    for _ in range(3):
        with pytest.raises(AuthError):
            v(bad)
    assert v.hits == 0
    expired = make_token(SECRET, "late", ttl=-60)
    with pytest.raises(AuthError):
        v(expired)
    with pytest.raises(AuthError):
        v(expired)
    assert v.hits == 0


def test_a_cached_token_with_one_byte_changed_is_verified_afresh() -> None:
    v = TokenVerifier(SECRET)
    tok = make_token(SECRET, "alice")
    v(tok)
    h, p, sig = tok.split(".")
    tampered = f"{h}.{p}.{sig[:-2]}{'A' if sig[-2] != 'A' else 'B'}{sig[-1]}"
    with pytest.raises(AuthError):
        v(tampered)


def test_the_cache_is_bounded_least_recently_used_first() -> None:
    v = TokenVerifier(SECRET, cache_size=3)
    toks = [make_token(SECRET, f"u{i}") for i in range(4)]
    for t in toks[:3]:
        v(t)
    v(toks[0])  # now the most recently used
    assert v.hits == 1
    v(toks[3])  # evicts u1, the least recently used
    v(toks[0])
    v(toks[2])
    assert v.hits == 3
    v(toks[1])  # evicted: verified again, not a hit
    assert v.hits == 3


def test_cache_size_zero_caches_nothing() -> None:
    v = TokenVerifier(SECRET, cache_size=0)
    tok = make_token(SECRET, "u")
    assert v(tok) == v(tok)
    assert v.hits == 0
