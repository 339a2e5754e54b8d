"""``farelab bench``: the benchmark suite, its budget table, its JSON and its HTML report."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType

from farelab._errors import CliError
from farelab.bench import budget_table, checked, dump, run_suite, where_threads_are

__all__ = ["register"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``bench``."""
    bench = sub.add_parser(
        "bench",
        help="measure taps, the backend, start-up, memory, the city and the testbed against "
        "their budgets",
        description="Run the benchmarks (it starts its own pcscd, Mosquitto and backend, and "
        "runs 'farelab city' and 'farelab testbed run' as a user would; the "
        "PostgreSQL ingest and the backend's memory run use a fresh schema of the local database "
        "'test', or of FARELAB_BENCH_POSTGRES, dropped afterwards), print the "
        "budget table (measured vs budget, ✓/✗), and optionally write every figure as JSON "
        "and an HTML report with charts. With --from-json nothing is measured: the figures of "
        "an earlier --json are checked and reported instead. "
        "Exit status: 0 all measured budgets hold, 1 one is missed, 2 a measure broke "
        "(or the command could not run).",
    )
    source = bench.add_mutually_exclusive_group()
    source.add_argument(
        "--quick",
        action="store_true",
        help="every figure at a smaller scale, under 2 minutes instead of about 15, depending "
        "on the machine (CI runs this to catch breakage)",
    )
    source.add_argument(
        "--from-json",
        type=Path,
        metavar="FILE",
        help="measure nothing: take the figures of an earlier 'farelab bench --json FILE'",
    )
    bench.add_argument(
        "--step-timeout",
        type=_seconds,
        metavar="SECONDS",
        help="stop a measure still running after SECONDS (default 240 with --quick, 1800 "
        "otherwise), print where each thread was, report it as not measured and go on",
    )
    bench.add_argument("--json", type=Path, metavar="FILE", help="write every figure as JSON")
    bench.add_argument(
        "--report",
        type=Path,
        metavar="DIR",
        help="write DIR/index.html, a static page with the budget table by group, a section of "
        "charts for each group (PNG files beside it), the machine and the commands that "
        "reproduce the run; "
        "DIR is created if needed and files of the same names are replaced",
    )
    bench.set_defaults(func=_bench)


def _bench(args: argparse.Namespace) -> int:
    if args.report is not None:
        _make_folder(args.report)  # before measuring, not after a minute of it
    if args.from_json is not None:
        doc = _load(args.from_json)
    else:
        started = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        # SIGTERM (a CI time limit, `kill`) unwinds like Ctrl-C: the broker, the backend and
        # pcscd the run started are stopped on the way out, and where it was is printed.
        signal.signal(signal.SIGTERM, _terminated)
        doc = run_suite(
            quick=args.quick,
            progress=lambda line: print(line, file=sys.stderr, flush=True),
            step_limit=args.step_timeout,
        )
        doc["date"] = started
    if args.json is not None:
        try:
            dump(doc, args.json)
        except OSError as exc:
            raise CliError(f"cannot write {args.json}: {exc.strerror}") from None
    if args.report is not None:
        from farelab.bench import write_report  # noqa: PLC0415  (matplotlib is slow to import)

        try:
            page = write_report(doc, args.report)
        except OSError as exc:
            raise CliError(f"cannot write the report in {args.report}: {exc.strerror}") from None
        print(f"report written: {page}", file=sys.stderr)
    print(budget_table(doc))
    errors = doc.get("errors")
    if isinstance(errors, dict) and errors:
        for name, error in errors.items():
            print(f"not measured: {name}: {error}", file=sys.stderr)
        return 2
    return 1 if any(holds is False for _, _, holds in checked(doc)) else 0


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value < 86_400:
        raise argparse.ArgumentTypeError(f"must be more than 0 and less than a day: {text}")
    return value


def _terminated(signum: int, frame: FrameType | None) -> None:
    print(f"farelab bench: terminated; where it was:\n{where_threads_are()}", file=sys.stderr)
    raise KeyboardInterrupt


def _make_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CliError(f"cannot write the report in {folder}: {exc.strerror}") from None


def _load(path: Path) -> dict[str, object]:
    """The document an earlier ``--json`` wrote."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise CliError(f"{path} is not a farelab bench JSON file (not UTF-8 text)") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CliError(f"{path} is not valid JSON: {exc.msg} at line {exc.lineno}") from None
    if not isinstance(doc, dict):
        raise CliError(f"{path} is not a farelab bench JSON file (not a JSON object)")
    if "date" not in doc:  # written before runs were dated: --json writes at the end of the run
        written = datetime.fromtimestamp(path.stat().st_mtime, UTC)
        doc["date"] = written.strftime("%Y-%m-%d %H:%M UTC")
    return doc
