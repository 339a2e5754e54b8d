"""The report's charts as PNG files: latency distributions, memory as the work grows, and bars
for the figures that have no samples behind them.

Drawn with matplotlib's object API on its Agg canvas (no pyplot, so no display and no global
figure state).  Related latency series share one figure, a histogram beside a cumulative
distribution, with the budgets that apply to them drawn where they bite.  Every chart belongs to
one of the budgets' groups (``Budget.group``), or to :data:`OTHER` for keys none knows; a chart
whose figures are all missing is not drawn.

bench/readme-taps.png, the README's chart, is this module's ``latency-taps-inproc.png`` of a
full run, copied as it is: keep that chart's name and size.
"""

from __future__ import annotations

import math
import re
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import (
    EngFormatter,
    FixedLocator,
    FuncFormatter,
    MaxNLocator,
    NullFormatter,
)

from farelab.bench._suite import (
    BACKEND,
    BUDGETS,
    HOST,
    LOAD,
    SYSTEM,
    TAPS,
    Budget,
    limit_text,
    mark,
)
from farelab.bench._taps import percentile

__all__ = [
    "FIGURE_CHARTS",
    "LATENCY_CHARTS",
    "MEMORY_CHARTS",
    "OTHER",
    "Bar",
    "Chart",
    "FigureChart",
    "Panel",
    "charts",
    "figure_charts",
    "latency_charts",
    "memory_charts",
]

WIDTH_IN = 9.0
DPI = 150
BUDGET_COLOR = "#c0392b"
BLUE, ORANGE, GREEN, PURPLE, BROWN = "#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b"
GREY = "#98a2b3"
BAR_SLOTS = 7  # a bar chart's figure has room for this many bars at least
OTHER = "other"  # the group of charts for sample and series keys that no chart here knows
# 1-2-5 and finer: the first that puts at least four ticks on a log axis (a narrow one has few)
TICK_STEPS = ((1.0,), (1.0, 2.0, 5.0), (1.0, 2.0, 3.0, 5.0), (1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 7.0))


@dataclass(frozen=True)
class Curve:
    """One latency series: its key in ``doc["samples"]``, its legend and its line."""

    key: str
    label: str
    color: str
    style: str = "-"


@dataclass(frozen=True)
class Limit:
    """A budget drawn as a vertical line: ``label`` is formatted with the budget's ``limit``.

    A budget on a ratio (``relative_to`` set) is drawn at ``limit`` times that curve's
    ``quantile``; one on a difference (``added`` too) at that quantile plus ``limit``.  The
    diamond on the cumulative plot sits at ``quantile``, the share the budget bounds.
    """

    key: str
    label: str
    relative_to: str | None = None
    quantile: float = 0.99
    added: bool = False


@dataclass(frozen=True)
class LatencyChart:
    """Related latency series overlaid in one figure; ``noun`` is what one sample times."""

    name: str
    group: str
    title: str
    noun: str
    curves: tuple[Curve, ...]
    limits: tuple[Limit, ...] = ()


@dataclass(frozen=True)
class MemoryChart:
    """One series of ``doc["series"]`` against the work done so far: RSS by default."""

    key: str
    title: str
    x_label: str
    group: str = HOST
    growth_budget: str | None = None
    y_label: str = "RSS (MB)"
    unit: str = "MB"


@dataclass(frozen=True)
class Bar:
    """One figure as a bar: its key among the document's figures, its label, and the key of
    the budget it is held to (drawn as a line, the bar green or red by it), if any."""

    key: str
    label: str
    budget: str | None = None


@dataclass(frozen=True)
class Panel:
    """Bars that share a unit, side by side on one axis; ``title`` names what they measure."""

    title: str
    unit: str
    bars: tuple[Bar, ...]


@dataclass(frozen=True)
class FigureChart:
    """Figures with no samples behind them, as panels of bars with their budgets as lines;
    ``notes`` are (key, label) figures shown only in the table under the chart.  With
    ``unless_samples`` set, the chart stands in for a latency chart: it is drawn only when
    that key has no samples."""

    name: str
    group: str
    title: str
    panels: tuple[Panel, ...]
    notes: tuple[tuple[str, str], ...] = ()
    unless_samples: str | None = None


@dataclass(frozen=True)
class Chart:
    """A chart written to disk, its group, and the small table the page shows under it."""

    file: str
    title: str
    group: str
    columns: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]


LATENCY_CHARTS = (
    LatencyChart(
        "latency-taps-inproc",
        TAPS,
        "Tap, in-process card: bus and metro exit, 3DES and SM4",
        "taps",
        (
            Curve("tap_inproc_bus_3des", "bus, 3DES", BLUE),
            Curve("tap_inproc_bus_sm4", "bus, SM4", BLUE, "--"),
            Curve("tap_inproc_metro_exit_3des", "metro exit, 3DES", ORANGE),
            Curve("tap_inproc_metro_exit_sm4", "metro exit, SM4", ORANGE, "--"),
        ),
        (
            Limit("tap_inproc_bus_p99_ms", "bus p99 ≤ {limit:g} ms"),
            Limit("tap_inproc_metro_exit_p99_ms", "metro exit p99 ≤ {limit:g} ms"),
        ),
    ),
    LatencyChart(
        "latency-taps-pcsc",
        TAPS,
        "Tap through pcscd, its exchanges replayed with no software, and one SCardTransmit",
        "samples",
        (
            Curve("tap_pcsc", "tap through pcscd", PURPLE),
            Curve("tap_pcsc_replay", "the same exchanges replayed", ORANGE, "--"),
            Curve("pcsc_apdu", "one SCardTransmit", GREEN, ":"),
        ),
        (
            Limit(
                "tap_pcsc_overhead_p50_ms",
                "tap p50 ≤ replay p50 + {limit:g} ms",
                relative_to="tap_pcsc_replay",
                quantile=0.5,
                added=True,
            ),
        ),
    ),
    LatencyChart(
        "latency-taps-uplink",
        LOAD,
        "Tap while the uplink is idle, drains a backlog, or cannot reach the broker",
        "taps",
        (
            Curve("tap_idle", "uplink idle", BLUE),
            Curve("tap_backlog", "uplink draining a backlog", ORANGE),
            Curve("tap_outage", "broker down", BROWN, "--"),
        ),
        (
            Limit(
                "tap_backlog_ratio", "backlog p99 ≤ {limit:g} × idle p99", relative_to="tap_idle"
            ),
            Limit("tap_outage_ratio", "outage p99 ≤ {limit:g} × idle p99", relative_to="tap_idle"),
        ),
    ),
    LatencyChart(
        "latency-ingest-ack",
        BACKEND,
        "Backend ingest: a batch published until its acknowledgement",
        "batches",
        (
            Curve("ingest_ack", "SQLite ledger", GREEN),
            Curve("ingest_pg_ack", "PostgreSQL ledger", BLUE, "--"),
        ),
    ),
    LatencyChart(
        "latency-topup",
        BACKEND,
        "Top-up: card → host (backend over Mosquitto) → card",
        "top-ups",
        (Curve("topup", "top-up", PURPLE),),
        (Limit("topup_p99_ms", "p99 ≤ {limit:g} ms"),),
    ),
    LatencyChart(
        "latency-cli-startup",
        HOST,
        "Start-up: the bare interpreter against two farelab commands",
        "starts",
        (
            Curve("cli_bare", "bare interpreter", GREY),
            Curve("cli_help", "farelab --help", BLUE),
            Curve("cli_card_show", "farelab card show", ORANGE, "--"),
        ),
        (
            Limit(
                "cli_startup_ratio",
                "p50 ≤ {limit:g} × bare p50",
                relative_to="cli_bare",
                quantile=0.5,
            ),
        ),
    ),
    LatencyChart(
        "latency-testbed",
        SYSTEM,
        "Testbed: time per card beyond its presence detection",
        "cards",
        (Curve("testbed_card", "per card beyond presence", PURPLE),),
        (Limit("testbed_ms_per_card", "≤ {limit:g} ms per card", quantile=0.5),),
    ),
)

MEMORY_CHARTS = (
    MemoryChart(
        "validator_rss_mb",
        "Validator resident memory as taps accumulate",
        "taps done",
        growth_budget="validator_rss_growth_mb",
    ),
    MemoryChart(
        "backend_rss_mb",
        "Backend resident memory as transactions are ingested (PostgreSQL ledger)",
        "transactions ingested",
    ),
    MemoryChart(
        "backend_rate_tx_per_s",
        "Backend ingest rate as the PostgreSQL ledger grows",
        "transactions ingested",
        group=BACKEND,
        y_label="ingest rate (tx/s)",
        unit="tx/s",
    ),
)

FIGURE_CHARTS = (
    FigureChart(
        "figures-taps-air",
        TAPS,
        "A whole tap at the card's pace (the air model of docs/card-protocol.md B6), p99",
        (
            Panel(
                "software against the modelled tap",
                "ms",
                (
                    Bar("tap_inproc_metro_exit_p99_ms", "our software, metro exit"),
                    Bar("tap_air424_p99_ms", "modelled, 424 kbit/s"),
                    Bar("tap_air106_p99_ms", "modelled, 106 kbit/s"),
                ),
            ),
        ),
        (
            ("tap_software_share", "share of the tap at 106 kbit/s that is our software"),
            ("tap_apdus", "APDUs per tap"),
            ("tap_air_bytes", "bytes on the air per tap"),
        ),
    ),
    FigureChart(
        "figures-ingest",
        BACKEND,
        "Ingest with every TAC verified: SQLite against PostgreSQL",
        (
            Panel(
                "throughput",
                "tx/s",
                (
                    Bar("ingest_tx_per_s", "SQLite", budget="ingest_tx_per_s"),
                    Bar("ingest_pg_tx_per_s", "PostgreSQL", budget="ingest_pg_tx_per_s"),
                ),
            ),
            Panel(
                "batch acknowledged",
                "ms",
                (
                    Bar("ingest_ack_p50_ms", "SQLite p50"),
                    Bar("ingest_ack_p99_ms", "SQLite p99"),
                    Bar("ingest_pg_ack_p50_ms", "PostgreSQL p50"),
                    Bar("ingest_pg_ack_p99_ms", "PostgreSQL p99"),
                ),
            ),
        ),
    ),
    FigureChart(
        "figures-topup-clearing",
        BACKEND,
        "Top-up; clearing against numpy's bincount over as many values (its floor)",
        (
            Panel(
                "top-up, card → host → card",
                "ms",
                (
                    Bar("topup_p50_ms", "p50"),
                    Bar("topup_p99_ms", "p99", budget="topup_p99_ms"),
                ),
            ),
            Panel(
                "clearing 10 M transactions",
                "s",
                (
                    Bar("clearing_10m_s", "clearing", budget="clearing_10m_s"),
                    Bar("clearing_bincount_10m_s", "bincount, the floor"),
                ),
            ),
        ),
        (("clearing_bincount_ratio", "clearing / bincount"),),
    ),
    FigureChart(
        "figures-city",
        SYSTEM,
        "The city, end to end: reconciled taps a second and memory per device process",
        (
            Panel(
                "throughput",
                "taps/s",
                (Bar("city_taps_per_s", "taps reconciled", budget="city_taps_per_s"),),
            ),
            Panel(
                "memory per device process",
                "MB",
                (Bar("city_device_rss_mb", "RSS per device process"),),
            ),
        ),
        (
            ("city_taps", "taps"),
            ("city_reconciled", "taps reconciled"),
            ("city_processes", "processes"),
        ),
    ),
    FigureChart(
        "figures-testbed",
        SYSTEM,
        "Testbed: time per card beyond its presence detection",
        (
            Panel(
                "per card",
                "ms",
                (
                    Bar("testbed_ms_per_card", "beyond presence", budget="testbed_ms_per_card"),
                    Bar("testbed_presence_ms", "presence detection"),
                ),
            ),
        ),
        unless_samples="testbed_card",
    ),
)

_BUDGETS: dict[str, Budget] = {b.key: b for b in BUDGETS}


def charts(
    figures: Mapping[str, float],
    samples: Mapping[str, Sequence[float]],
    series: Mapping[str, Sequence[tuple[float, float]]],
    folder: Path,
) -> list[Chart]:
    """Draw every chart that has something to show into ``folder``: latency, then figures, then
    memory; each :class:`Chart` says its group and its file, relative to ``folder``."""
    return [
        *latency_charts(samples, folder),
        *figure_charts(figures, folder, samples=samples),
        *memory_charts(series, folder),
    ]


def latency_charts(samples: Mapping[str, Sequence[float]], folder: Path) -> list[Chart]:
    """Draw every latency chart that has samples, then one for each sample key none knows."""
    drawn: list[Chart] = []
    known: set[str] = set()
    for spec in LATENCY_CHARTS:
        known.update(c.key for c in spec.curves)
        chart = _latency(spec, samples, folder)
        if chart is not None:
            drawn.append(chart)
    used = {spec.name for spec in LATENCY_CHARTS}
    for key in sorted(samples.keys() - known):
        spec = LatencyChart(
            _file_stem(f"latency-{key}", used),
            OTHER,
            f"{key}: latency samples",
            "samples",
            (Curve(key, key, BLUE),),
        )
        chart = _latency(spec, samples, folder)
        if chart is not None:
            drawn.append(chart)
    return drawn


def memory_charts(series: Mapping[str, Sequence[tuple[float, float]]], folder: Path) -> list[Chart]:
    """Draw each memory series: the known ones first, then one for each key none knows."""
    known = {spec.key for spec in MEMORY_CHARTS}
    used = {f"memory-{key}" for key in known}
    specs = [(spec, f"memory-{spec.key}") for spec in MEMORY_CHARTS if spec.key in series]
    specs += [
        (MemoryChart(key, key, "x", group=OTHER), _file_stem(f"memory-{key}", used))
        for key in sorted(series.keys() - known)
    ]
    return [
        _memory(spec, stem, series[spec.key], folder) for spec, stem in specs if series[spec.key]
    ]


def figure_charts(
    figures: Mapping[str, float],
    folder: Path,
    *,
    samples: Mapping[str, Sequence[float]] | None = None,
) -> list[Chart]:
    """Draw each of :data:`FIGURE_CHARTS` that has at least one of its bars' figures (and, for
    one that stands in for a latency chart, no ``samples`` of its key)."""
    drawn = (
        _bars(spec, figures, folder)
        for spec in FIGURE_CHARTS
        if not (spec.unless_samples and (samples or {}).get(spec.unless_samples))
    )
    return [chart for chart in drawn if chart is not None]


def _file_stem(name: str, used: set[str]) -> str:
    """A file name made of ``name``'s safe characters, unique among ``used`` (which it joins)."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-")[:80] or "chart"
    candidate, n = stem, 2
    while candidate in used:
        candidate, n = f"{stem}-{n}", n + 1
    used.add(candidate)
    return candidate


def _latency(
    spec: LatencyChart, samples: Mapping[str, Sequence[float]], folder: Path
) -> Chart | None:
    data: list[tuple[Curve, np.ndarray]] = []
    for curve in spec.curves:
        values = np.asarray(samples.get(curve.key, ()), dtype=float)
        # a log axis has no room for zero; NaN has no place anywhere
        values = np.sort(values[np.isfinite(values) & (values > 0)])
        if values.size:
            data.append((curve, values))
    if not data:
        return None
    fig = Figure(figsize=(WIDTH_IN, 4.2), dpi=DPI, layout="constrained")
    hist, cdf = fig.subplots(1, 2)
    low = min(float(v[0]) for _, v in data)
    high = max(float(v[-1]) for _, v in data)
    fewest = min(v.size for _, v in data)
    bins = np.geomspace(low * 0.95, high * 1.05, int(np.clip(1.5 * math.sqrt(fewest), 12, 50)))
    fill = 0.15 if len(data) <= 2 else 0.07
    for curve, values in data:
        weights = np.full(values.size, 100.0 / values.size)
        hist.hist(values, bins=bins, weights=weights, color=curve.color, alpha=fill)
        hist.hist(
            values,
            bins=bins,
            weights=weights,
            histtype="step",
            color=curve.color,
            linestyle=curve.style,
            linewidth=1.4,
            label=curve.label,
        )
        share = (np.arange(values.size) + 0.5) / values.size
        cdf.step(values, share, where="post", color=curve.color, linestyle=curve.style, lw=1.4)
    _style_latency_axes(hist, cdf, spec.noun)
    for n, limit in enumerate(spec.limits):
        _draw_limit(limit, data, hist, cdf, legend=n == 0)
    for ax in (hist, cdf):
        _log_ticks(ax)
    fig.suptitle(spec.title, fontsize=12, fontweight="bold")
    fig.legend(loc="outside lower center", ncols=min(3, len(hist.get_legend_handles_labels()[1])))
    fig.savefig(folder / f"{spec.name}.png", dpi=DPI)
    rows = tuple(
        (
            curve.label,
            f"{values.size:,}",
            _ms(percentile(values.tolist(), 0.5)),
            _ms(percentile(values.tolist(), 0.99)),
            _ms(float(values[-1])),
        )
        for curve, values in data
    )
    columns = ("series", "n", "p50", "p99", "max")
    return Chart(f"{spec.name}.png", spec.title, spec.group, columns, rows)


def _style_latency_axes(hist: Axes, cdf: Axes, noun: str) -> None:
    for ax in (hist, cdf):
        ax.set_xscale("log")
        ax.set_xlabel("latency (ms, log scale)")
        ax.grid(visible=True, which="major", alpha=0.3)
        ax.grid(visible=True, which="minor", axis="x", alpha=0.1)
        ax.spines[["top", "right"]].set_visible(False)
    hist.set_ylabel(f"share of {noun} (%)")
    hist.set_title("distribution", fontsize=10)
    cdf.set_yscale("logit")
    cdf.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{100 * y:g} %"))
    cdf.yaxis.set_minor_formatter(NullFormatter())
    cdf.set_ylabel(f"share of {noun} at most this long")
    cdf.set_title("cumulative (p50, p99 marked)", fontsize=10)
    for q in (0.5, 0.99):
        cdf.axhline(q, color="0.5", linewidth=0.8, linestyle=":")


def _draw_limit(
    limit: Limit,
    data: list[tuple[Curve, np.ndarray]],
    hist: Axes,
    cdf: Axes,
    *,
    legend: bool,
) -> None:
    """A dash-dot line at the budget, named along it; the diamond is the quantile it limits."""
    budget = _BUDGETS.get(limit.key)
    if budget is None:
        return
    x = budget.limit
    if limit.relative_to is not None:
        reference = next((v for c, v in data if c.key == limit.relative_to), None)
        if reference is None:
            return
        at = percentile(reference.tolist(), limit.quantile)
        x = at + budget.limit if limit.added else at * budget.limit
    low, high = hist.get_xlim()
    # the histogram keeps to its samples unless the budget is near them; the CDF always shows it
    axes = (hist, cdf) if low / 3 < x < high * 3 else (cdf,)
    for ax in axes:
        ax.set_xlim(min(ax.get_xlim()[0], x / 1.3), max(ax.get_xlim()[1], x * 1.3))
        ax.axvline(x, color=BUDGET_COLOR, linestyle="-.", linewidth=1.2)
        ax.annotate(
            limit.label.format(limit=budget.limit),
            xy=(x, 0.02),
            xycoords=("data", "axes fraction"),
            xytext=(3, 0),
            textcoords="offset points",
            rotation=90,
            ha="left",
            va="bottom",
            fontsize=8,
            color=BUDGET_COLOR,
            bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "alpha": 0.8, "lw": 0},
            zorder=1.5,  # under the curves: a label must not hide data
        )
    cdf.plot([x], [limit.quantile], marker="D", color=BUDGET_COLOR, markersize=5)
    if legend:
        hist.plot([], [], color=BUDGET_COLOR, linestyle="-.", linewidth=1.2, label="budget")


def _log_ticks(ax: Axes) -> None:
    """Plain-number ticks on a log axis, dense enough to read even over a narrow range."""
    low, high = ax.get_xlim()
    ticks: list[float] = []
    for steps in TICK_STEPS:
        decades = range(math.floor(math.log10(low)) - 1, math.ceil(math.log10(high)) + 1)
        ticks = [m * 10.0**e for e in decades for m in steps if low <= m * 10.0**e <= high]
        if len(ticks) >= 4:
            break
    if len(ticks) < 3:  # under a third of a decade a log axis is nearly linear: tick it so
        ticks = [t for t in MaxNLocator(nbins=5).tick_values(low, high) if low <= t <= high]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def _memory(
    spec: MemoryChart,
    stem: str,
    points: Sequence[tuple[float, float]],
    folder: Path,
) -> Chart:
    xs = np.array([p[0] for p in points], dtype=float)
    ys = np.array([p[1] for p in points], dtype=float)
    fig = Figure(figsize=(WIDTH_IN, 3.6), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    ax.plot(xs, ys, color=BLUE, linewidth=1.6, marker="." if xs.size <= 60 else None, label="RSS")
    top = float(ys.max())
    budget = _BUDGETS.get(spec.growth_budget) if spec.growth_budget else None
    if budget is not None:
        top = max(top, ys[0] + budget.limit)
        ax.axhline(
            ys[0] + budget.limit,
            color=BUDGET_COLOR,
            linestyle="-.",
            linewidth=1.2,
            label=f"budget: first + {budget.limit:g} MB",
        )
        ax.legend(loc="lower right")
    ax.xaxis.set_major_formatter(EngFormatter(sep=" "))
    ax.set_xlabel(spec.x_label)
    ax.set_ylabel(spec.y_label)
    ax.set_ylim(0, top * 1.12)
    ax.grid(visible=True, alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)
    ax.set_title(spec.title, fontsize=12, fontweight="bold")
    fig.savefig(folder / f"{stem}.png", dpi=DPI)
    rows = (
        (
            f"{xs[-1]:,.0f}",
            f"{ys[0]:,.1f} {spec.unit}",
            f"{ys[-1]:,.1f} {spec.unit}",
            f"{ys[-1] - ys[0]:+,.1f} {spec.unit}",
            f"{ys.max():,.1f} {spec.unit}",
        ),
    )
    columns = (spec.x_label, "first", "last", "growth", "peak")
    return Chart(f"{stem}.png", spec.title, spec.group, columns, rows)


def _ms(value: float) -> str:
    return f"{value:.3g} ms"


def _bars(spec: FigureChart, figures: Mapping[str, float], folder: Path) -> Chart | None:
    panels = [
        (panel, [(bar, figures[bar.key]) for bar in panel.bars if _finite(figures.get(bar.key))])
        for panel in spec.panels
    ]
    panels = [(panel, bars) for panel, bars in panels if bars]
    if not panels:
        return None
    fig = Figure(figsize=(WIDTH_IN, 3.6), dpi=DPI, layout="constrained")
    ratios = [max(len(bars), 2) for _, bars in panels]
    axes = fig.subplots(1, len(panels), squeeze=False, width_ratios=ratios)[0]
    rows: list[tuple[str, ...]] = []
    for ax, ratio, (panel, bars) in zip(axes, ratios, panels, strict=True):
        # room for BAR_SLOTS bars across the figure: a lone bar is not a wall
        slots = max(len(bars), BAR_SLOTS * ratio / sum(ratios))
        rows += _bar_panel(ax, panel, bars, slots)
    rows += [
        (label, _figure_text(figures[key]), "", "")
        for key, label in spec.notes
        if _finite(figures.get(key))
    ]
    fig.suptitle(spec.title, fontsize=12, fontweight="bold")
    fig.savefig(folder / f"{spec.name}.png", dpi=DPI)
    columns = ("figure", "value", "budget", "")
    return Chart(f"{spec.name}.png", spec.title, spec.group, columns, tuple(rows))


def _bar_panel(
    ax: Axes, panel: Panel, bars: list[tuple[Bar, float]], slots: float
) -> list[tuple[str, ...]]:
    """Draw one panel's bars, centred in room for ``slots``, green or red by their budget (blue
    with none), each budget a dash-dot line over the bars it holds; returns the panel's rows of
    the table."""
    budgets = [_BUDGETS.get(bar.budget) if bar.budget else None for bar, _ in bars]
    values = [value for _, value in bars]
    colors = [
        BLUE if budget is None else (GREEN if budget.holds(value) else BUDGET_COLOR)
        for budget, value in zip(budgets, values, strict=True)
    ]
    xs = np.arange(len(bars))
    drawn = ax.bar(xs, values, width=0.6, color=colors, alpha=0.85)
    ax.bar_label(drawn, labels=[_figure_text(v) for v in values], padding=2, fontsize=8)
    top, bottom = max(0.0, *values), min(0.0, *values)
    # bars held to the same limit share one line (SQLite and PostgreSQL ingest)
    limits = [limit_text(b) if b is not None else None for b in budgets]
    for text, budget in {t: b for t, b in zip(limits, budgets, strict=True) if b}.items():
        top = max(top, budget.limit)
        held_to = [x for x, t in enumerate(limits) if t == text]
        left, right = held_to[0] - 0.45, held_to[-1] + 0.45
        ax.hlines(budget.limit, left, right, color=BUDGET_COLOR, linestyle="-.", linewidth=1.4)
        ax.annotate(
            f"budget {text} {panel.unit}",
            xy=((left + right) / 2, budget.limit),
            xytext=(0, 2),
            textcoords="offset points",
            ha="center",
            va="bottom",
            fontsize=8,
            color=BUDGET_COLOR,
            bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "alpha": 0.8, "lw": 0},
        )
    ax.set_ylim(bottom * 1.2, top * 1.2 if top > 0 else 1.0)
    middle = (len(bars) - 1) / 2
    ax.set_xlim(middle - slots / 2, middle + slots / 2)
    ax.set_xticks(xs, [textwrap.fill(bar.label, 11) for bar, _ in bars], fontsize=8)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:,g}"))
    ax.set_ylabel(panel.unit)
    ax.set_title(panel.title, fontsize=10)
    ax.grid(visible=True, axis="y", alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)
    return [
        (
            f"{panel.title}: {bar.label}",
            f"{_figure_text(value)} {panel.unit}",
            f"{limit_text(budget)} {panel.unit}" if budget is not None else "",
            mark(budget.holds(value)) if budget is not None else "",
        )
        for (bar, value), budget in zip(bars, budgets, strict=True)
    ]


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def _figure_text(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
