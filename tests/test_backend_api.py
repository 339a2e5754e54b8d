"""farelab.backend's public names: each one its __init__ offers resolves, and importing the
package loads neither the MQTT client, numpy, amqtt, matplotlib nor the PostgreSQL driver."""

from __future__ import annotations

import json
import subprocess
import sys

import farelab.backend

HEAVY = ("aiomqtt", "amqtt", "matplotlib", "numpy", "psycopg")


def test_every_public_name_resolves() -> None:
    missing = [name for name in farelab.backend.__all__ if not hasattr(farelab.backend, name)]
    assert missing == []
    assert farelab.backend.__doc__


def test_importing_the_backend_loads_no_heavy_dependency() -> None:
    code = (
        "import json, sys; import farelab.backend; "
        f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert json.loads(done.stdout) == []


def test_a_lazy_name_is_loaded_on_first_use() -> None:
    code = (
        "import json, sys; from farelab.backend import run_workers; "
        "print(json.dumps(['aiomqtt' in sys.modules, callable(run_workers)]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert json.loads(done.stdout) == [True, True]
