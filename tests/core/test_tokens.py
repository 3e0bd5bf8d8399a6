"""Token verification (PROTOCOL.md "Tokens"): HS256 with the server's secret only."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

import jwt
import pytest

from guildcast.core.tokens import MAX_TOKEN_BYTES, TokenVerifier, make_token
from guildcast.protocol.session import AuthError, Grant

SECRET = "core-token-secret-" + "0123456789abcdef" * 4
verify = TokenVerifier(SECRET)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict[str, Any], claims: dict[str, Any], key: str = SECRET) -> str:
    """A JWT with any header, signed HMAC-SHA256 with ``key`` (for alg confusion)."""
    h = b64(json.dumps(header).encode())
    p = b64(json.dumps(claims).encode())
    sig = hmac.new(key.encode(), f"{h}.{p}".encode(), hashlib.sha256).digest()
    return f"{h}.{p}.{b64(sig)}"


def signed(claims: dict[str, Any]) -> str:
    return jwt.encode(claims, SECRET, algorithm="HS256")


def test_made_token_round_trips() -> None:
    tok = make_token(SECRET, "alice", guilds=["team-*", "x"], pub=["team-1"], pub_rate=2.5)
    assert verify(tok) == Grant("alice", ("team-*", "x"), ("team-1",), 2.5)
    plain = verify(make_token(SECRET, "bob"))
    assert plain == Grant("bob", ("*",), (), None)
    no_exp = make_token(SECRET, "carol", ttl=None)
    assert "exp" not in jwt.decode(no_exp, SECRET, algorithms=["HS256"])
    assert verify(no_exp).sub == "carol"


def test_string_pattern_claim_is_one_pattern() -> None:
    assert verify(signed({"sub": "u", "guilds": "g-*"})).guilds == ("g-*",)


def test_integer_pub_rate_is_a_float() -> None:
    assert verify(signed({"sub": "u", "pub_rate": 3})).pub_rate == 3.0
    assert verify(signed({"sub": "u", "pub_rate": 0})).pub_rate == 0.0


def test_nbf_in_the_past_is_fine() -> None:
    assert verify(signed({"sub": "u", "nbf": int(time.time()) - 10})).sub == "u"


def _bad_tokens() -> dict[str, str]:
    now = int(time.time())
    claims = {"sub": "mallory", "guilds": ["*"], "pub": ["*"]}
    unsigned_h = b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    unsigned_p = b64(json.dumps(claims).encode())
    return {
        "alg none": f"{unsigned_h}.{unsigned_p}.",
        "alg none with signature": forge({"alg": "none", "typ": "JWT"}, claims),
        "another secret": jwt.encode(claims, "another-secret-0123456789abcdef012", "HS256"),
        "RS256 header, HMAC with the secret": forge({"alg": "RS256", "typ": "JWT"}, claims),
        "ES256 header": forge({"alg": "ES256", "typ": "JWT"}, claims),
        "HS512 with the secret": jwt.encode(claims, SECRET, algorithm="HS512"),
        "HS384 with the secret": jwt.encode(claims, SECRET, algorithm="HS384"),
        "expired": signed({**claims, "exp": now - 5}),
        "nbf in the future": signed({**claims, "nbf": now + 3600}),
        "missing sub": signed({"guilds": ["*"]}),
        "sub not a string": signed({"sub": 42}),
        "empty sub": signed({"sub": ""}),
        "huge sub": signed({"sub": "u" * 300}),
        "guilds not a list": signed({"sub": "u", "guilds": 5}),
        "guilds with a number": signed({"sub": "u", "guilds": ["g", 1]}),
        "guilds with an empty pattern": signed({"sub": "u", "guilds": [""]}),
        "pub an object": signed({"sub": "u", "pub": {"g": True}}),
        "pub_rate a string": signed({"sub": "u", "pub_rate": "10"}),
        "pub_rate a bool": signed({"sub": "u", "pub_rate": True}),
        "pub_rate negative": signed({"sub": "u", "pub_rate": -1}),
        "exp a string": signed({"sub": "u", "exp": "tomorrow"}),
        "payload not JSON": b64(b'{"alg":"HS256"}') + "." + b64(b"nope") + ".x",
        "tampered payload": _tampered(claims),
        "garbage": "abc",
        "empty": "",
        "huge": signed({"sub": "u", "pad": "x" * (MAX_TOKEN_BYTES + 10)}),
        "just over the size bound": "a" * (MAX_TOKEN_BYTES + 1),
    }


def _tampered(claims: dict[str, Any]) -> str:
    h, _p, sig = signed({**claims, "guilds": ["mine"]}).split(".")
    return f"{h}.{b64(json.dumps(claims).encode())}.{sig}"


@pytest.mark.parametrize("name,tok", sorted(_bad_tokens().items()))
def test_bad_token_is_auth_error(name: str, tok: str) -> None:
    with pytest.raises(AuthError):
        verify(tok)


def test_empty_secret_is_refused() -> None:
    with pytest.raises(ValueError):
        TokenVerifier("")


@pytest.mark.parametrize(
    "patterns,gid,allowed",
    [
        (("*",), "anything", True),
        (("team-*",), "team-1", True),
        (("team-*",), "team-", True),
        (("team-*",), "team", False),
        (("team-*",), "other-team-1", False),
        (("team-*",), "TEAM-1", False),  # case-sensitive on every OS
        (("g-?",), "g-1", True),
        (("g-?",), "g-12", False),
        (("g-[ab]",), "g-a", True),
        (("g-[ab]",), "g-c", False),
        (("exact",), "exact", True),
        (("exact",), "exact2", False),
        (("a", "b-*"), "b-x", True),
        ((), "g", False),
    ],
)
def test_guild_patterns(patterns: tuple[str, ...], gid: str, allowed: bool) -> None:
    g = Grant("u", guilds=patterns, pub=patterns)
    assert g.may_subscribe(gid) is allowed
    assert g.may_publish(gid) is allowed


def test_no_pub_claim_publishes_nowhere() -> None:
    g = verify(make_token(SECRET, "u", guilds=["*"]))
    assert g.may_subscribe("g") and not g.may_publish("g")
