"""The load-test plot says what it means (issue "First run and operations"):
plain numbers on the log latency axis (not "3x10^0"), phase marks whose
labels no legend covers, and no "cpus None" in the title or summary."""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("matplotlib")

from guildcast.loadtest import report


def result(cpus: Any) -> dict[str, Any]:
    rows = [
        {
            "t": t / 2,
            "lat_p50": 3000 + 10 * t,  # 3-5 ms: less than one decade, only minor ticks
            "lat_p99": 4000 + 10 * t,
            "lat_p999": 4500 + 10 * t,
            "lat_max": 5000 + 10 * t,
            "delivered_per_s": 20_000.0,
            "live": 100,
            "phase": "publish",
        }
        for t in range(40)
    ]
    return {
        "scenario": "bigguild",
        "date": "2026-12-01T22:00:00",
        "params": {"clients": 100, "guilds": 1},
        "server": {"mode": "process", "cpus": cpus},
        "timeline": rows,
        "marks": [{"t": 0.2, "name": "connect"}, {"t": 0.4, "name": "subscribe"}],
    }


def test_plot_labels_axis_title_and_marks() -> None:
    fig = report.figure(result(None))
    fig.canvas.draw()
    ax1, ax2 = fig.axes[0], fig.axes[1]
    labels = [
        t.get_text()
        for t in ax1.get_yticklabels(minor=True) + ax1.get_yticklabels()
        if t.get_visible() and t.get_text()
    ]
    assert labels, "the latency axis has no labels"
    for text in labels:
        assert "times" not in text and "\\" not in text and "10^" not in text, labels
        float(text)  # a plain number
    title = fig._suptitle.get_text()
    assert "None" not in title and "any CPU" in title
    renderer = fig.canvas.get_renderer()
    marks = [a for a in ax2.texts if a.get_text() in ("connect", "subscribe")]
    assert marks
    for ax in fig.axes:
        legend = ax.get_legend()
        if legend is None:
            continue
        box = legend.get_window_extent(renderer)
        for mark in marks:
            assert not box.overlaps(mark.get_window_extent(renderer)), mark.get_text()
    pinned = report.figure(result([2, 3]))
    assert "cpus [2, 3]" in pinned._suptitle.get_text()
    assert report._cpus({"cpus": None}) == "any CPU"  # the summary table's words too
