"""Server framing and envelope validation (PROTOCOL.md "Transport", "Envelope")."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from websockets.frames import Frame, Opcode

from guildcast.protocol import wire
from guildcast.protocol.codes import Op
from tests.protocol.framing import one, unframe


@pytest.mark.parametrize("n", [0, 1, 125, 126, 127, 65535, 65536, 70000])
def test_text_frame_is_what_websockets_would_send(n: int) -> None:
    data = bytes((i * 7) % 256 for i in range(n))
    expected = Frame(Opcode.TEXT, data).serialize(mask=False, extensions=[])
    assert wire.text_frame(data) == expected


def test_frames_concatenate_into_a_stream() -> None:
    a = wire.dispatch_payload("g", "A", 1, {"x": 1})
    b = wire.dispatch_payload("g", "B", 2, "y" * 300)
    assert unframe(wire.text_frame(a) + wire.text_frame(b)) == [
        {"op": 0, "t": "A", "g": "g", "s": 1, "d": {"x": 1}},
        {"op": 0, "t": "B", "g": "g", "s": 2, "d": "y" * 300},
    ]


@pytest.mark.parametrize(
    "gid",
    ["a", "A" * 128, "guild-42", "team_1.board:7", "a-b_c.d:e", "0", "...", "-", "Z9"],
)
def test_valid_guild_ids(gid: str) -> None:
    assert wire.valid_guild(gid)


@pytest.mark.parametrize(
    "gid",
    [
        "",
        "a" * 129,
        "a b",
        "a/b",
        "a\n",
        "\na",
        "é",
        "g*",
        "g?",
        "g#",
        "guild\x00",
        1,
        None,
        b"guild",
        ["g"],
    ],
)
def test_invalid_guild_ids(gid: object) -> None:
    assert not wire.valid_guild(gid)


@pytest.mark.parametrize("t", ["A", "Z" * 64, "MESSAGE_CREATE", "E_1", "0", "_"])
def test_valid_event_names(t: str) -> None:
    assert wire.valid_event(t)


@pytest.mark.parametrize(
    "t", ["", "A" * 65, "lower", "Mixed", "A-B", "A B", "A\n", "É", 1, None, b"A"]
)
def test_invalid_event_names(t: object) -> None:
    assert not wire.valid_event(t)


def test_dispatch_and_control_messages() -> None:
    assert orjson.loads(wire.dispatch_payload("g", "T", 5, None)) == {
        "op": 0,
        "t": "T",
        "g": "g",
        "s": 5,
        "d": None,
    }
    assert one(wire.subscribed_frame("g", "ep", 9, True)) == {
        "op": Op.DISPATCH,
        "t": "SUBSCRIBED",
        "g": "g",
        "d": {"epoch": "ep", "s": 9, "recovered": True},
    }
    assert one(wire.unsubscribed_frame("g")) == {
        "op": 0,
        "t": "UNSUBSCRIBED",
        "g": "g",
        "d": None,
    }
    assert one(wire.HEARTBEAT_ACK_FRAME) == {"op": Op.HEARTBEAT_ACK, "d": None}
    assert one(wire.RECONNECT_FRAME) == {"op": Op.RECONNECT, "d": None}


def test_decode_rejects_bad_json_and_utf8() -> None:
    for bad in (b"", b"{", b"\xff", b'"\xed\xa0\x80"'):
        with pytest.raises(wire.JSONDecodeError):
            wire.decode(bad)
    assert wire.decode(b'{"op": 1}') == {"op": 1}


@given(
    gid=st.from_regex(wire.GUILD_PATTERN, fullmatch=True),
    t=st.from_regex(wire.EVENT_PATTERN, fullmatch=True),
    s=st.integers(0, 2**63 - 1),
    d=st.recursive(
        st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
        max_leaves=8,
    ),
)
def test_the_envelope_builder_is_orjsons_envelope(gid: str, t: str, s: int, d: object) -> None:
    """``dispatch_json`` (the brokers' builder, mirrored by the Redis Lua script)
    gives exactly the bytes orjson gives the envelope object."""
    expected = orjson.dumps({"op": 0, "t": t, "g": gid, "s": s, "d": d})
    assert wire.dispatch_payload(gid, t, s, d) == expected
    assert wire.dispatch_json(gid, t, s, orjson.dumps(d)) == expected


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**200), max_value=2**200)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


@given(json_values)
def test_decode_and_encode_keep_every_number_exactly(value: object) -> None:
    """Integers of any size survive a round trip as integers (orjson alone
    turns those beyond 64 bits into floats, and refuses to write them)."""
    text = wire.encode(value)
    back = wire.decode(text)
    assert back == value
    assert wire.decode(text.decode()) == value
    assert wire.decode(bytearray(text)) == value
    assert wire.encode(back) == text


def test_a_long_digit_run_in_a_string_changes_nothing() -> None:
    assert wire.decode(b'{"id":"12345678901234567890123","f":2.5}') == {
        "id": "12345678901234567890123",
        "f": 2.5,
    }
    assert type(wire.decode(b"[98765432109876543210987]")[0]) is int


def test_decode_still_refuses_what_is_not_json() -> None:
    for bad in (b"[NaN, 12345678901234567890123]", b"[1234567890123456789012", b"\xff"):
        with pytest.raises(wire.JSONDecodeError):
            wire.decode(bad)


# --- a guild's subscribe request (PROTOCOL.md "Messages", "Rewind") ------------------


@pytest.mark.parametrize(
    ("value", "want"),
    [
        (None, wire.GuildRequest()),
        ({"epoch": "e", "s": 0}, wire.GuildRequest(("e", 0))),
        ({"epoch": "e", "s": 3, "later": 1}, wire.GuildRequest(("e", 3))),  # 1.0: ignored
        ({"rewind": 1}, wire.GuildRequest(rewind=1)),
        ({"rewind": 10**30}, wire.GuildRequest(rewind=10**30)),  # capped by the guild
        ({"rewind": 5, "later": "x"}, wire.GuildRequest(rewind=5)),
        # Passive (1.1): alone or beside a Position; false is the default.
        ({"passive": True}, wire.GuildRequest(passive=True)),
        ({"passive": False}, wire.GuildRequest()),
        ({"epoch": "e", "s": 4, "passive": True}, wire.GuildRequest(("e", 4), passive=True)),
        ({"epoch": "e", "s": 4, "passive": False}, wire.GuildRequest(("e", 4))),
        ({"rewind": 3, "passive": False}, wire.GuildRequest(rewind=3)),
        ({"passive": True, "later": 1}, wire.GuildRequest(passive=True)),
    ],
)
def test_guild_request(value: object, want: wire.GuildRequest) -> None:
    assert wire.guild_request(value) == want


@pytest.mark.parametrize(
    "value",
    [
        {},
        {"later": 1},
        {"epoch": "e"},
        {"s": 1},
        {"epoch": "e", "s": -1},
        {"epoch": "x" * 65, "s": 1},
        {"rewind": 0},
        {"rewind": -3},
        {"rewind": 2.0},
        {"rewind": "2"},
        {"rewind": True},
        {"rewind": None},
        {"rewind": 2, "epoch": "e", "s": 1},
        {"rewind": 2, "s": 1},
        {"rewind": 2, "epoch": "e"},
        {"passive": 1},
        {"passive": "yes"},
        {"passive": None},
        {"s": 3, "passive": True},
        {"epoch": "e", "s": 3, "passive": 0},
        # A passive subscriber receives no events: nothing to rewind.
        {"rewind": 2, "passive": True},
        {"rewind": 2, "epoch": "e", "s": 1, "passive": True},
        [],
        "e:1",
        1,
    ],
)
def test_bad_guild_request(value: object) -> None:
    with pytest.raises(ValueError):
        wire.guild_request(value)


def test_subscribed_frame_carries_rewound_only_for_a_rewind() -> None:
    plain = one(wire.subscribed_frame("g", "e", 9, True))
    assert plain["d"] == {"epoch": "e", "s": 9, "recovered": True}
    rewound = one(wire.subscribed_frame("g", "e", 9, False, 4))
    assert rewound["d"] == {"epoch": "e", "s": 9, "recovered": False, "rewound": 4}


def test_subscribed_frame_of_a_passive_subscription() -> None:
    passive = one(wire.subscribed_frame("g", "e", 9, False, passive=True))
    assert passive["d"] == {"epoch": "e", "s": 9, "recovered": False, "passive": True}
