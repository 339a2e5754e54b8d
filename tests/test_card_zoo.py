"""``farelab card zoo``: the cards, validator.toml and the answer key in manifest.json."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import date, datetime
from pathlib import Path
from typing import Any

import pytest

from farelab._cli import main
from farelab.card import (
    BANK_AID,
    CST,
    SOCIAL_AID,
    TRANSIT_AID,
    CardImage,
    InProcessReader,
    MemoryStore,
    SimulatedCard,
    load_image,
    personalise,
)
from farelab.validator import Journal, load_config, parse_taps, replay, result_json

AT = "2026-03-02T09:30:00+08:00"
ZOOS = {
    "taiyuan-gate": ["--network", "taiyuan", "--station", "Dananmen"],
    "taiyuan-bus": ["--network", "taiyuan", "--bus", "1"],
    "changzhou-gate": ["--network", "changzhou", "--station", "Wenhuagong"],
    "changzhou-bus": ["--network", "changzhou", "--bus", "2"],
}
COMMON_CASES = {
    "balance_zero",
    "balance_one_fen_under_cap",
    "balance_at_cap",
    "expired_yesterday",
    "expiring_today",
    "valid_from_tomorrow",
    "foreign_issuer_whitelisted",
    "foreign_issuer_not_whitelisted",
    "hotlisted",
    "application_blocked",
    "type_student",
    "type_elderly",
    "type_disabled",
    "alg_3des",
    "alg_sm4",
    "torn_last_transaction",
    "counter_exhausted",
    "damaged_ef15",
}


def make_zoo(folder: Path, *args: str) -> dict[str, Any]:
    assert main(["card", "zoo", str(folder), "--at", AT, *args]) == 0
    manifest: dict[str, Any] = json.loads((folder / "manifest.json").read_text())
    return manifest


def replayed(
    folder: Path, manifest: dict[str, Any], at: str | None = None
) -> dict[str, dict[str, Any]]:
    """Each validator card's result in farelab's own replay, configured by validator.toml."""
    config = load_config(folder / "validator.toml")
    at = at or manifest["device"]["at"]
    lines = [
        json.dumps({"device": c["device"], "card": str(folder / c["file"]), "at": at})
        for c in manifest["cards"]
        if c["device"] != "zoo-kiosk"
    ]
    journal = Journal(":memory:")
    try:
        results = list(replay(config, parse_taps(iter(lines), config), journal))
    finally:
        journal.close()
    cards = [c for c in manifest["cards"] if c["device"] != "zoo-kiosk"]
    return {c["case"]: result_json(r) for c, r in zip(cards, results, strict=True)}


@pytest.fixture(scope="module", params=sorted(ZOOS))
def zoo(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    folder = tmp_path_factory.mktemp(request.param)
    return request.param, folder, make_zoo(folder, *ZOOS[request.param])


def by_case(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["case"]: c["expect"] for c in manifest["cards"]}


def test_farelabs_validator_does_what_the_answer_key_says(zoo: Any) -> None:
    _, folder, manifest = zoo
    seen = replayed(folder, manifest)
    for case, expect in by_case(manifest).items():
        if case.startswith("kiosk_"):
            continue
        got = {k: seen[case][k] for k in ("result", "reason", "fare_fen", "balance_fen")}
        assert got == expect, case


def test_manifest_keys(zoo: Any) -> None:
    _, folder, manifest = zoo
    assert set(manifest) == {"network", "device", "cards"}
    for card in manifest["cards"]:
        assert {"file", "serial", "case", "expect"} <= set(card)
        assert set(card["expect"]) == {"result", "reason", "fare_fen", "balance_fen"}
        assert card["expect"]["result"] in ("accepted", "rejected", "loaded")
        assert (folder / card["file"]).is_file()
        assert len(card["serial"]) == 20


def test_every_edge_case_is_there(zoo: Any) -> None:
    name, _, manifest = zoo
    cases = set(by_case(manifest))
    assert cases >= COMMON_CASES
    if name.endswith("gate"):
        assert {
            "balance_one_fen_under_max_fare",
            "balance_at_max_fare",
            "already_entered",
            "exit_without_entry",
            "over_time",
        } <= cases
    else:
        assert {"balance_one_fen_under_fare", "balance_at_fare"} <= cases
    if name.startswith("changzhou"):
        assert "inside_transfer_window" in cases


def test_answer_key_follows_the_rules(zoo: Any) -> None:
    name, _, manifest = zoo
    key = by_case(manifest)
    under = "max_fare" if name.endswith("gate") else "fare"
    assert key[f"balance_one_fen_under_{under}"]["reason"] == "insufficient_balance"
    assert key[f"balance_at_{under}"]["result"] == "accepted"
    if name.endswith("bus"):
        assert key["balance_at_fare"]["balance_fen"] == 0
    for case in ("expired_yesterday", "valid_from_tomorrow"):
        assert key[case]["reason"] == "expired"
    assert key["expiring_today"]["result"] == "accepted"
    assert key["foreign_issuer_whitelisted"]["result"] == "accepted"
    assert key["foreign_issuer_not_whitelisted"]["reason"] == "not_whitelisted"
    assert key["hotlisted"]["reason"] == "hotlisted"
    assert key["application_blocked"]["reason"] == "blocked"
    assert key["torn_last_transaction"]["reason"] == "already_processed"
    assert key["counter_exhausted"]["result"] == "rejected"
    assert key["damaged_ef15"]["reason"] == "card_error"
    if name.endswith("gate"):
        assert key["already_entered"]["reason"] == "entry_while_entered"
        assert key["exit_without_entry"]["reason"] == "exit_without_entry"
        assert key["over_time"]["reason"] == "overtime"


def test_validator_toml_is_the_devices_of_the_manifest(zoo: Any) -> None:
    _, folder, manifest = zoo
    config = load_config(folder / "validator.toml")
    ids = [d["id"] for d in manifest["device"]["devices"]]
    assert [dc.device.id for dc in config.devices] == ids
    for dc in config.devices:
        assert (
            sorted(i.hex().upper() for i in dc.params.whitelist) == manifest["device"]["whitelist"]
        )
        assert sorted(dc.params.hotlist) == manifest["device"]["hotlist"]
    assert {c["device"] for c in manifest["cards"]} <= set(ids)
    assert manifest["device"]["day"] == "2026-03-02"


def test_the_cards_are_issued_for_the_day_the_key_assumes(zoo: Any) -> None:
    _, folder, manifest = zoo
    key = {c["case"]: c for c in manifest["cards"]}
    expired = load_image(folder / key["expired_yesterday"]["file"]).public
    assert expired.expiry.isoformat() == "2026-03-01"
    later = load_image(folder / key["valid_from_tomorrow"]["file"]).public
    assert later.start.isoformat() == "2026-03-03"


def test_kiosk_cards_load_up_to_the_cap_and_no_fen_more(tmp_path: Path) -> None:
    manifest = make_zoo(tmp_path, "--network", "taiyuan", "--bus", "1", "--kiosk")
    key = by_case(manifest)
    assert key["kiosk_most_loadable"] == {
        "result": "loaded",
        "reason": None,
        "fare_fen": 1000,
        "balance_fen": 100_000,
    }
    assert key["kiosk_one_fen_over_cap"]["reason"] == "cap_exceeded"
    assert key["kiosk_one_fen_over_cap"]["fare_fen"] == 1001
    assert key["kiosk_at_cap_one_fen"]["reason"] == "cap_exceeded"
    assert manifest["device"]["kiosk"] is True
    # The validator's cards of a kiosk zoo are still keyed right.
    seen = replayed(tmp_path, manifest)
    for case, expect in key.items():
        if not case.startswith("kiosk_"):
            assert {k: seen[case][k] for k in expect} == expect, case


def test_same_seed_same_zoo_byte_for_byte(tmp_path: Path) -> None:
    args = ["--network", "changzhou", "--station", "Wenhuagong", "--seed", "7"]
    make_zoo(tmp_path / "a", *args)
    make_zoo(tmp_path / "b", *args)
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    other = make_zoo(tmp_path / "c", *args[:-1], "8")
    first = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert [c["serial"] for c in other["cards"]] != [c["serial"] for c in first["cards"]]


def test_cards_carry_the_keys_of_keys_file(tmp_path: Path) -> None:
    keys = tmp_path / "keys.toml"
    keys.write_text(
        'purchase = "00112233445566778899AABBCCDDEEFF"\n'
        'load = "0102030405060708090A0B0C0D0E0F10"\n'
        'tac = "F0E0D0C0B0A090807060504030201000"\n'
        'maintenance = "A1A2A3A4A5A6A7A8A9AAABACADAEAFB0"\n'
    )
    folder = tmp_path / "zoo"
    manifest = make_zoo(folder, "--network", "taiyuan", "--bus", "1", "--keys", str(keys))
    assert 'keys = "' in (folder / "validator.toml").read_text()
    demo = make_zoo(tmp_path / "demo", "--network", "taiyuan", "--bus", "1")
    ours = load_image(folder / manifest["cards"][0]["file"]).keys
    theirs = load_image(tmp_path / "demo" / demo["cards"][0]["file"]).keys
    assert ours.dpk != theirs.dpk
    seen = replayed(folder, manifest)
    for case, expect in by_case(manifest).items():
        assert {k: seen[case][k] for k in expect} == expect, case


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--network", "atlantis", "--bus", "2"], "--network 'atlantis' is not a shipped network"),
        (["--network", "nanjing", "--station", "Xinjiekou"], "ships no stations"),
        (["--network", "taiyuan", "--station", "Atlantis"], "no station 'Atlantis'"),
        (["--network", "taiyuan", "--bus", "abc"], "--bus"),
        (["--network", "taiyuan", "--bus", "0"], "the bus fare must be more than 0"),
        (["--network", "taiyuan", "--bus", "1", "--at", "2026-03-02T09:30"], "no UTC offset"),
        (["--network", "taiyuan", "--bus", "1", "--at", "noon"], "not an ISO-8601 time"),
        (["--network", "taiyuan", "--bus", "1", "--keys", "/nonexistent/k.toml"], "k.toml"),
    ],
)
def test_bad_arguments_are_clean_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    assert main(["card", "zoo", str(tmp_path / "zoo"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("farelab: error: ")
    assert message in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "args",
    [
        ["--network", "taiyuan"],
        ["--network", "taiyuan", "--bus", "1", "--station", "Dananmen"],
        ["--bus", "1"],
        ["--network", "taiyuan", "--bus", "1", "--seed", "x"],
    ],
)
def test_argument_shape_is_checked(tmp_path: Path, args: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["card", "zoo", str(tmp_path / "zoo"), *args])
    assert exc.value.code == 2


def test_a_folder_that_holds_a_zoo_is_not_overwritten(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_zoo(tmp_path, "--network", "taiyuan", "--bus", "1")
    before = (tmp_path / "manifest.json").read_bytes()
    assert main(["card", "zoo", str(tmp_path), "--network", "taiyuan", "--bus", "2"]) == 2
    assert "already holds a zoo" in capsys.readouterr().err
    assert (tmp_path / "manifest.json").read_bytes() == before


def test_default_moment_is_now_in_china_time(tmp_path: Path) -> None:
    assert main(["card", "zoo", str(tmp_path), "--network", "taiyuan", "--bus", "1"]) == 0
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    at = datetime.fromisoformat(manifest["device"]["at"])
    assert at.utcoffset() == CST.utcoffset(None)


def test_the_answer_key_holds_until_valid_until(zoo: Any, tmp_path: Path) -> None:
    name, _, _ = zoo
    manifest = make_zoo(tmp_path, *ZOOS[name])
    until = manifest["device"]["valid_until"]
    assert datetime.fromisoformat(until) > datetime.fromisoformat(AT)
    seen = replayed(tmp_path, manifest, at=until)
    for case, expect in by_case(manifest).items():
        if not case.startswith("kiosk_"):
            assert {k: seen[case][k] for k in expect} == expect, case


def test_the_torn_card_comes_first(zoo: Any) -> None:
    _, _, manifest = zoo
    assert manifest["cards"][0]["case"] == "torn_last_transaction"


def test_card_show_reads_the_damaged_ef15_card(
    zoo: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    _, folder, manifest = zoo
    card = next(c for c in manifest["cards"] if c["case"] == "damaged_ef15")
    capsys.readouterr()
    assert main(["card", "show", "--json", str(folder / card["file"])]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["serial"] == card["serial"]
    assert doc["start"] is None
    assert doc["ef15"].endswith("FF" * 10)
    assert main(["card", "show", str(folder / card["file"])]) == 0
    assert card["serial"] in capsys.readouterr().out


def test_farelabs_kiosk_does_what_the_answer_key_says(tmp_path: Path) -> None:
    manifest = make_zoo(tmp_path / "zoo", "--network", "taiyuan", "--bus", "1", "--kiosk")
    kiosk = [c for c in manifest["cards"] if c["device"] == "zoo-kiosk"]
    assert len(kiosk) == 3
    for card in kiosk:
        expect = card["expect"]
        amount = f"{expect['fare_fen'] // 100}.{expect['fare_fen'] % 100:02d}"
        path = tmp_path / "zoo" / card["file"]
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "farelab",
                "topup",
                "load",
                str(path),
                "--amount",
                amount,
                "--json",
            ],
            cwd=tmp_path,
            env={**os.environ, "XDG_DATA_HOME": str(tmp_path / "data")},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        seen = json.loads(done.stdout)
        # The manifest's words are the interface's: the kiosk's "refused" is "rejected".
        result = {"refused": "rejected"}.get(seen["result"], seen["result"])
        assert result == expect["result"], (card["case"], done.stderr)
        assert seen["reason"] == expect["reason"], card["case"]
        assert load_image(path).balance == expect["balance_fen"]


# --- a card with only the bank and social-security applications ----------------------------


def test_a_card_with_only_bank_and_social_security_is_refused_as_a_card_error(zoo: Any) -> None:
    _, folder, manifest = zoo
    card = next(c for c in manifest["cards"] if c["case"] == "bank_and_social_only")
    assert card["expect"] == {
        "result": "rejected",
        "reason": "card_error",
        "fare_fen": 0,
        "balance_fen": None,
    }
    image = load_image(folder / card["file"])
    assert image.transit is False
    assert json.loads((folder / card["file"]).read_text())["transit"] is False


def test_a_card_without_the_transit_application_does_not_find_it_but_finds_the_others() -> None:
    def select(aid: bytes) -> bytes:
        return bytes((0x00, 0xA4, 0x04, 0x00, len(aid))) + aid + b"\x00"

    image = personalise(serial="77", issued=date(2026, 1, 1), transit=False)
    reader = InProcessReader()
    reader.insert(SimulatedCard(image, store=MemoryStore(), entropy=bytes))
    reader.connect()
    assert reader.transmit(select(TRANSIT_AID)) == b"\x6a\x82"
    assert reader.transmit(select(SOCIAL_AID))[-2:] == b"\x90\x00"
    assert reader.transmit(select(BANK_AID))[-2:] == b"\x90\x00"
    ppse = reader.transmit(select(b"2PAY.SYS.DDF01"))
    assert ppse[-2:] == b"\x90\x00"
    assert SOCIAL_AID in ppse
    assert BANK_AID in ppse
    assert TRANSIT_AID not in ppse


def test_the_transit_flag_is_written_only_for_a_card_without_it() -> None:
    plain = personalise(serial="77", issued=date(2026, 1, 1))
    assert "transit" not in plain.to_json()
    without = personalise(serial="77", issued=date(2026, 1, 1), transit=False)
    assert CardImage.from_json(without.to_json()) == without
    assert CardImage.from_json(plain.to_json()).transit is True
