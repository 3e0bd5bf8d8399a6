"""docs/ACTORS.md's worked example runs as printed and leaves the file it says."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "ACTORS.md"


def test_the_worked_example_runs(tmp_path: Path) -> None:
    m = re.search(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert m is not None
    (tmp_path / "example.py").write_text(m.group(1))
    out = subprocess.run(
        [sys.executable, "-P", "example.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 2 and "'ok': True" in lines[0] and "'ok': False" in lines[1], lines
    saved = json.loads((tmp_path / "cards" / "card-1.json").read_text())
    assert saved == {"column": "doing", "version": 1}
