"""The HTML latency report in real headless Chromium: it renders, plots show,
and it runs no script at all."""

from __future__ import annotations

from pathlib import Path

import pytest
from playwright.sync_api import Browser, expect

from dslab.report.html import write_html
from dslab.report.runfile import FaultEvent
from dslab.report.tables import NamedRun
from tests.report.test_slo import build_run


@pytest.mark.timeout(60)
def test_report_renders_tables_and_plots(browser: Browser, tmp_path: Path) -> None:
    """Two runs compared: both names, a percentile table and SVG plots are
    visible; a hostile string from a run file stays text."""
    fast = build_run({"deliver": [float(i % 20 + 1) for i in range(500)]})
    slow = build_run(
        {"deliver": [float(i % 20 + 40) for i in range(500)]},
        command=("dslab", "chat", "bench", "<script>alert('x')</script>"),
        faults=[FaultEvent(at=1.0, action="kill", target="chat-1", detail="")],
    )
    page_path = tmp_path / "report.html"
    write_html(page_path, [NamedRun("fast.json", fast), NamedRun("slow.json", slow)])

    page = browser.new_page()
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: dialogs.append(dialog.message))
    page.goto(page_path.as_uri())

    expect(page.locator("body")).to_contain_text("fast.json")
    expect(page.locator("body")).to_contain_text("slow.json")
    expect(page.locator("table").first).to_be_visible()
    assert page.locator("svg").count() >= 2
    expect(page.locator("svg").first).to_be_visible()
    expect(page.locator("body")).to_contain_text("<script>alert('x')</script>")
    assert dialogs == []
    page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
