"""Tests for the HTML report: one self-contained page, every run string escaped."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from dslab.errors import UsageError
from dslab.report.html import render_html, write_html
from dslab.report.runfile import FaultEvent
from dslab.report.slo import evaluate, parse_slos
from dslab.report.tables import NamedRun
from tests.report.test_slo import ONE_TO_THOUSAND_MS, build_run, verdict_with_lost

EVIL = "<script>alert(1)</script>"


class Page(HTMLParser):
    """Everything the tests look at: tags with attributes, text, table cells."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.cells: list[str] = []
        self._cell: list[str] | None = None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.cells.append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)

    def named(self, tag: str) -> list[dict[str, str | None]]:
        return [attrs for name, attrs in self.tags if name == tag]


def two_runs() -> list[NamedRun]:
    pause = [FaultEvent(3.0, "pause", "redis-1", "SIGSTOP"),
             FaultEvent(4.0, "resume", "redis-1", "SIGCONT")]
    stalled = [900.0 if 300 <= i < 400 else 5.0 for i in range(1000)]
    return [
        NamedRun("before.json", build_run({"send": ONE_TO_THOUSAND_MS})),
        NamedRun("after.json", build_run({"send": stalled}, faults=pause,
                                         verdict=verdict_with_lost(1))),
    ]


def test_page_has_tables_and_svg_plots() -> None:
    """Two runs, one with a pause: the page has the percentile and SLO tables,
    a distribution plot per operation with both runs, a time plot per run,
    and a fault marker and shaded window on the paused run's plot."""
    runs = two_runs()
    results = [(n.name, r) for n in runs for r in
               evaluate(parse_slos(["p50<100ms", "lost==0"]), n.run)]

    page = Page(render_html(runs, results))

    svgs = page.named("svg")
    titles = {a.get("aria-label") for a in svgs}
    assert {"Percentile distribution of send", "Latency over time, before.json",
            "Latency over time, after.json"} <= titles
    assert len(page.named("polyline")) >= 2 + 2 * 2  # 2 runs + p50/p99 per run
    assert len([a for a in page.named("line") if a.get("class") == "fault-marker"]) == 2
    assert len([a for a in page.named("rect") if a.get("class") == "fault-window"]) == 1
    for header in ("p50", "p90", "p99", "p99.9", "max", "rule", "result"):
        assert header in page.cells
    assert "FAIL" in page.cells and "PASS" in page.cells
    assert "lost (FAIL)" in page.cells
    assert "lobby/bob 5-0 c-4" in page.cells


def test_page_is_self_contained() -> None:
    """No script, no external resource: nothing with src or href, no http URL
    except SVG's namespace, and a CSP that forbids loading anything."""
    text = render_html(two_runs())
    page = Page(text)

    assert page.named("script") == []
    assert all("src" not in attrs and "href" not in attrs for _, attrs in page.tags)
    urls = re.findall(r"https?://[^\s\"'<>]*", text)
    assert set(urls) == {"http://www.w3.org/2000/svg"}
    (csp,) = [a for a in page.named("meta")
              if a.get("http-equiv") == "Content-Security-Policy"]
    assert "default-src 'none'" in str(csp.get("content"))


def test_every_run_file_string_is_escaped() -> None:
    """A run whose command, target, operation, fault and verdict hold a script
    tag shows it as text: no script element, the text is there verbatim."""
    verdict = verdict_with_lost(1)
    verdict["examples"]["lost"][0]["room"] = EVIL
    run = build_run(
        {EVIL: [5.0] * 100},
        command=["dslab", EVIL],
        targets=[EVIL],
        faults=[FaultEvent(0.5, EVIL, EVIL, EVIL)],
        verdict=verdict,
    )
    named = NamedRun(EVIL, run)
    results = [(EVIL, r) for r in evaluate(parse_slos(["p99<1s"]), run)]

    text = render_html([named], results)
    page = Page(text)

    assert page.named("script") == []
    assert "<script>" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    data = "".join(page.text)
    assert data.count(EVIL) >= 8  # name, command, target, op, fault x3, example


def test_write_html_writes_the_file(tmp_path: Path) -> None:
    """write_html leaves a complete page at the path."""
    target = tmp_path / "report.html"

    write_html(target, two_runs())

    assert target.read_text(encoding="utf-8").rstrip().endswith("</html>")


def test_write_html_to_a_missing_folder_is_a_usage_error(tmp_path: Path) -> None:
    """An unwritable path is a UsageError (exit 2), not a traceback."""
    with pytest.raises(UsageError):
        write_html(tmp_path / "no" / "such" / "report.html", two_runs())
