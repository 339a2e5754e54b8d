"""``farelab card new|show``: the contract testbeds script, and clear errors for bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from farelab._cli import main
from farelab.card import CardType, load_image


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    status = main(list(args))
    out = capsys.readouterr()
    return status, out.out, out.err


def test_card_new_writes_a_personalised_image(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "c.json"
    status, out, _ = run(
        capsys,
        "card",
        "new",
        str(path),
        "--balance",
        "12.34",
        "--alg",
        "sm4",
        "--type",
        "student",
        "--serial",
        "123",
        "--issued",
        "2026-01-01",
        "--expires",
        "2030-06-30",
    )
    assert status == 0
    assert "00000000000000000123" in out
    image = load_image(path)
    assert image.balance == 1234
    assert image.alg.label == "sm4"
    assert image.public.card_type is CardType.STUDENT
    assert str(image.public.expiry) == "2030-06-30"


def test_card_show_json_has_the_contract_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "c.json"
    run(capsys, "card", "new", str(path), "--balance", "5", "--serial", "9")
    status, out, _ = run(capsys, "card", "show", str(path), "--json")
    assert status == 0
    doc = json.loads(out)
    for key in ("serial", "balance_fen", "issuer", "type", "expires", "log", "transit"):
        assert key in doc
    assert doc["balance_fen"] == 500
    assert doc["issuer"] == "1310000000000000"
    assert doc["log"] == []
    assert set(doc["transit"]) == {"metro", "bus"}


def test_card_show_human_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "c.json"
    run(capsys, "card", "new", str(path), "--balance", "5", "--serial", "9")
    status, out, _ = run(capsys, "card", "show", str(path))
    assert status == 0
    assert "balance    5.00 yuan (500 fen)" in out


def test_card_new_refuses_to_overwrite_without_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "c.json"
    run(capsys, "card", "new", str(path), "--balance", "1")
    before = path.read_bytes()
    status, _, err = run(capsys, "card", "new", str(path))
    assert status == 2
    assert "already exists" in err
    assert path.read_bytes() == before
    assert run(capsys, "card", "new", str(path), "--force")[0] == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--balance", "1000.01"], "0 to 1000 yuan"),
        (["--balance", "-1"], "0 to 1000 yuan"),
        (["--balance", "abc"], "not a number"),
        (["--balance", "1_0"], "not a number"),
        (["--balance", "0.001"], "whole number of fen"),
        (["--issuer", "XYZ"], "not hex"),
        (["--issuer", "1310"], "16 hex digits"),
        (["--serial", "12a"], "1 to 20 digits"),
        (["--serial", "1" * 21], "1 to 20 digits"),
        (["--expires", "2026-13-01"], "not a date"),
        (["--issued", "2030-01-01", "--expires", "2029-01-01"], "before the start date"),
    ],
)
def test_card_new_bad_input_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    path = tmp_path / "c.json"
    status, _, err = run(capsys, "card", "new", str(path), *args)
    assert status == 2
    assert message in err
    assert "Traceback" not in err
    assert not path.exists()


def test_card_new_with_a_keys_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys = tmp_path / "keys.toml"
    key = "00112233445566778899AABBCCDDEEFF"
    names = ("purchase", "load", "tac", "maintenance")
    keys.write_text("".join(f'{name} = "{key}"\n' for name in names) + "version = 3\n")
    path = tmp_path / "c.json"
    assert run(capsys, "card", "new", str(path), "--keys", str(keys))[0] == 0
    assert load_image(path).keys.version == 3
    keys.write_text('purchase = "00"\n')
    status, _, err = run(capsys, "card", "new", str(tmp_path / "d.json"), "--keys", str(keys))
    assert status == 2
    assert "must be 16 bytes" in err


def test_card_show_of_a_damaged_image_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "c.json"
    path.write_text('{"format": "farelab-card/1"')
    status, _, err = run(capsys, "card", "show", str(path))
    assert status == 2
    assert "not JSON" in err
    status, _, err = run(capsys, "card", "show", str(tmp_path / "missing.json"))
    assert status == 2
    assert "no such card image" in err


def test_farelab_console_script_help_lists_the_commands() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "farelab", "--help"], capture_output=True, text=True, check=True
    )
    for command in ("demo", "card"):
        assert command in result.stdout
