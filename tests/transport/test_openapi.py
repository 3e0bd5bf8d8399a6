"""The OpenAPI document matches the running API: schemathesis generates
requests from /openapi.json (valid and invalid ones) against a real
``guildcast serve`` process and runs every check it has (no 5xx, documented
status codes, content types, headers and response schemas, valid data
accepted, invalid data rejected, auth enforced)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from guildcast.transport import openapi
from tests.support.api import KEY
from tests.support.node import serve_process
from tests.support.wait import output

#: Examples per operation and phase, and a fixed seed: a bounded,
#: reproducible run (about ten seconds on a shared machine).
MAX_EXAMPLES = 25
SEED = 20240611


def test_document_is_consistent() -> None:
    doc = openapi.document(max_batch=7, history_limit=50)
    assert doc["openapi"] == "3.1.0"
    schemas = doc["components"]["schemas"]
    assert schemas["Batch"]["properties"]["events"]["maxItems"] == 7
    refs: list[str] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if "$ref" in node:
                refs.append(node["$ref"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(doc)
    assert refs and all(r.removeprefix("#/components/schemas/") in schemas for r in refs)
    ops = [op for path in doc["paths"].values() for op in path.values()]
    assert len({op["operationId"] for op in ops}) == len(ops)


async def test_schemathesis_finds_nothing(tmp_path: Path) -> None:
    async with serve_process(["--api-publish-rate", "0"], tmp_path / "serve.log") as node:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "schemathesis.cli",
            "run",
            f"{node.api_url}/openapi.json",
            "--header",
            f"Authorization: Bearer {KEY}",
            "--checks",
            "all",
            "--max-examples",
            str(MAX_EXAMPLES),
            "--seed",
            str(SEED),
            "--workers",
            "1",
            "--request-timeout",
            "20",
            "--report-dir",
            str(tmp_path / "report"),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            cwd=tmp_path,
        )
        text = await output(proc, 120)
        assert proc.returncode == 0, text
        assert "No issues found" in text, text
        log = node.log()
    # Whatever it sent, the server logged no error (a 500 would log one).
    assert " ERROR " not in log, log
