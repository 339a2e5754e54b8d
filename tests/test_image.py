"""Card images: JSON round trip, clear errors for bad files, atomic replacement."""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path

import pytest

from farelab.card import (
    Alg,
    CardType,
    ImageError,
    SimulatedCard,
    load_image,
    personalise,
    save_image,
)


def _image(alg: Alg = Alg.TDES) -> object:
    return personalise(
        serial="42", issued=date(2026, 1, 1), balance=1234, alg=alg, card_type=CardType.ELDERLY
    )


@pytest.mark.parametrize("alg", [Alg.TDES, Alg.SM4])
def test_image_round_trips_through_a_file(tmp_path: Path, alg: Alg) -> None:
    image = personalise(serial="42", issued=date(2026, 1, 1), balance=1234, alg=alg)
    path = tmp_path / "c.json"
    save_image(path, image)
    assert load_image(path) == image


def test_save_leaves_no_temporary_files(tmp_path: Path) -> None:
    image = personalise(serial="42", issued=date(2026, 1, 1))
    path = tmp_path / "c.json"
    for _ in range(3):
        save_image(path, image)
    assert [p.name for p in tmp_path.iterdir()] == ["c.json"]


def test_default_expiry_is_ten_years_R9() -> None:
    image = personalise(serial="1", issued=date(2024, 2, 29))
    assert image.public.expiry == date(2034, 2, 28)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.pop("balance"), "'balance' is missing"),
        (lambda d: d.update(balance=-1), "'balance' must be an integer"),
        (lambda d: d.update(alg="des"), "field 'alg'"),
        (lambda d: d["keys"].update(dpk="00"), "'keys.dpk' must be 16 bytes"),
        (lambda d: d.update(log=["zz"]), "'log[0]'"),
        (lambda d: d.update(format="other"), "not a farelab card image"),
    ],
)
def test_bad_image_fields_are_named(tmp_path: Path, mutate: object, message: str) -> None:
    path = tmp_path / "c.json"
    save_image(path, personalise(serial="7", issued=date(2026, 1, 1)))
    doc = json.loads(path.read_text())
    mutate(doc)  # type: ignore[operator]
    path.write_text(json.dumps(doc))
    with pytest.raises(ImageError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_image(path)


def test_truncated_or_missing_image_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    save_image(path, personalise(serial="7", issued=date(2026, 1, 1)))
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ImageError, match="not JSON"):
        load_image(path)
    with pytest.raises(ImageError, match="no such card image"):
        load_image(tmp_path / "absent.json")


def test_simulated_card_writes_commits_back_to_its_file(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    save_image(path, personalise(serial="7", issued=date(2026, 1, 1), balance=500))
    sim = SimulatedCard.from_file(path)
    sim.power_on()
    sim.transmit(bytes.fromhex("00A4040008A000000632010105"))
    # a refused command (overdraft) commits nothing: the file is untouched
    before = path.read_bytes()
    answer = sim.transmit(bytes.fromhex("805001020B01000003E8001122334455"))
    assert answer[-2:] == b"\x94\x01"
    assert path.read_bytes() == before


def test_replace_changes_only_the_named_fields_and_refuses_unknown_ones() -> None:
    import dataclasses  # noqa: PLC0415

    image = personalise(serial="42", issued=date(2026, 1, 1), balance=1234)
    changed = image.replace(balance=99, offline_counter=7)
    assert changed == dataclasses.replace(image, balance=99, offline_counter=7)
    assert (changed.balance, changed.offline_counter, image.balance) == (99, 7, 1234)
    assert image.replace() == image
    assert hash(image.replace()) == hash(image)
    with pytest.raises(TypeError, match="no field nope"):
        image.replace(balance=1, nope=2)


def test_a_held_card_reads_its_image_as_a_reader_does(tmp_path: Path) -> None:
    image = personalise(serial="42", issued=date(2026, 1, 1), balance=1234)
    path = tmp_path / "c.json"
    save_image(path, image)
    assert load_image(path, held=True) == load_image(path) == image
    with pytest.raises(ImageError, match="no such card image"):
        load_image(tmp_path / "gone.json", held=True)
