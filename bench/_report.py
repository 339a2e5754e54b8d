"""``farelab bench --report DIR``: one static HTML page with its charts, from a bench document.

The page shows the budget table by group, then a section of charts for each group (in the
budgets' order; charts of keys no chart knows come last), every other figure, the machine and
the commands that reproduce the run.  It says nothing of other runs: the one date on it is when
it was written.

The document is what ``run_suite`` returns or what ``--json`` wrote; any key may be absent or
malformed (an older run, a suite that broke halfway), and the page shows what there is.  Every
text on the page is escaped; the images sit beside it and are referenced relatively, so the
folder can be copied or served as it is.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from html import escape
from pathlib import Path

from farelab.bench._charts import OTHER, Chart, charts
from farelab.bench._suite import BUDGETS, checked, limit_text, mark, measured_text

__all__ = ["COMMANDS", "write_report"]

COMMANDS = ("farelab bench", "farelab bench --quick", "pytest bench/ --benchmark-only")
_NOT_FIGURES = frozenset({"quick", "budgets", "errors", "machine", "samples", "series"})
_TITLE = "farelab benchmark report"

_CSS = """
:root { --ink: #1d2330; --muted: #667085; --line: #e4e7ec; --bad: #b42318; --bad-bg: #fef3f2;
        --good: #067647; --good-bg: #ecfdf3; --warn-bg: #fffaeb; --warn: #b54708; }
* { box-sizing: border-box; }
body { margin: 0; background: #f6f7f9; color: var(--ink);
       font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Noto Sans", sans-serif; }
main { max-width: 960px; margin: 0 auto; padding: 24px 24px 48px; background: #fff;
       min-height: 100vh; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 19px; margin: 36px 0 12px; padding-bottom: 4px;
     border-bottom: 1px solid var(--line); }
.meta { color: var(--muted); margin: 0 0 16px; }
.badge { display: inline-block; padding: 1px 10px; border-radius: 999px; font-size: 13px;
         font-weight: 600; background: var(--good-bg); color: var(--good); }
.badge.quick { background: var(--warn-bg); color: var(--warn); }
.summary { display: flex; gap: 12px; flex-wrap: wrap; margin: 16px 0; }
.tile { flex: 1 1 150px; border: 1px solid var(--line); border-radius: 10px; padding: 10px 14px; }
.tile b { display: block; font-size: 28px; line-height: 1.2; }
.tile.bad { border-color: var(--bad); background: var(--bad-bg); color: var(--bad); }
.tile.good b { color: var(--good); }
.errors { border: 2px solid var(--bad); background: var(--bad-bg); border-radius: 10px;
          padding: 12px 18px; margin: 16px 0; }
.errors h2 { color: var(--bad); border: 0; margin: 0 0 8px; }
.errors pre { white-space: pre-wrap; margin: 2px 0 10px; font-size: 13px; }
table { border-collapse: collapse; width: 100%; margin: 8px 0 16px; font-size: 14px; }
th, td { text-align: left; padding: 5px 10px; border-bottom: 1px solid var(--line); }
th { color: var(--muted); font-weight: 600; font-size: 13px; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.mark { text-align: center; font-weight: 700; width: 3em; }
tr.missed td { background: var(--bad-bg); color: var(--bad); font-weight: 600; }
tr.held td.mark { color: var(--good); }
tr.unmeasured td { color: var(--muted); }
tr.group th { color: var(--ink); font-size: 14px; padding-top: 14px; }
tr.group a { color: inherit; }
figure { margin: 24px 0 4px; }
figure img { width: 100%; max-width: 900px; height: auto; display: block; }
table.stats { font-size: 13px; }
pre.commands { background: #0f172a; color: #e2e8f0; padding: 12px 16px; border-radius: 8px;
               overflow-x: auto; font-size: 13px; }
code { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; }
footer { margin-top: 40px; color: var(--muted); font-size: 13px; }
"""


def write_report(doc: Mapping[str, object], folder: Path) -> Path:
    """Write ``folder/index.html`` and its PNG charts (creating ``folder``); returns the page."""
    folder.mkdir(parents=True, exist_ok=True)
    figures = _figures(doc)
    drawn = charts(figures, _samples(doc), _series(doc), folder)
    groups = [group for group in _groups(drawn) if any(c.group == group for c in drawn)]
    body = [
        _header(doc),
        _errors(doc),
        _budgets(doc, linked=set(groups)),
        *(_group_section(group, [c for c in drawn if c.group == group]) for group in groups),
        _other_figures(figures),
        _machine(doc),
        _commands(doc),
        f"<footer>Written by <code>farelab bench --report</code> on {_now()}.</footer>",
    ]
    page = folder / "index.html"
    page.write_text(
        "<!doctype html>\n<html lang='en'>\n<head>\n<meta charset='utf-8'>\n"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>\n"
        f"<title>{_TITLE}</title>\n"
        f"<style>{_CSS}</style>\n</head>\n<body>\n<main>\n"
        + "\n".join(part for part in body if part)
        + "\n</main>\n</body>\n</html>\n",
        encoding="utf-8",
    )
    return page


def _number(value: object) -> float | None:
    """A figure, or None for anything else (``bool`` is an ``int`` to Python, not to us)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _figures(doc: Mapping[str, object]) -> dict[str, float]:
    figures = {key: _number(value) for key, value in doc.items() if key not in _NOT_FIGURES}
    return {key: value for key, value in figures.items() if value is not None}


def _samples(doc: Mapping[str, object]) -> dict[str, list[float]]:
    raw = doc.get("samples")
    if not isinstance(raw, Mapping):
        return {}
    samples: dict[str, list[float]] = {}
    for key, values in raw.items():
        if isinstance(values, Sequence) and not isinstance(values, str):
            numbers = [n for n in map(_number, values) if n is not None]
            if numbers:
                samples[str(key)] = numbers
    return samples


def _series(doc: Mapping[str, object]) -> dict[str, list[tuple[float, float]]]:
    raw = doc.get("series")
    if not isinstance(raw, Mapping):
        return {}
    series: dict[str, list[tuple[float, float]]] = {}
    for key, points in raw.items():
        if not isinstance(points, Sequence) or isinstance(points, str):
            continue
        pairs = []
        for point in points:
            if isinstance(point, Sequence) and not isinstance(point, str) and len(point) == 2:
                x, y = _number(point[0]), _number(point[1])
                if x is not None and y is not None and math.isfinite(x) and math.isfinite(y):
                    pairs.append((x, y))
        if pairs:
            series[str(key)] = sorted(pairs)
    return series


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")


def _header(doc: Mapping[str, object]) -> str:
    quick = doc.get("quick") is True
    badge = (
        "<span class='badge quick'>quick run: smaller counts, figures are indicative</span>"
        if quick
        else "<span class='badge'>full run</span>"
    )
    rows = checked(doc)
    held = sum(1 for *_, holds in rows if holds is True)
    missed = sum(1 for *_, holds in rows if holds is False)
    unmeasured = sum(1 for *_, holds in rows if holds is None)
    errors = doc.get("errors")
    broke = len(errors) if isinstance(errors, Mapping) else 0
    tiles = [
        _tile(held, f"of {len(rows)} budgets hold", "good" if held else ""),
        _tile(missed, "missed", "bad" if missed else ""),
        _tile(unmeasured, "not measured", ""),
    ]
    if broke:
        tiles.append(_tile(broke, "measures broke", "bad"))
    return (
        f"<header>\n<h1>{_TITLE}</h1>\n"
        f"<p class='meta'>{badge}</p>\n"
        f"<div class='summary'>{''.join(tiles)}</div>\n</header>"
    )


def _tile(count: int, text: str, kind: str) -> str:
    return f"<div class='tile {kind}'><b>{count}</b>{escape(text)}</div>"


def _errors(doc: Mapping[str, object]) -> str:
    errors = doc.get("errors")
    if not isinstance(errors, Mapping) or not errors:
        return ""
    items = "".join(
        f"<p><b>{escape(str(name))}</b></p><pre>{escape(str(message))}</pre>"
        for name, message in errors.items()
    )
    return (
        "<section class='errors'>\n<h2>Measures that broke</h2>\n"
        "<p>Their figures are missing below; the budgets they feed show as not measured.</p>\n"
        f"{items}\n</section>"
    )


def _groups(drawn: Sequence[Chart]) -> list[str]:
    """The groups in the budgets' order, then any other a chart names, :data:`OTHER` last."""
    order = dict.fromkeys(budget.group for budget in BUDGETS)
    order.update(dict.fromkeys(c.group for c in drawn if c.group != OTHER))
    return [*order, OTHER]


def _anchor(group: str) -> str:
    return "group-" + "-".join(group.split())


def _heading(group: str) -> str:
    return "Other charts" if group == OTHER else group[:1].upper() + group[1:]


def _budgets(doc: Mapping[str, object], *, linked: set[str]) -> str:
    """The budget table, a header row for each group (linked to its charts where it has any)."""
    rows = []
    group: str | None = None
    for budget, value, holds in checked(doc):
        if budget.group != group:
            group = budget.group
            name = escape(group)
            if group in linked:
                name = f"<a href='#{escape(_anchor(group))}'>{name}</a>"
            rows.append(f"<tr class='group'><th colspan='4'>{name}</th></tr>")
        kind = "unmeasured" if holds is None else ("held" if holds else "missed")
        shown = measured_text(value)
        rows.append(
            f"<tr class='{kind}'><td>{escape(budget.label)}</td>"
            f"<td class='num'>{escape(shown)}</td>"
            f"<td class='num'>{escape(limit_text(budget))}</td>"
            f"<td class='mark'>{escape(mark(holds))}</td></tr>"
        )
    return (
        "<section>\n<h2>Budgets</h2>\n<table class='budgets'>\n"
        "<tr><th>budget</th><th class='num'>measured</th><th class='num'>limit</th><th></th></tr>\n"
        + "\n".join(rows)
        + "\n</table>\n</section>"
    )


def _group_section(group: str, drawn: list[Chart]) -> str:
    parts = [f"<section id='{escape(_anchor(group))}'>\n<h2>{escape(_heading(group))}</h2>"]
    for chart in drawn:
        head = "".join(
            f"<th class='num'>{escape(c)}</th>" if i else f"<th>{escape(c)}</th>"
            for i, c in enumerate(chart.columns)
        )
        body = "".join(
            "<tr>"
            + "".join(
                f"<td class='num'>{escape(v)}</td>" if i else f"<td>{escape(v)}</td>"
                for i, v in enumerate(row)
            )
            + "</tr>"
            for row in chart.rows
        )
        parts.append(
            f"<figure><img src='{escape(chart.file)}' alt='{escape(chart.title)}' "
            "width='900'></figure>\n"
            f"<table class='stats'><tr>{head}</tr>{body}</table>"
        )
    parts.append("</section>")
    return "\n".join(parts)


def _other_figures(figures: Mapping[str, float]) -> str:
    budgeted = {budget.key for budget in BUDGETS}
    rows = "".join(
        f"<tr><td><code>{escape(key)}</code></td><td class='num'>{escape(_shown(value))}</td></tr>"
        for key, value in sorted(figures.items())
        if key not in budgeted
    )
    if not rows:
        return ""
    return (
        "<section>\n<h2>Every other figure</h2>\n<table>"
        "<tr><th>figure</th><th class='num'>value</th></tr>"
        f"{rows}</table>\n</section>"
    )


def _shown(value: float) -> str:
    if not math.isfinite(value):
        return str(value)
    if value.is_integer() and abs(value) < 1e15:
        return f"{int(value):,}"
    if abs(value) >= 100:
        return f"{value:,.1f}"
    return f"{value:.4g}"


def _machine(doc: Mapping[str, object]) -> str:
    machine = doc.get("machine")
    if not isinstance(machine, Mapping) or not machine:
        return ""
    rows = "".join(
        f"<tr><th>{escape(str(key))}</th><td><code>{escape(str(value))}</code></td></tr>"
        for key, value in machine.items()
    )
    return f"<section>\n<h2>Machine</h2>\n<table>{rows}</table>\n</section>"


def _commands(doc: Mapping[str, object]) -> str:
    this_run = COMMANDS[1] if doc.get("quick") is True else COMMANDS[0]
    commands = [f"{this_run}    # this run", *(c for c in COMMANDS if c != this_run)]
    extra = doc.get("commands")
    if isinstance(extra, Sequence) and not isinstance(extra, str):
        commands += [str(c) for c in extra if str(c) not in COMMANDS]
    lines = "\n".join(escape(c) for c in commands)
    return (
        "<section>\n<h2>Reproduce</h2>\n"
        "<p>From a checkout with <code>bash .ci/install</code> done "
        "(the suite starts its own pcscd and Mosquitto):</p>\n"
        f"<pre class='commands'><code>{lines}</code></pre>\n</section>"
    )
