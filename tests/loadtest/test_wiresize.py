"""``guildcast loadtest wiresize``, small: both subscribers read the same
texts (it checks), the compressed one fewer bytes for chat messages and
snapshots, the same for ticks below the threshold."""

from __future__ import annotations

import json
from pathlib import Path

from guildcast.loadtest.cli import main


def test_wiresize_small(tmp_path: Path) -> None:
    out = tmp_path / "w.json"
    args = ["--chat", "50", "--snapshots", "10", "--ticks", "20", "--json", str(out)]
    assert main(["wiresize", *args]) == 0
    r = json.loads(out.read_text())
    assert "server_no_context_takeover" in r["negotiated"]
    kinds = r["kinds"]
    assert kinds["chat"]["ratio"] < 0.9 and kinds["snapshot"]["ratio"] < 0.4
    assert kinds["tick"]["ratio"] == 1.0
    assert 3000 < kinds["snapshot"]["mean_message_bytes"] < 5000
    assert r["total"]["compressed_frames"] == 60
    sizes = r["ratio_by_size"]
    assert sizes["48"] > sizes["512"]
