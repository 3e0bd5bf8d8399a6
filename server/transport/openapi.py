"""The OpenAPI 3.1 document of the HTTP API, written by hand.

It describes exactly what ``server/transport/http_api.py`` does, with the
node's limits filled in (batch size, history page size); the API serves it
at ``/openapi.json`` and ``tests/transport/test_openapi.py`` checks the
running server against it with schemathesis. Change both together.
"""

from __future__ import annotations

from typing import Any

from guildcast.protocol import wire
from guildcast.protocol.codes import RESERVED_EVENTS

#: PROTOCOL.md "Messages", as JSON Schema patterns (ECMA-262 regexes).
GUILD_PATTERN = f"^{wire.GUILD_PATTERN}$"
EVENT_PATTERN = f"^{wire.EVENT_PATTERN}$"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    out = _json(_ref("Error"), description)
    if headers:
        out["headers"] = headers
    return out


_UNAUTHORIZED = _error(
    "No `Authorization` header, or not `Bearer <key>`.",
    {"WWW-Authenticate": {"required": True, "schema": {"type": "string"}}},
)
_FORBIDDEN = _error("The key is not one of the server's API keys.")
_BAD_GUILD = _error("The guild id is not 1-128 characters of `[A-Za-z0-9_.:-]`.")
_UNAVAILABLE = _error("The guild cannot answer now (busy, or the node is draining); retry later.")
_NO_ROUTE = _error(
    "No such route. A guild id of `.` or `..` is removed from the path by URL "
    "normalisation on most clients; such guilds can be published to, not read here."
)


def document(*, max_batch: int, history_limit: int, version: str = "1") -> dict[str, Any]:
    """The OpenAPI document for an API with these limits."""
    gid_param = {
        "name": "gid",
        "in": "path",
        "required": True,
        "description": "Guild id (PROTOCOL.md, Envelope).",
        "schema": _ref("GuildId"),
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Guildcast HTTP API",
            "version": version,
            "description": (
                "Publish events to guilds from a backend, read guild state and "
                "history, and watch the node. The WebSocket gateway is described "
                "in PROTOCOL.md."
            ),
        },
        "security": [{"apiKey": []}],
        "paths": {
            "/v1/publish": {
                "post": {
                    "operationId": "publish",
                    "summary": "Publish one event or a batch",
                    "description": (
                        "Answers once every event is sequenced (and written, with "
                        "`--data-dir`). A batch is sequenced in its order; it is not "
                        "atomic: on 503 or 504 `results` says what became of each event. "
                        "503: not published, retry. 504 (`outcome: unknown`): the "
                        "answer was lost after the event reached the sequencer; it may "
                        "or may not have been published (PROTOCOL.md, Publishing). "
                        "An event with an `idempotency_key` is safe to retry after "
                        "either: within the guild's window a key already sequenced is "
                        "answered with the original `s` and `epoch`, not sequenced again "
                        "(PROTOCOL.md, Idempotent publish)."
                    ),
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": _ref("PublishRequest")}},
                    },
                    "responses": {
                        "200": _json(
                            {"oneOf": [_ref("Ack"), {"type": "array", "items": _ref("Ack")}]},
                            "Sequenced: one Ack, or a list in batch order.",
                        ),
                        "400": _error(
                            "Not JSON, wrong shape, bad guild id, bad or reserved event "
                            "name, bad idempotency key, or a batch of more than the limit."
                        ),
                        "401": _UNAUTHORIZED,
                        "403": _FORBIDDEN,
                        "409": _error(
                            "Idempotency conflict (`idempotency_conflict`): the event's key "
                            "is in the guild's window for an event with another `t` or `d`; "
                            "not published. The body's `s` and `epoch` (a batch: its "
                            "`results`) name the original."
                        ),
                        "413": _error("The body, or one event's `d`, is over its size limit."),
                        "415": _error("The body is not `application/json`."),
                        "429": _error(
                            "This key's publish rate is over its limit.",
                            {"Retry-After": {"required": True, "schema": {"type": "string"}}},
                        ),
                        "503": _UNAVAILABLE,
                        "504": _error(
                            "Outcome unknown (`outcome: unknown`): the event reached the "
                            "sequencer but its answer did not come back; it may or may not "
                            "have been published. Retrying may publish it twice."
                        ),
                    },
                }
            },
            "/v1/guilds/{gid}": {
                "get": {
                    "operationId": "guildInfo",
                    "summary": "A guild's head, epoch, local subscribers and history bounds",
                    "parameters": [gid_param],
                    "responses": {
                        "200": _json(_ref("GuildInfo"), "The guild now."),
                        "400": _BAD_GUILD,
                        "401": _UNAUTHORIZED,
                        "403": _FORBIDDEN,
                        "404": _NO_ROUTE,
                        "503": _UNAVAILABLE,
                    },
                }
            },
            "/v1/guilds/{gid}/presence": {
                "get": {
                    "operationId": "guildPresence",
                    "summary": "The sessions subscribed to a guild, on every node",
                    "parameters": [gid_param],
                    "responses": {
                        "200": _json(_ref("Presence"), "Who is here now."),
                        "400": _BAD_GUILD,
                        "401": _UNAUTHORIZED,
                        "403": _FORBIDDEN,
                        "404": _NO_ROUTE,
                        "503": _UNAVAILABLE,
                    },
                }
            },
            "/v1/guilds/{gid}/history": {
                "get": {
                    "operationId": "guildHistory",
                    "summary": "Stored events after a sequence number",
                    "parameters": [
                        gid_param,
                        {
                            "name": "after",
                            "in": "query",
                            "required": False,
                            "description": "Return events with `s` greater than this.",
                            "schema": {
                                "type": "integer",
                                "minimum": 0,
                                "maximum": 2**63 - 1,
                                "default": 0,
                            },
                        },
                        {
                            "name": "limit",
                            "in": "query",
                            "required": False,
                            "description": "At most this many events.",
                            "schema": {
                                "type": "integer",
                                "minimum": 1,
                                "maximum": history_limit,
                                "default": min(100, history_limit),
                            },
                        },
                    ],
                    "responses": {
                        "200": _json(_ref("HistoryPage"), "A page of stored events."),
                        "400": _error("Bad guild id, or `after`/`limit` out of range."),
                        "401": _UNAUTHORIZED,
                        "403": _FORBIDDEN,
                        "404": _NO_ROUTE,
                        "503": _UNAVAILABLE,
                    },
                }
            },
            "/healthz": {
                "get": {
                    "operationId": "healthz",
                    "summary": "Liveness: the process answers",
                    "security": [],
                    "responses": {
                        "200": _json(
                            {
                                "type": "object",
                                "required": ["status"],
                                "properties": {"status": {"const": "ok"}},
                            },
                            "Alive.",
                        )
                    },
                }
            },
            "/readyz": {
                "get": {
                    "operationId": "readyz",
                    "summary": "Readiness: accepting clients (false while draining)",
                    "security": [],
                    "responses": {
                        "200": _json(_ref("Ready"), "Ready."),
                        "503": _json(_ref("Ready"), "Not ready (draining)."),
                    },
                }
            },
            "/metrics": {
                "get": {
                    "operationId": "metrics",
                    "summary": "Prometheus metrics",
                    "description": "Needs a key unless the server runs with `--metrics-open`.",
                    "security": [{"apiKey": []}, {}],
                    "responses": {
                        "200": {
                            "description": "Prometheus text exposition format.",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        },
                        "401": _UNAUTHORIZED,
                        "403": _FORBIDDEN,
                    },
                }
            },
            "/openapi.json": {
                "get": {
                    "operationId": "openapi",
                    "summary": "This document",
                    "security": [],
                    "responses": {
                        "200": _json({"type": "object"}, "The OpenAPI document."),
                    },
                }
            },
        },
        "components": {
            "securitySchemes": {
                "apiKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "`--api-key KEY` or GUILDCAST_API_KEYS.",
                }
            },
            "schemas": {
                "GuildId": {"type": "string", "pattern": GUILD_PATTERN},
                "EventName": {
                    "type": "string",
                    "description": (
                        f"{wire.EVENT_RULE}: case-sensitive, one spelling per name "
                        '(PROTOCOL.md "Messages").'
                    ),
                    "pattern": EVENT_PATTERN,
                    "not": {"enum": sorted(RESERVED_EVENTS)},
                },
                "Event": {
                    "type": "object",
                    "required": ["guild", "t"],
                    "properties": {
                        "guild": _ref("GuildId"),
                        "t": _ref("EventName"),
                        "d": {"description": "Any JSON value (absent: null)."},
                        "idempotency_key": {
                            "type": ["string", "null"],
                            "pattern": f"^{wire.IDEMPOTENCY_KEY_PATTERN}$",
                            "minLength": 1,
                            "maxLength": 128,
                            "description": (
                                f"{wire.IDEMPOTENCY_KEY_RULE}. Within the guild's window "
                                "(default 300 s and 10,000 keys) an event with a key "
                                "already sequenced is answered with the original `s` and "
                                "`epoch` and not sequenced again; with another `t` or `d`, "
                                '409; null: no key. PROTOCOL.md "Idempotent publish".'
                            ),
                        },
                    },
                    "additionalProperties": False,
                },
                "Batch": {
                    "type": "object",
                    "required": ["events"],
                    "properties": {
                        "events": {
                            "type": "array",
                            "items": _ref("Event"),
                            "minItems": 1,
                            "maxItems": max_batch,
                        }
                    },
                    "additionalProperties": False,
                },
                "PublishRequest": {"oneOf": [_ref("Event"), _ref("Batch")]},
                "Ack": {
                    "type": "object",
                    "required": ["g", "s", "epoch"],
                    "properties": {
                        "g": _ref("GuildId"),
                        "s": {"type": "integer", "minimum": 1},
                        "epoch": {"type": "string"},
                    },
                    # A batch's failed entry may carry the original's s and
                    # epoch too (a conflict): it is told apart by its error.
                    "not": {"required": ["error"]},
                },
                "Error": {
                    "type": "object",
                    "required": ["error", "detail"],
                    "properties": {
                        "error": {"type": "string", "description": "A stable code."},
                        "detail": {"type": "string", "description": "What is wrong."},
                        "outcome": {
                            "type": "string",
                            "enum": ["unknown"],
                            "description": "On 504: the events may or may not have been published.",
                        },
                        "s": {
                            "type": "integer",
                            "description": "On 409: the original event's `s` (and `epoch`).",
                        },
                        "epoch": {"type": "string"},
                        "results": {
                            "type": "array",
                            "description": "Batch publish only: each event's outcome.",
                            "items": {
                                "oneOf": [
                                    _ref("Ack"),
                                    {
                                        "type": "object",
                                        "required": ["g", "error"],
                                        "properties": {
                                            "g": _ref("GuildId"),
                                            "error": {"type": "string"},
                                            "detail": {"type": "string"},
                                            "outcome": {
                                                "type": "string",
                                                "enum": ["not_published", "unknown"],
                                            },
                                            "s": {
                                                "type": "integer",
                                                "description": "On a conflict: the original's.",
                                            },
                                            "epoch": {"type": "string"},
                                        },
                                    },
                                ]
                            },
                        },
                    },
                },
                "Presence": {
                    "type": "object",
                    "required": ["guild", "members"],
                    "properties": {
                        "guild": _ref("GuildId"),
                        "members": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["user", "session", "node"],
                                "properties": {
                                    "user": {"type": "string"},
                                    "session": {"type": "string"},
                                    "node": {"type": "string"},
                                },
                            },
                        },
                    },
                },
                "GuildInfo": {
                    "type": "object",
                    "required": ["guild", "epoch", "s", "subscribers", "history"],
                    "properties": {
                        "guild": _ref("GuildId"),
                        "epoch": {"type": "string"},
                        "s": {"type": "integer", "minimum": 0},
                        "subscribers": {
                            "type": "integer",
                            "minimum": 0,
                            "description": "Sessions subscribed on this node.",
                        },
                        "history": {
                            "type": "object",
                            "required": ["first", "last", "max_count", "max_age"],
                            "properties": {
                                "first": {"type": ["integer", "null"]},
                                "last": {"type": ["integer", "null"]},
                                "max_count": {"type": "integer", "minimum": 0},
                                "max_age": {"type": "number", "minimum": 0},
                            },
                        },
                    },
                },
                "Dispatch": {
                    "type": "object",
                    "description": "The DISPATCH envelope exactly as subscribers got it.",
                    "required": ["op", "t", "g", "s", "d"],
                    "properties": {
                        "op": {"const": 0},
                        "t": {"type": "string", "pattern": EVENT_PATTERN},
                        "g": _ref("GuildId"),
                        "s": {"type": "integer", "minimum": 1},
                        "d": {},
                    },
                },
                "HistoryPage": {
                    "type": "object",
                    "required": ["guild", "epoch", "s", "first", "complete", "events"],
                    "properties": {
                        "guild": _ref("GuildId"),
                        "epoch": {"type": "string"},
                        "s": {
                            "type": "integer",
                            "minimum": 0,
                            "description": "The guild's head when read.",
                        },
                        "first": {
                            "type": ["integer", "null"],
                            "description": "The oldest `s` still stored.",
                        },
                        "complete": {
                            "type": "boolean",
                            "description": (
                                "True when no event after `after` is missing: `events` "
                                "starts at `after + 1` (or there is nothing after it). "
                                "False means history no longer holds some: reload state."
                            ),
                        },
                        "events": {"type": "array", "items": _ref("Dispatch")},
                    },
                },
                "Ready": {
                    "type": "object",
                    "required": ["ready"],
                    "properties": {"ready": {"type": "boolean"}, "detail": {"type": "string"}},
                },
            },
        },
    }
