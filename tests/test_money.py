"""Money is integer fen inside, yuan only at the edges."""

from __future__ import annotations

import pytest

from farelab.card._money import fen_to_yuan, yuan_to_fen


@pytest.mark.parametrize(
    ("text", "fen"), [("0", 0), ("10", 1000), ("2.5", 250), ("0.01", 1), ("1000.00", 100_000)]
)
def test_yuan_to_fen(text: str, fen: int) -> None:
    assert yuan_to_fen(text) == fen


@pytest.mark.parametrize(
    "text",
    [
        "abc",
        "",
        "1e3",
        "nan",
        "inf",
        "0.001",
        "1.005",
        "1_0",
        "+5",
        ".5",
        "5.",
        "١٠",
        "1 0",
        "0x10",
    ],
)
def test_yuan_to_fen_refuses_what_is_not_whole_fen(text: str) -> None:
    with pytest.raises(ValueError, match="amount"):
        yuan_to_fen(text)


def test_fen_to_yuan() -> None:
    assert [fen_to_yuan(x) for x in (0, 1, 250, 100_000, -5)] == [
        "0.00",
        "0.01",
        "2.50",
        "1000.00",
        "-0.05",
    ]
