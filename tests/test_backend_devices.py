"""``farelab backend devices``: the registry provisioned by hand or from a validator config,
listed for scripts, revoked; bad input is one clear line."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from farelab.backend._mosquitto import Mosquitto
from farelab.backend._registry import lookup
from farelab.backend._store import Store
from tests.cli_support import farelab as run_farelab
from tests.test_uplink_backend import DEVICES, start_backend, stop


def farelab(*args: str) -> subprocess.CompletedProcess[str]:
    return run_farelab("backend", "devices", *args)


def test_devices_from_a_validator_config_are_registered_as_they_write_records(
    tmp_path: Path,
) -> None:
    config = tmp_path / "devices.toml"
    config.write_text(DEVICES.replace('id = "bus-1"', 'id = "bus-1"\nmqtt_password = "s3cret"'))
    db = f"sqlite:///{tmp_path / 'ledger.db'}"
    added = farelab("add", "--config", str(config), "--db", db)
    assert added.returncode == 0, added.stderr
    listed = json.loads(farelab("list", "--db", db, "--json").stdout)
    by_id = {d["id"]: d for d in listed}
    assert by_id["bus-1"] == {
        "id": "bus-1",
        "role": "validator",
        "operator": "TAIYUAN",
        "kinds": ["bus"],
        "terminal": "000000000B01",
        "station": "",
        "line": 0,
        "revoked": False,
    }
    gate = by_id["gate-a"]
    assert (gate["kinds"], gate["line"], len(gate["station"])) == (["entry", "exit"], 2, 16)
    store = Store(db, create=False)
    secret = store.execute("SELECT secret_hash FROM devices WHERE id = 'bus-1'").fetchone()[0]
    store.close()
    assert secret.startswith("pbkdf2-sha512$")
    assert "s3cret" not in secret


def test_a_kiosk_added_by_hand_then_revoked(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'ledger.db'}"
    added = farelab(
        "add",
        "kiosk-9",
        "--role",
        "kiosk",
        "--operator",
        "TYKIOSK",
        "--kinds",
        "load,refund",
        "--terminal",
        "0000f000beef",
        "--password",
        "pw",
        "--db",
        db,
    )
    assert added.returncode == 0, added.stderr
    assert farelab("revoke", "kiosk-9", "--db", db).returncode == 0
    store = Store(db, create=False)
    entry = lookup(store, "kiosk-9")
    store.close()
    assert entry is not None
    assert (entry.role, entry.terminal, entry.revoked) == ("kiosk", "0000F000BEEF", True)
    assert "REVOKED" in farelab("list", "--db", db).stdout
    unknown = farelab("revoke", "kiosk-8", "--db", db)
    assert (unknown.returncode, unknown.stderr.strip()) == (
        1,
        "farelab: error: no device 'kiosk-8' in the registry",
    )


def test_bad_registry_input_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'ledger.db'}"
    common = ("--operator", "OP", "--db", db)
    for args, says in (
        (
            ("bus-1", "--role", "validator", "--kinds", "load", "--terminal", "000000000B01"),
            "kinds",
        ),
        (("bus-1", "--role", "validator", "--kinds", "bus", "--terminal", "B01"), "terminal"),
        (("bus-1", "--role", "validator", "--kinds", "bus"), "--terminal"),
    ):
        result = farelab("add", *args, *common)
        assert result.returncode == 2
        assert says in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "ledger.db").exists()


def test_a_device_revoked_stays_revoked_when_its_config_is_registered_again(
    tmp_path: Path,
) -> None:
    """The site's config still lists a stolen validator: adding the config again (a new device
    in it) leaves the revocation; only naming the device reinstates it."""
    config = tmp_path / "devices.toml"
    config.write_text(DEVICES)
    db = f"sqlite:///{tmp_path / 'ledger.db'}"
    assert farelab("add", "--config", str(config), "--db", db).returncode == 0
    assert farelab("revoke", "gate-a", "--db", db).returncode == 0
    again = farelab("add", "--config", str(config), "--db", db)
    assert again.returncode == 0, again.stderr
    assert "left revoked: gate-a" in again.stdout
    listed = {
        d["id"]: d["revoked"] for d in json.loads(farelab("list", "--db", db, "--json").stdout)
    }
    assert listed == {"bus-1": False, "gate-a": True, "gate-b": False}


def test_backend_run_with_devices_does_not_undo_a_revocation(
    broker: Mosquitto, tmp_path: Path
) -> None:
    """``backend run --devices`` registers its configs at every start: a device revoked since
    must not come back with the restart."""
    config = tmp_path / "devices.toml"
    config.write_text(DEVICES)
    db = f"sqlite:///{tmp_path / 'ledger.db'}"
    assert farelab("add", "--config", str(config), "--db", db).returncode == 0
    assert farelab("revoke", "gate-a", "--db", db).returncode == 0
    stop(start_backend(broker, db, devices=config))
    store = Store(db, create=False)
    gate = lookup(store, "gate-a")
    store.close()
    assert gate is not None
    assert gate.revoked
