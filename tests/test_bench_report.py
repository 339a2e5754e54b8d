"""``farelab bench --report``: the HTML page and its charts, from a made-up document (nothing is
measured here)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import numpy as np

from farelab.bench._report import write_report
from tests.cli_support import farelab

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def synthetic_doc(*, broken: bool = True) -> dict[str, object]:
    """A bench document shaped like ``run_suite``'s, with samples and memory series."""
    rng = np.random.default_rng(6)

    def ms(median: float, n: int, spread: float = 0.25) -> list[float]:
        return [float(v) for v in rng.lognormal(np.log(median), spread, n)]

    samples = {
        "tap_inproc_bus_3des": ms(1.2, 2000),
        "tap_inproc_bus_sm4": ms(1.4, 2000),
        "tap_inproc_metro_exit_3des": ms(1.3, 2000),
        "tap_inproc_metro_exit_sm4": ms(1.5, 2000),
        "tap_pcsc": ms(2.9, 2000),
        "pcsc_apdu": ms(0.15, 6000, 0.15),
        "tap_idle": ms(1.2, 500),
        "tap_backlog": ms(1.35, 500),
        "tap_outage": ms(1.25, 500),
        "ingest_ack": ms(30.0, 100, 0.4),
        "topup": ms(176.0, 200, 0.05),
        "journal_fsync": ms(0.4, 300),
    }
    taps = np.linspace(0, 1_000_000, 101)
    ingested = np.linspace(0, 10_000_000, 51)
    doc: dict[str, object] = {
        "tap_inproc_bus_p99_ms": 2.4,
        "tap_pcsc_p99_ms": 4.1,
        "tap_pcsc_floor_ratio": 2.7,
        "ingest_tx_per_s": 12_600.0,
        "tap_apdus": 7,
        "tap_air_bytes": 412,
        "pcsc_presence_detect_ms": 342.5,
        "clearing_s": 0.61,
        "quick": True,
        "date": "2026-03-01 10:00 UTC",
        "budgets": {},
        "errors": {},
        "machine": {"python": "3.11.7", "platform": "Linux-6.1-x86_64", "cpus": 2},
        "commands": ["python -m bench.ingest --n 20000"],
        "samples": samples,
        "series": {
            "validator_rss_mb": [[float(x), 41.0 + 2.5 * x / 1e6] for x in taps],
            "backend_rss_mb": [[float(x), 80.0 + 30 * (1 - np.exp(-x / 3e6))] for x in ingested],
        },
    }
    if broken:
        doc["errors"] = {"taps through pcscd": "PcscdError: <script>alert(1)</script> & gone"}
    return doc


def images(page: Path) -> list[Path]:
    sources = re.findall(r"<img src='([^']+)'", page.read_text(encoding="utf-8"))
    return [page.parent / src for src in sources]


def assert_pngs(paths: list[Path]) -> None:
    for path in paths:
        assert path.read_bytes()[:8] == PNG_SIGNATURE, path


def test_report_has_a_chart_for_every_latency_group_and_memory_series(tmp_path: Path) -> None:
    page = write_report(synthetic_doc(), tmp_path / "report")
    assert page == tmp_path / "report" / "index.html"
    charts = images(page)
    assert {p.name for p in charts} == {
        "latency-taps-inproc.png",
        "latency-taps-pcsc.png",
        "latency-taps-uplink.png",
        "latency-ingest-ack.png",
        "latency-topup.png",
        "latency-journal_fsync.png",
        "memory-validator_rss_mb.png",
        "memory-backend_rss_mb.png",
    }
    assert_pngs(charts)


def test_report_marks_held_and_missed_budgets(tmp_path: Path) -> None:
    html = write_report(synthetic_doc(), tmp_path).read_text(encoding="utf-8")
    held = re.search(r"<tr class='held'><td>in-process tap p99, bus \(ms\)</td>.*?</tr>", html)
    missed = re.search(r"<tr class='missed'><td>tap / SCardTransmit floor</td>.*?</tr>", html)
    assert held is not None
    assert "✓" in held.group(0)
    assert missed is not None
    assert "✗" in missed.group(0)
    assert "—" in html  # budgets not measured


def test_report_shows_errors_escaped(tmp_path: Path) -> None:
    html = write_report(synthetic_doc(), tmp_path).read_text(encoding="utf-8")
    assert "PcscdError: &lt;script&gt;alert(1)&lt;/script&gt; &amp; gone" in html
    assert "<script>" not in html


def test_report_shows_quick_machine_commands_and_other_figures(tmp_path: Path) -> None:
    html = write_report(synthetic_doc(), tmp_path).read_text(encoding="utf-8")
    assert "quick run" in html
    assert "2026-03-01 10:00 UTC" in html
    assert "Linux-6.1-x86_64" in html
    for command in (
        "farelab bench --quick    # this run",
        "farelab bench\n",
        "pytest bench/ --benchmark-only",
        "python -m bench.ingest --n 20000",
    ):
        assert command in html
    assert html.index("<code>clearing_s</code>") < html.index("<code>tap_apdus</code>")


def test_report_without_samples_or_series_still_renders(tmp_path: Path) -> None:
    page = write_report({"quick": False}, tmp_path / "empty")
    html = page.read_text(encoding="utf-8")
    assert images(page) == []
    assert "full run" in html
    assert "not measured" in html


def test_report_skips_malformed_samples_and_series(tmp_path: Path) -> None:
    doc: dict[str, object] = {
        "samples": {"tap_pcsc": ["x", None, 0.0, -1.0, float("nan")], "topup": "fast"},
        "series": {"validator_rss_mb": [[1, 2, 3], "x"], "backend_rss_mb": 7},
        "machine": ["not", "a", "dict"],
        "errors": "not a dict",
    }
    page = write_report(doc, tmp_path)
    assert images(page) == []


def bench(*args: str) -> subprocess.CompletedProcess[str]:
    return farelab("bench", *args, timeout=120)


def test_cli_renders_a_report_from_earlier_json(tmp_path: Path) -> None:
    figures = tmp_path / "bench.json"
    doc = synthetic_doc(broken=False)
    doc.update(tap_pcsc_floor_ratio=1.3, ingest_tx_per_s=21_000.0)  # every budget holds
    figures.write_text(json.dumps(doc), encoding="utf-8")
    result = bench("--from-json", str(figures), "--report", str(tmp_path / "r"))
    assert result.returncode == 0, result.stderr
    page = tmp_path / "r" / "index.html"
    assert f"report written: {page}" in result.stderr
    assert "tap / SCardTransmit floor" in result.stdout
    assert_pngs(images(page))


def test_cli_missing_json_is_a_one_line_error(tmp_path: Path) -> None:
    result = bench("--from-json", str(tmp_path / "nope.json"), "--report", str(tmp_path / "r"))
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0
    assert "nope.json" in result.stderr


def test_cli_unwritable_report_folder_is_a_one_line_error(tmp_path: Path) -> None:
    figures = tmp_path / "bench.json"
    figures.write_text("{}", encoding="utf-8")
    blocker = tmp_path / "file"
    blocker.write_text("", encoding="utf-8")
    result = bench("--from-json", str(figures), "--report", str(blocker / "r"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("farelab: error: cannot write the report in")
    assert result.stderr.strip().count("\n") == 0
