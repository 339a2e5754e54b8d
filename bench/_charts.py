"""The report's charts as PNG files: latency distributions, and memory as the work grows.

Drawn with matplotlib's object API on its Agg canvas (no pyplot, so no display and no global
figure state).  Related latency series share one figure, a histogram beside a cumulative
distribution, with the budgets that apply to them drawn where they bite.
"""

from __future__ import annotations

import math
import re
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

from farelab.bench._suite import BUDGETS, Budget
from farelab.bench._taps import percentile

__all__ = ["LATENCY_CHARTS", "MEMORY_CHARTS", "Chart", "latency_charts", "memory_charts"]

WIDTH_IN = 9.0
DPI = 150
BUDGET_COLOR = "#c0392b"
BLUE, ORANGE, GREEN, PURPLE, BROWN = "#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b"
# 1-2-5 and finer: the first that puts at least four ticks on a log axis (a narrow one has few)
TICK_STEPS = ((1.0,), (1.0, 2.0, 5.0), (1.0, 2.0, 3.0, 5.0), (1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 7.0))


@dataclass(frozen=True)
class Curve:
    """One latency series: its key in ``doc["samples"]``, its legend and its line.

    ``floor_of`` names a scalar figure the samples are multiplied by to draw a floor, as the
    floor of a tap through pcscd is its number of APDUs times one SCardTransmit.
    """

    key: str
    label: str
    color: str
    style: str = "-"
    floor_of: str | None = None


@dataclass(frozen=True)
class Limit:
    """A budget drawn as a vertical line: ``label`` is formatted with the budget's ``limit``.

    A ratio budget (``relative_to`` set) is drawn at ``limit`` times that curve's ``quantile``.
    """

    key: str
    label: str
    relative_to: str | None = None
    quantile: float = 0.99


@dataclass(frozen=True)
class LatencyChart:
    """Related latency series overlaid in one figure; ``noun`` is what one sample times."""

    name: str
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
    growth_budget: str | None = None
    y_label: str = "RSS (MB)"
    unit: str = "MB"


@dataclass(frozen=True)
class Chart:
    """A chart written to disk, and the small table the page shows under it."""

    file: str
    title: str
    columns: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]


LATENCY_CHARTS = (
    LatencyChart(
        "latency-taps-inproc",
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
        "Tap through pcscd against its floor (APDUs × one SCardTransmit)",
        "taps",
        (
            Curve("tap_pcsc", "tap through pcscd", PURPLE),
            Curve("pcsc_apdu", "SCardTransmit", GREEN, "--", floor_of="tap_apdus"),
        ),
        (
            Limit("tap_pcsc_p99_ms", "p99 ≤ {limit:g} ms"),
            Limit(
                "tap_pcsc_floor_ratio",
                "p50 ≤ {limit:g} × floor p50",
                relative_to="pcsc_apdu",
                quantile=0.5,
            ),
        ),
    ),
    LatencyChart(
        "latency-taps-uplink",
        "Tap while the uplink is idle, drains a backlog, or cannot reach the broker",
        "taps",
        (
            Curve("tap_idle", "uplink idle", BLUE),
            Curve("tap_backlog", "uplink draining a backlog", ORANGE),
            Curve("tap_outage", "broker down", BROWN, "--"),
        ),
        (Limit("tap_backlog_ratio", "p99 ≤ {limit:g} × idle p99", relative_to="tap_idle"),),
    ),
    LatencyChart(
        "latency-ingest-ack",
        "Backend ingest: a batch published until its acknowledgement",
        "batches",
        (Curve("ingest_ack", "batch acknowledged", GREEN),),
    ),
    LatencyChart(
        "latency-topup",
        "Top-up: card → host (backend over Mosquitto) → card",
        "top-ups",
        (Curve("topup", "top-up", PURPLE),),
        (Limit("topup_p99_ms", "p99 ≤ {limit:g} ms"),),
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
        y_label="ingest rate (tx/s)",
        unit="tx/s",
    ),
)

_BUDGETS: dict[str, Budget] = {b.key: b for b in BUDGETS}


def latency_charts(
    samples: Mapping[str, Sequence[float]], figures: Mapping[str, float], folder: Path
) -> list[Chart]:
    """Draw every latency chart that has samples, then one for each sample key none knows."""
    drawn: list[Chart] = []
    known: set[str] = set()
    for spec in LATENCY_CHARTS:
        known.update(c.key for c in spec.curves)
        chart = _latency(spec, samples, figures, folder)
        if chart is not None:
            drawn.append(chart)
    used = {spec.name for spec in LATENCY_CHARTS}
    for key in sorted(samples.keys() - known):
        spec = LatencyChart(
            _file_stem(f"latency-{key}", used),
            f"{key}: latency samples",
            "samples",
            (Curve(key, key, BLUE),),
        )
        chart = _latency(spec, samples, figures, folder)
        if chart is not None:
            drawn.append(chart)
    return drawn


def memory_charts(series: Mapping[str, Sequence[tuple[float, float]]], folder: Path) -> list[Chart]:
    """Draw each memory series: the known ones first, then one for each key none knows."""
    known = {spec.key for spec in MEMORY_CHARTS}
    used = {f"memory-{key}" for key in known}
    specs = [(spec, f"memory-{spec.key}") for spec in MEMORY_CHARTS if spec.key in series]
    specs += [
        (MemoryChart(key, key, "x"), _file_stem(f"memory-{key}", used))
        for key in sorted(series.keys() - known)
    ]
    return [
        _memory(spec, stem, series[spec.key], folder) for spec, stem in specs if series[spec.key]
    ]


def _file_stem(name: str, used: set[str]) -> str:
    """A file name made of ``name``'s safe characters, unique among ``used`` (which it joins)."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-")[:80] or "chart"
    candidate, n = stem, 2
    while candidate in used:
        candidate, n = f"{stem}-{n}", n + 1
    used.add(candidate)
    return candidate


def _latency(
    spec: LatencyChart,
    samples: Mapping[str, Sequence[float]],
    figures: Mapping[str, float],
    folder: Path,
) -> Chart | None:
    data: list[tuple[Curve, str, np.ndarray]] = []
    unscaled: set[str] = set()  # floors whose factor is missing: no ratio budget against them
    for curve in spec.curves:
        values = np.asarray(samples.get(curve.key, ()), dtype=float)
        # a log axis has no room for zero; NaN has no place anywhere
        values = np.sort(values[np.isfinite(values) & (values > 0)])
        if not values.size:
            continue
        label = curve.label
        factor = figures.get(curve.floor_of) if curve.floor_of else None
        if factor is not None and math.isfinite(factor) and factor > 0:
            values = values * factor
            label = f"floor: {factor:g} × {curve.label}"
        elif curve.floor_of:
            label = f"one {curve.label}"
            unscaled.add(curve.key)
        data.append((curve, label, values))
    if not data:
        return None
    fig = Figure(figsize=(WIDTH_IN, 4.2), dpi=DPI, layout="constrained")
    hist, cdf = fig.subplots(1, 2)
    low = min(float(v[0]) for _, _, v in data)
    high = max(float(v[-1]) for _, _, v in data)
    fewest = min(v.size for _, _, v in data)
    bins = np.geomspace(low * 0.95, high * 1.05, int(np.clip(1.5 * math.sqrt(fewest), 12, 50)))
    fill = 0.15 if len(data) <= 2 else 0.07
    for curve, label, values in data:
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
            label=label,
        )
        share = (np.arange(values.size) + 0.5) / values.size
        cdf.step(values, share, where="post", color=curve.color, linestyle=curve.style, lw=1.4)
    _style_latency_axes(hist, cdf, spec.noun)
    limits = [limit for limit in spec.limits if limit.relative_to not in unscaled]
    for n, limit in enumerate(limits):
        _draw_limit(limit, data, hist, cdf, legend=n == 0)
    for ax in (hist, cdf):
        _log_ticks(ax)
    fig.suptitle(spec.title, fontsize=12, fontweight="bold")
    fig.legend(loc="outside lower center", ncols=min(3, len(hist.get_legend_handles_labels()[1])))
    fig.savefig(folder / f"{spec.name}.png", dpi=DPI)
    rows = tuple(
        (
            label,
            f"{values.size:,}",
            _ms(percentile(values.tolist(), 0.5)),
            _ms(percentile(values.tolist(), 0.99)),
            _ms(float(values[-1])),
        )
        for _, label, values in data
    )
    return Chart(f"{spec.name}.png", spec.title, ("series", "n", "p50", "p99", "max"), rows)


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
    data: list[tuple[Curve, str, np.ndarray]],
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
        reference = next((v for c, _, v in data if c.key == limit.relative_to), None)
        if reference is None:
            return
        x *= percentile(reference.tolist(), limit.quantile)
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
    return Chart(f"{stem}.png", spec.title, (spec.x_label, "first", "last", "growth", "peak"), rows)


def _ms(value: float) -> str:
    return f"{value:.3g} ms"
