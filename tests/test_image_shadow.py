"""A card's commit without creating a file: the next image is written into the card's shadow
file and swapped with the image; readers never see a rewrite half done."""

from __future__ import annotations

import errno
import fcntl
import os
import threading
from datetime import date
from pathlib import Path

import pytest

from farelab.card import ImageError, load_image, personalise, save_image
from farelab.card import _image as image_mod
from farelab.card._image import exchange_image_file, shadow_path
from farelab.card._simcard import FileStore


def _card(path: Path, balance: int = 5000) -> Path:
    save_image(path, personalise(serial="808", issued=date(2026, 1, 1), balance=balance))
    return path


def _commit(path: Path, balance: int) -> None:
    store = FileStore(path, durable=False)
    image = store.take()
    try:
        store.save(image.replace(balance=balance))
    finally:
        store.release()


def test_commits_swap_two_files_and_create_none(tmp_path: Path) -> None:
    card = _card(tmp_path / "c.json")
    _commit(card, 4000)  # the first commit makes the shadow
    files = {card.stat().st_ino, shadow_path(card).stat().st_ino}
    for balance in (3000, 2000, 1000):
        _commit(card, balance)
        assert {card.stat().st_ino, shadow_path(card).stat().st_ino} == files
        assert load_image(card).balance == balance
        # the shadow holds the image before this commit
        assert load_image(shadow_path(card)).balance == balance + 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".c.json.lock",
        ".c.json.shadow",
        "c.json",
    ]


def test_a_torn_shadow_from_a_killed_writer_harms_nothing(tmp_path: Path) -> None:
    """A writer killed while it rewrote the shadow leaves the image as it was; the next
    commit rewrites the shadow whole (shorter or longer than what is there)."""
    card = _card(tmp_path / "c.json")
    _commit(card, 4000)
    shadow_path(card).write_bytes(b'{"version":1,"bal' + b"x" * 10_000)
    assert load_image(card).balance == 4000
    _commit(card, 3000)
    assert load_image(card).balance == 3000
    shadow_path(card).write_bytes(b"{")
    _commit(card, 2500)
    assert load_image(card).balance == 2500


def test_a_reader_of_the_old_image_is_never_rewritten_under(tmp_path: Path) -> None:
    """A reader that opened the image a commit ago holds the file that is now the shadow: the
    next commit must not rewrite it under that reader, and writes a new file instead."""
    card = _card(tmp_path / "c.json")
    _commit(card, 4000)
    fd = os.open(card, os.O_RDONLY)  # the reader opens the image...
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        _commit(card, 3000)  # ...which becomes the shadow
        _commit(card, 2000)  # the shadow is being read: a new file this time
        assert load_image(card).balance == 2000
        assert os.pread(fd, 1 << 16, 0) == shadow_path(card).read_bytes()
        assert image_mod.load_image(shadow_path(card)).balance == 4000  # untouched
    finally:
        os.close(fd)
    _commit(card, 1000)  # and swapped again once it is free
    assert load_image(card).balance == 1000


def test_a_read_waits_for_a_rewrite_under_way(tmp_path: Path) -> None:
    card = _card(tmp_path / "c.json")
    fd = os.open(card, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as a writer rewriting this file holds it
    got: list[int] = []
    reader = threading.Thread(target=lambda: got.append(load_image(card).balance))
    reader.start()
    reader.join(0.3)
    assert reader.is_alive()  # waiting for the writer
    os.close(fd)
    reader.join(5)
    assert got == [5000]


def test_a_read_does_not_wait_forever_for_a_stopped_writer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    card = _card(tmp_path / "c.json")
    monkeypatch.setattr(image_mod, "SHARED_READ_WAIT_S", 0.05)
    fd = os.open(card, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert load_image(card).balance == 5000  # read anyway: the file is whole
    finally:
        os.close(fd)


def test_a_file_system_that_cannot_swap_is_written_as_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    card = _card(tmp_path / "c.json")

    def cannot(*args: object) -> int:
        return -1

    monkeypatch.setattr(image_mod, "_renameat2", lambda: (cannot, lambda: errno.EINVAL))
    assert exchange_image_file(card, b"{}", durable=False) == "unsupported"
    assert load_image(card).balance == 5000
    store = FileStore(card, durable=False)
    image = store.take()
    store.save(image.replace(balance=100))
    store.save(image.replace(balance=50))
    store.release()
    assert load_image(card).balance == 50
    monkeypatch.setattr(image_mod, "_renameat2", lambda: (cannot, lambda: errno.EIO))
    with pytest.raises(ImageError, match="cannot write card image: Input/output error"):
        exchange_image_file(card, b"{}", durable=False)
    assert load_image(card).balance == 50


def test_a_card_image_removed_meanwhile_is_written_anew(tmp_path: Path) -> None:
    card = _card(tmp_path / "c.json")
    store = FileStore(card, durable=False)
    image = store.take()
    card.unlink()
    store.save(image.replace(balance=10))
    store.release()
    assert load_image(card).balance == 10
