"""server/logs.py: the JSON and text line formats and their setup."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from guildcast import logs


@pytest.fixture
def restore_root() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)


def test_json_lines_have_the_fields_and_extras(restore_root: None) -> None:
    out = io.StringIO()
    logs.setup("debug", "json", stream=out)
    log = logging.getLogger("guildcast.test")
    log.info("hello %s", "world", extra={"guild": "g:1", "code": 4010, "path": object()})
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("it failed")
    log.debug("quiet")
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(lines) == 3
    first = lines[0]
    assert first["level"] == "INFO" and first["logger"] == "guildcast.test"
    assert first["msg"] == "hello world"
    assert first["guild"] == "g:1" and first["code"] == 4010
    assert first["path"].startswith("<object")  # not JSON: written as text
    assert first["ts"].endswith("Z") and len(first["ts"]) == len("2024-01-01T00:00:00.000Z")
    assert lines[1]["level"] == "ERROR" and "ValueError: boom" in lines[1]["exc"]
    assert lines[2]["msg"] == "quiet"


def test_text_lines_append_extras(restore_root: None) -> None:
    out = io.StringIO()
    logs.setup("INFO", "text", stream=out)
    logging.getLogger("guildcast.test").warning("slow", extra={"peer": "1.2.3.4"})
    logging.getLogger("guildcast.test").debug("not shown")
    line = out.getvalue().strip()
    assert "WARNING guildcast.test: slow peer=1.2.3.4" in line
    assert "not shown" not in out.getvalue()


def test_bad_settings_are_refused(restore_root: None) -> None:
    with pytest.raises(ValueError):
        logs.setup("INFO", "xml")
    with pytest.raises(ValueError):
        logs.setup("LOUD", "text")
