"""``farelab bench --report``: the HTML page and its charts, from a made-up document (nothing is
measured here)."""

from __future__ import annotations

import json
import re
import subprocess
from html import escape
from pathlib import Path

import numpy as np
import pytest

from farelab.bench._charts import OTHER
from farelab.bench._report import write_report
from farelab.bench._suite import BUDGETS
from tests.cli_support import farelab

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


GROUPS = list(dict.fromkeys(budget.group for budget in BUDGETS))


def synthetic_doc(*, broken: bool = True) -> dict[str, object]:
    """A bench document shaped like ``run_suite``'s, with every group's figures, samples and
    memory series."""
    rng = np.random.default_rng(6)

    def ms(median: float, n: int, spread: float = 0.25) -> list[float]:
        return [float(v) for v in rng.lognormal(np.log(median), spread, n)]

    samples = {
        "tap_inproc_bus_3des": ms(1.2, 2000),
        "tap_inproc_bus_sm4": ms(1.4, 2000),
        "tap_inproc_metro_exit_3des": ms(1.3, 2000),
        "tap_inproc_metro_exit_sm4": ms(1.5, 2000),
        "tap_pcsc": ms(2.9, 2000),
        "tap_pcsc_replay": ms(2.6, 2000),
        "pcsc_apdu": ms(0.15, 6000, 0.15),
        "tap_idle": ms(1.2, 500),
        "tap_backlog": ms(1.35, 500),
        "tap_outage": ms(1.25, 500),
        "ingest_ack": ms(30.0, 100, 0.4),
        "topup": ms(6.0, 200, 0.05),
        "cli_bare": ms(15.0, 20, 0.05),
        "cli_help": ms(45.0, 20, 0.05),
        "cli_card_show": ms(52.0, 20, 0.05),
        "testbed_card": ms(31.0, 50, 0.2),
        "journal_fsync": ms(0.4, 300),
    }
    taps = np.linspace(0, 1_000_000, 101)
    ingested = np.linspace(0, 10_000_000, 51)
    doc: dict[str, object] = {
        "tap_inproc_bus_p99_ms": 0.8,
        "tap_pcsc_p99_ms": 4.1,
        "tap_pcsc_overhead_p50_ms": 0.3,
        "tap_pcsc_overhead_p99_ms": 0.6,
        "tap_apdus": 7,
        "tap_air_bytes": 412,
        "tap_air106_p99_ms": 92.0,
        "tap_air424_p99_ms": 56.0,
        "tap_software_share": 0.009,
        "pcsc_presence_detect_ms": 342.5,
        "tap_backlog_ratio": 1.2,
        "tap_outage_ratio": 1.05,
        "ingest_tx_per_s": 12_600.0,
        "ingest_pg_tx_per_s": 61_000.0,
        "ingest_ack_p50_ms": 60.0,
        "ingest_ack_p99_ms": 140.0,
        "clearing_10m_s": 0.11,
        "clearing_bincount_10m_s": 0.03,
        "topup_p50_ms": 6.0,
        "topup_p99_ms": 8.2,
        "cli_startup_ratio": 3.4,
        "cli_bare_ms": 15.0,
        "city_taps_per_s": 1_240.0,
        "city_device_rss_mb": 38.5,
        "city_taps": 60_000,
        "city_reconciled": 60_000,
        "city_processes": 12,
        "testbed_ms_per_card": 31.0,
        "testbed_presence_ms": 298.0,
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


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The page of :func:`synthetic_doc`, drawn once for the tests that only read it."""
    return write_report(synthetic_doc(), tmp_path_factory.mktemp("report"))


@pytest.fixture(scope="module")
def html(page: Path) -> str:
    return page.read_text(encoding="utf-8")


def images(page: Path) -> list[Path]:
    sources = re.findall(r"<img src='([^']+)'", page.read_text(encoding="utf-8"))
    return [page.parent / src for src in sources]


def assert_pngs(paths: list[Path]) -> None:
    for path in paths:
        assert path.read_bytes()[:8] == PNG_SIGNATURE, path


def sections(html: str) -> dict[str, str]:
    """Each group's section of the page, by its id."""
    found = re.findall(r"<section id='([^']+)'>(.*?)</section>", html, flags=re.DOTALL)
    return dict(found)


def anchor(group: str) -> str:
    return "group-" + "-".join(group.split())


def png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]  # the signature, then IHDR: length, type, width, height
    return int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")


def test_report_has_a_chart_for_every_chart_it_knows(page: Path) -> None:
    assert page.name == "index.html"
    charts = images(page)
    assert {p.name for p in charts} == {
        "latency-taps-inproc.png",
        "latency-taps-pcsc.png",
        "figures-taps-air.png",
        "latency-taps-uplink.png",
        "latency-ingest-ack.png",
        "latency-topup.png",
        "figures-ingest.png",
        "figures-topup-clearing.png",
        "latency-cli-startup.png",
        "memory-validator_rss_mb.png",
        "memory-backend_rss_mb.png",
        "latency-testbed.png",
        "figures-city.png",
        "latency-journal_fsync.png",
    }
    assert_pngs(charts)


def test_report_has_a_section_with_a_chart_for_every_group(html: str) -> None:
    found = sections(html)
    assert list(found) == [anchor(group) for group in [*GROUPS, OTHER]]
    for group in GROUPS:
        assert "<img " in found[anchor(group)], group


def test_report_puts_each_chart_in_its_group(html: str) -> None:
    found = sections(html)
    where = {
        "latency-taps-pcsc.png": "taps",
        "latency-taps-uplink.png": "taps under load",
        "figures-ingest.png": "backend",
        "figures-topup-clearing.png": "backend",
        "latency-cli-startup.png": "host and memory",
        "memory-validator_rss_mb.png": "host and memory",
        "latency-testbed.png": "the city and the testbed",
        "figures-city.png": "the city and the testbed",
        "latency-journal_fsync.png": OTHER,
    }
    for chart, group in where.items():
        assert f"src='{chart}'" in found[anchor(group)], chart


def test_report_without_city_testbed_or_pcsc_keys_renders_what_there_is(tmp_path: Path) -> None:
    doc = synthetic_doc(broken=False)
    for key in list(doc):
        if key.startswith(("city_", "testbed_", "tap_pcsc", "pcsc_")):
            del doc[key]
    samples = doc["samples"]
    assert isinstance(samples, dict)
    for key in ("tap_pcsc", "tap_pcsc_replay", "pcsc_apdu", "testbed_card"):
        del samples[key]
    page = write_report(doc, tmp_path)
    names = {p.name for p in images(page)}
    assert not names & {"latency-taps-pcsc.png", "latency-testbed.png", "figures-city.png"}
    assert {"latency-taps-inproc.png", "figures-ingest.png"} <= names
    assert_pngs(images(page))
    html = page.read_text(encoding="utf-8")
    assert anchor("the city and the testbed") not in sections(html)
    row = re.search(r"<tr class='unmeasured'><td>city, end to end.*?</tr>", html)
    assert row is not None
    assert "—" in row.group(0)


def test_report_draws_a_chart_with_only_some_of_its_figures(tmp_path: Path) -> None:
    doc: dict[str, object] = {
        "samples": {"tap_pcsc": [1.0, 2.0, 3.0]},  # no replay: no overhead line to draw
        "ingest_pg_tx_per_s": 40_000.0,
        "testbed_ms_per_card": 31.0,
    }
    names = {p.name for p in images(write_report(doc, tmp_path))}
    assert names == {"latency-taps-pcsc.png", "figures-ingest.png", "figures-testbed.png"}


def test_report_draws_the_testbed_figures_only_without_its_samples(page: Path) -> None:
    names = {p.name for p in images(page)}
    assert "latency-testbed.png" in names
    assert "figures-testbed.png" not in names


def test_report_figure_chart_table_marks_its_budgets(html: str) -> None:
    backend = sections(html)[anchor("backend")]
    assert re.search(r"throughput: SQLite</td><td class='num'>12,600 tx/s</td>.*?✗", backend)
    assert re.search(r"throughput: PostgreSQL</td><td class='num'>61,000 tx/s</td>.*?✓", backend)


def test_readme_chart_keeps_its_name_and_size(page: Path) -> None:
    # bench/readme-taps.png is this chart of a full run, copied as it is
    readme = Path(__file__).resolve().parent.parent / "bench" / "readme-taps.png"
    assert png_size(page.parent / "latency-taps-inproc.png") == png_size(readme)


def test_report_groups_the_budget_table_in_the_budgets_order(html: str) -> None:
    table = html[html.index("<table class='budgets'>") :]
    table = table[: table.index("</table>")]
    headers = re.findall(r"<tr class='group'><th colspan='4'><a href='#([^']+)'>", table)
    assert headers == [anchor(group) for group in GROUPS]
    for group in GROUPS:
        labels = [b.label for b in BUDGETS if b.group == group]
        start = table.index(f"'#{anchor(group)}'")
        assert all(table.index(escape(label)) > start for label in labels), group


def test_report_marks_held_and_missed_budgets(html: str) -> None:
    held = re.search(r"<tr class='held'><td>in-process tap p99, bus \(ms\)</td>.*?</tr>", html)
    missed = re.search(
        r"<tr class='missed'><td>ingest, TACs verified, SQLite \(tx/s\)</td>.*?</tr>", html
    )
    assert held is not None
    assert "✓" in held.group(0)
    assert missed is not None
    assert "✗" in missed.group(0)
    assert "—" in html  # budgets not measured


def test_report_shows_errors_escaped(html: str) -> None:
    assert "PcscdError: &lt;script&gt;alert(1)&lt;/script&gt; &amp; gone" in html
    assert "<script>" not in html


def test_report_shows_quick_machine_commands_and_other_figures(html: str) -> None:
    assert "quick run" in html
    assert "Linux-6.1-x86_64" in html
    for command in (
        "farelab bench --quick    # this run",
        "farelab bench\n",
        "pytest bench/ --benchmark-only",
        "python -m bench.ingest --n 20000",
    ):
        assert command in html
    assert html.index("<code>clearing_s</code>") < html.index("<code>tap_apdus</code>")


def test_report_says_nothing_of_other_runs(html: str) -> None:
    assert "2026-03-01" not in html  # the run's date: only the page's own is on it
    assert len(re.findall(r"\d{4}-\d{2}-\d{2}", html)) == 1
    assert "Written by <code>farelab bench --report</code> on " in html


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
    doc.update(ingest_tx_per_s=51_000.0)  # every budget holds
    figures.write_text(json.dumps(doc), encoding="utf-8")
    result = bench("--from-json", str(figures), "--report", str(tmp_path / "r"))
    assert result.returncode == 0, result.stderr
    page = tmp_path / "r" / "index.html"
    assert f"report written: {page}" in result.stderr
    assert "our time in a tap through pcscd, p50 (ms)" in result.stdout
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
