"""`dslab report latency` as a person runs it: tables, --json, --html, exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from dslab.cli.report import app
from dslab.errors import EXIT_CHECK_FAILED, EXIT_USAGE, DslabError
from tests.helpers import run_dslab
from tests.report.test_slo import ONE_TO_THOUSAND_MS, build_run, verdict_with_lost


@pytest.fixture
def run_path(tmp_path: Path) -> Path:
    """A chat run: latencies 1..1000 ms, one lost message, saved to disk."""
    path = tmp_path / "chat.json"
    build_run({"send": ONE_TO_THOUSAND_MS}, verdict=verdict_with_lost(1)).save(path)
    return path


def invoke(*args: str) -> Result:
    return CliRunner().invoke(app, ["latency", *args])


def exit_code(result: Result) -> int:
    """The code `dslab` would exit with: a DslabError's own, else Click's."""
    if isinstance(result.exception, DslabError):
        return result.exception.exit_code
    return result.exit_code


def test_passing_slos_exit_0_and_print_the_tables(run_path: Path) -> None:
    """p99<1s holds (990 ms): exit 0, the latency table, 1 of 1 passed."""
    result = invoke(str(run_path), "--slo", "p99<1s")

    assert exit_code(result) == 0, result.output
    assert "Latency in ms" in result.stdout
    assert "SLOs: 1 of 1 passed" in result.stdout
    assert "PASS" in result.stdout


def test_no_slo_exits_0(run_path: Path) -> None:
    """Without --slo there is nothing to fail: exit 0, no SLO table."""
    result = invoke(str(run_path))

    assert exit_code(result) == 0
    assert "SLOs:" not in result.stdout


def test_failing_slo_exits_1(run_path: Path) -> None:
    """lost==0 with one lost message: the table says FAIL and the exit is 1."""
    result = invoke(str(run_path), "--slo", "p99<1s", "--slo", "lost=0")

    assert exit_code(result) == EXIT_CHECK_FAILED
    assert "FAIL" in result.stdout
    assert "1 of 2 SLO checks failed" in str(result.exception)


def test_bad_constraint_exits_2_before_reading_runs(tmp_path: Path) -> None:
    """An unknown constraint is a usage error even if the run file is missing."""
    result = invoke(str(tmp_path / "missing.json"), "--slo", "p99 under 2ms")

    assert exit_code(result) == EXIT_USAGE
    assert "p99<200ms" in str(result.exception)


def test_unreadable_run_file_exits_2(tmp_path: Path) -> None:
    """A file that is not a run file is a usage error naming the file."""
    junk = tmp_path / "junk.json"
    junk.write_text("{}", encoding="utf-8")

    result = invoke(str(junk))

    assert exit_code(result) == EXIT_USAGE
    assert "junk.json" in str(result.exception)


def test_json_prints_figures_and_verdicts(run_path: Path, tmp_path: Path) -> None:
    """--json prints one document: per-operation figures and each SLO result;
    a second run is compared as its own entry."""
    faster = tmp_path / "faster.json"
    build_run({"send": [2.0] * 100}).save(faster)

    result = invoke(str(run_path), str(faster), "--slo", "p99<100ms", "--json")
    document = json.loads(result.stdout)

    assert exit_code(result) == EXIT_CHECK_FAILED
    assert document["ok"] is False
    first, second = document["runs"]
    (send,) = first["operations"]
    assert send["count"] == 1000
    assert send["p99_ms"] == pytest.approx(990, rel=1e-3)
    assert first["slo"][0] | {"detail": ""} == {
        "rule": "p99<100ms", "operation": "send", "ok": False,
        "measured": pytest.approx(990, rel=1e-3), "unit": "ms", "detail": "",
    }
    assert first["verdict"]["total"]["lost"] == 1
    assert second["slo"][0]["ok"] is True


def test_html_option_writes_the_page(run_path: Path, tmp_path: Path) -> None:
    """--html FILE writes a page holding the SVG plots and the tables."""
    page = tmp_path / "report.html"

    result = invoke(str(run_path), "--html", str(page))

    assert exit_code(result) == 0
    text = page.read_text(encoding="utf-8")
    assert text.count("<svg") >= 2 and "<table>" in text


def test_real_command_exit_codes(run_path: Path, lab_env: dict[str, str]) -> None:
    """The installed `dslab report latency` exits 1 on a failed SLO, with the
    FAIL row on stdout and `Error:` on stderr, and 2 on a bad constraint."""
    failed = run_dslab("report", "latency", str(run_path), "--slo", "p99<1ms",
                       env=lab_env, timeout_s=60)
    usage = run_dslab("report", "latency", str(run_path), "--slo", "p99<1",
                      env=lab_env, timeout_s=60)

    assert failed.returncode == 1, failed.stderr
    assert "FAIL" in failed.stdout
    assert "Error: 1 of 1 SLO checks failed" in failed.stderr
    assert usage.returncode == 2
    assert "needs a unit" in usage.stderr


def test_metrics_of_a_running_shortener_are_tabulated(
    lab_env: dict[str, str],
) -> None:
    """`report latency --metrics URL` reads a real server's histograms: the
    redirects just made are counted there."""
    run_dslab("lab", "up", env=lab_env, check=True)
    try:
        served = run_dslab("shorten", "serve", env=lab_env, check=True)
        base = served.stdout.split(" serves ")[1].split()[0]
        run_dslab("shorten", "https://example.com/m", "--alias", "metric",
                  env=lab_env, check=True)
        for _ in range(3):
            run_dslab("shorten", "open", "metric", env=lab_env, check=True)

        done = run_dslab("report", "latency", "--metrics", f"{base}/metrics",
                         "--json", env=lab_env, check=True)
    finally:
        run_dslab("lab", "down", env=lab_env)

    [server] = json.loads(done.stdout)["servers"]
    redirects = [h for h in server["histograms"]
                 if h["metric"] == "dslab_shortener_redirect_seconds"]
    assert redirects and redirects[0]["count"] == 3
