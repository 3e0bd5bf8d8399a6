"""The fast path of :class:`TokenVerifier` (server/core/tokens.py) against
PyJWT, token by token: the fast path may only accept a token that
``jwt.decode`` accepts with the same claims, and the verifier's verdict
(grant or refusal) is the one a PyJWT-only verifier gives."""

from __future__ import annotations

import base64
import hmac
import json
import time
from typing import Any

import hypothesis.strategies as st
import jwt
import orjson
import pytest
from hypothesis import event, given, settings

from guildcast.core.tokens import TokenVerifier, grant_from_claims, make_token
from guildcast.protocol.session import AuthError, Grant

SECRET = "fast-path-secret-" + "0123456789abcdef" * 4
OLD = "fast-path-old-secret-" + "fedcba9876543210" * 4
OTHER = "fast-path-other-secret-" + "0011223344556677" * 4


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def raw_token(header: bytes, payload: bytes, secret: str) -> str:
    signing = b64(header) + "." + b64(payload)
    sig = hmac.digest(secret.encode(), signing.encode(), "sha256")
    return signing + "." + b64(sig)


def sign_segments(header: str, payload: str, secret: str) -> str:
    """A token signed over exactly these segment texts."""
    sig = hmac.digest(secret.encode(), f"{header}.{payload}".encode(), "sha256")
    return f"{header}.{payload}.{b64(sig)}"


def reference(token: str) -> Grant | str:
    """What a verifier built on ``jwt.decode`` alone says of ``token``."""
    for key in (SECRET, OLD):
        try:
            claims = jwt.decode(token, key, algorithms=["HS256"], options={"require": ["sub"]})
        except jwt.InvalidSignatureError:
            continue
        except jwt.PyJWTError:
            return "refused"
        try:
            return grant_from_claims(claims)
        except AuthError:
            return "refused"
    return "refused"


def verdict(v: TokenVerifier, token: str) -> Grant | str:
    try:
        return v(token)
    except AuthError:
        return "refused"


def check(token: str) -> bool:
    """Compare with PyJWT; True when the fast path took the token."""
    v = TokenVerifier(SECRET, previous=[OLD], cache_size=0)
    fast = v._fast_claims(token)
    if fast is not None:
        # The fast path accepted the signature: PyJWS must accept it with one
        # of the secrets and carry exactly these claims.
        signed_by = []
        for key in (SECRET, OLD):
            try:
                payload = jwt.PyJWS().decode(token, key, algorithms=["HS256"])
            except jwt.InvalidSignatureError:
                continue
            signed_by.append(key)
            assert json.loads(payload) == fast
        assert signed_by
    assert verdict(v, token) == reference(token)
    return fast is not None


def test_a_minted_token_takes_the_fast_path() -> None:
    tok = make_token(SECRET, "alice", guilds=["g-*"], pub=["g-1"], pub_rate=3)
    v = TokenVerifier(SECRET)
    assert v._fast_claims(tok) is not None
    assert v(tok) == Grant("alice", ("g-*",), ("g-1",), 3.0)
    check(tok)


def test_a_previous_secret_takes_the_fast_path() -> None:
    tok = make_token(OLD, "bob")
    assert TokenVerifier(SECRET, previous=[OLD])._fast_claims(tok) is not None
    check(tok)


@pytest.mark.parametrize(
    "token",
    [
        # Wrong secret, alg none, another algorithm, extra header fields.
        make_token(OTHER, "mallory"),
        jwt.encode({"sub": "x"}, None, algorithm="none"),
        jwt.encode({"sub": "x"}, SECRET, algorithm="HS512"),
        jwt.encode({"sub": "x"}, SECRET, algorithm="HS256", headers={"kid": "k1"}),
        # Claims the fast path leaves to PyJWT.
        jwt.encode({"sub": "x", "aud": "them"}, SECRET, algorithm="HS256"),
        jwt.encode({"sub": "x", "iss": "me", "jti": "1"}, SECRET, algorithm="HS256"),
        jwt.encode({"sub": "x", "exp": time.time() + 600}, SECRET, algorithm="HS256"),
        jwt.encode({"sub": "x", "exp": "soon"}, SECRET, algorithm="HS256"),
        jwt.encode({"sub": "x", "iat": True}, SECRET, algorithm="HS256"),
        # Times.
        jwt.encode({"sub": "x", "exp": int(time.time()) - 5}, SECRET, algorithm="HS256"),
        jwt.encode({"sub": "x", "nbf": int(time.time()) + 600}, SECRET, algorithm="HS256"),
        jwt.encode({"sub": "x", "iat": int(time.time()) + 600}, SECRET, algorithm="HS256"),
        # Missing or bad sub, bad patterns, bad pub_rate.
        jwt.encode({"guilds": ["*"]}, SECRET, algorithm="HS256"),
        jwt.encode({"sub": 7}, SECRET, algorithm="HS256"),
        jwt.encode({"sub": "x", "guilds": "g-1"}, SECRET, algorithm="HS256"),
        jwt.encode({"sub": "x", "guilds": [1]}, SECRET, algorithm="HS256"),
        jwt.encode({"sub": "x", "pub_rate": -1}, SECRET, algorithm="HS256"),
        # Payloads that are not an object, or not JSON, correctly signed.
        raw_token(b'{"alg":"HS256","typ":"JWT"}', b"[1,2]", SECRET),
        raw_token(b'{"alg":"HS256","typ":"JWT"}', b"not json", SECRET),
        raw_token(b'{"alg":"HS256"}', b'{"sub":"x","exp":1e20}', SECRET),
        raw_token(b'{"alg":"HS256"}', b'{"sub":"x","exp":99999999999999999999999}', SECRET),
        # A payload whose last character carries unused bits (decodes to the
        # same bytes as the canonical one; PyJWT refuses it).
        sign_segments(b64(b'{"alg":"HS256","typ":"JWT"}'), b64(b'{"sub":"a"}')[:-1] + "1", SECRET),
        # Shapes: too few or many segments, padding, junk in a segment.
        "a.b",
        "a.b.c.d",
        "",
        make_token(SECRET, "x") + "=",
        make_token(SECRET, "x") + ".",
        make_token(SECRET, "x").replace(".", "..", 1),
        "é" + make_token(SECRET, "x"),
    ],
)
def test_unusual_tokens_get_pyjwts_verdict(token: str) -> None:
    check(token)


def test_a_tampered_payload_or_signature_is_refused() -> None:
    tok = make_token(SECRET, "alice", guilds=["g-1"])
    head, payload, sig = tok.split(".")
    claims = orjson.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["guilds"] = ["*"]
    forged = ".".join([head, b64(orjson.dumps(claims)), sig])
    flipped = ".".join([head, payload, sig[:-2] + ("A" if sig[-2] != "A" else "B") + sig[-1]])
    v = TokenVerifier(SECRET)
    for bad in (forged, flipped):
        assert v._fast_claims(bad) is None
        with pytest.raises(AuthError):
            v(bad)
        check(bad)


_times = st.one_of(
    st.none(),
    st.integers(-3600, 3600).filter(lambda d: abs(d) > 60).map(lambda d: int(time.time()) + d),
    st.floats(allow_nan=False, allow_infinity=False, min_value=0, max_value=4e9),
    st.text(max_size=3),
    st.booleans(),
)
_patterns = st.one_of(
    st.lists(st.sampled_from(["*", "g-*", "g-1", ""]), max_size=3),
    st.sampled_from(["g-1", 5, None]),
)


@settings(max_examples=300, deadline=None)
@given(
    header=st.sampled_from(
        [
            b'{"alg":"HS256","typ":"JWT"}',
            b'{"alg":"HS256"}',
            b'{"typ":"JWT","alg":"HS256"}',
            b'{"alg":"HS512","typ":"JWT"}',
            b'{"alg":"none"}',
        ]
    ),
    secret=st.sampled_from([SECRET, OLD, OTHER]),
    sub=st.one_of(st.text(max_size=5), st.integers(), st.none()),
    times=st.fixed_dictionaries({"exp": _times, "nbf": _times, "iat": _times}),
    guilds=_patterns,
    pub=_patterns,
    extra=st.sampled_from([{}, {"aud": "x"}, {"jti": "j"}, {"pub_rate": 2}, {"pub_rate": "2"}]),
)
def test_random_tokens_get_pyjwts_verdict(
    header: bytes,
    secret: str,
    sub: Any,
    times: dict[str, Any],
    guilds: Any,
    pub: Any,
    extra: dict[str, Any],
) -> None:
    claims: dict[str, Any] = {k: v for k, v in times.items() if v is not None}
    if sub is not None:
        claims["sub"] = sub
    if guilds is not None:
        claims["guilds"] = guilds
    if pub is not None:
        claims["pub"] = pub
    claims.update(extra)
    took = check(raw_token(header, json.dumps(claims, separators=(",", ":")).encode(), secret))
    event("fast path" if took else "left to PyJWT")


_int_times = st.one_of(
    st.none(),
    st.integers(-3600, 3600).filter(lambda d: abs(d) > 60).map(lambda d: int(time.time()) + d),
)


@settings(max_examples=200, deadline=None)
@given(
    header=st.sampled_from([b'{"alg":"HS256","typ":"JWT"}', b'{"alg":"HS256"}']),
    secret=st.sampled_from([SECRET, OLD]),
    sub=st.text(min_size=1, max_size=8),
    times=st.fixed_dictionaries({"exp": _int_times, "nbf": _int_times, "iat": _int_times}),
    guilds=st.lists(st.sampled_from(["*", "g-*", "g-1"]), max_size=3),
    pub_rate=st.one_of(st.none(), st.integers(0, 100), st.floats(0, 100)),
)
def test_well_formed_tokens_take_the_fast_path_with_pyjwts_verdict(
    header: bytes,
    secret: str,
    sub: str,
    times: dict[str, Any],
    guilds: list[str],
    pub_rate: float | None,
) -> None:
    claims: dict[str, Any] = {k: v for k, v in times.items() if v is not None}
    claims.update(sub=sub, guilds=guilds)
    if pub_rate is not None:
        claims["pub_rate"] = pub_rate
    assert check(raw_token(header, json.dumps(claims, separators=(",", ":")).encode(), secret))
