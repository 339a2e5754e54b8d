"""farelab installs as one package: its parts (the top-level folders card/, validator/, topup/,
backend/, bench/) are mapped into the ``farelab`` namespace, and nothing shipped imports the
test suite."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_a_wheel_holds_only_the_farelab_package(tmp_path: Path) -> None:
    # built from a copy, so that setuptools' build/ and egg-info stay out of the checkout
    source = tmp_path / "source"
    shutil.copytree(
        ROOT,
        source,
        symlinks=True,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "build", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis"
        ),
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--quiet",
            "--wheel-dir",
            str(tmp_path),
            str(source),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    [wheel] = tmp_path.glob("farelab-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        tops = {name.split("/")[0] for name in names}
        assert tops == {"farelab", next(t for t in tops if t.endswith(".dist-info"))}
        for part in ("card", "validator", "topup", "backend", "bench"):
            assert f"farelab/{part}/__init__.py" in names
        assert "farelab/validator/networks.toml" in names
        shipped_tests = [
            name
            for name in names
            if name.endswith(".py")
            and re.search(rb"^\s*(from|import) tests\b", z.read(name), re.MULTILINE)
        ]
    assert shipped_tests == []


def test_the_parts_are_one_module_each_under_farelab() -> None:
    import farelab.card  # noqa: PLC0415
    import farelab.validator._journal  # noqa: PLC0415

    assert Path(farelab.card.__file__).parent.name == "card"
    assert "card" not in sys.modules  # no second copy under the bare folder name
    assert farelab.validator._journal.__name__ == "farelab.validator._journal"


def test_the_installed_package_works_outside_the_checkout(tmp_path: Path) -> None:
    """From another folder the top-level folders are not on the path: anything that still
    named a part by its bare name (an import, a package resource) fails here."""
    script = (
        "from farelab.validator._network import shipped_networks\n"
        "from farelab.bench._taps import TapBench\n"
        "bench = TapBench.make('metro', 'j.db')\n"
        "result, _ = bench.tap(0)\n"
        "print(sorted(shipped_networks()), result.result)\n"
    )
    done = subprocess.run(
        [sys.executable, "-I", "-c", script],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "accepted" in done.stdout
