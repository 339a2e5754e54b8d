"""The testbed for terminals farelab did not write: the parts that need the devices' own rules
to say what a correct terminal does.

- The card zoo: :func:`build_zoo` issues a :class:`Zoo` of :class:`ZooCard` — a card image per
  edge state a gate, a bus validator or a kiosk must get right, their history made by farelab's
  own taps — for the devices it describes; :func:`write_zoo` writes the images,
  ``validator.toml`` and ``manifest.json``, whose answer key (an :class:`Expect` per card) is
  :func:`answer`: what farelab's validator, configured from that ``validator.toml``, decides.
  :func:`parse_moment` reads the moment a zoo assumes; :class:`ZooError` for arguments that do
  not fit the network.  The foreign issuers it uses are :data:`FOREIGN_LISTED` and
  :data:`FOREIGN_UNLISTED`.
- The conformance run: :func:`load_manifest` reads a zoo (:class:`ZooManifest` of
  :class:`ZooEntry`), :func:`select_cards` picks the cards to present, :func:`run_zoo` presents
  each in a vpcd slot (:func:`present`, :func:`vpcd_port`) to a terminal under test and
  :func:`judge` compares the card's end state with the answer key: a :class:`CardResult` with
  what the card showed (:class:`Seen`) and how its presentation went (:class:`Presence`);
  :func:`describe_expect` words an expectation; :class:`RunError` for a zoo or reader the run
  cannot use.
- The card's own conformance: :func:`check_card` puts farelab's terminal's questions to a card
  in a reader — read-only, or with :class:`DebitKeys` one fen bought and its TAC checked — and
  returns a :class:`CardReport` of :class:`Check`; :class:`CardCheckError` when the card cannot be
  checked.  The purchase names :data:`CHECK_TERMINAL`.

See docs/testbed.md.
"""

from farelab.testbed._cardcheck import (
    CHECK_TERMINAL,
    CardCheckError,
    CardReport,
    Check,
    DebitKeys,
    check_card,
)
from farelab.testbed._run import (
    VPCD_BASE_PORT,
    CardResult,
    Presence,
    RunError,
    Seen,
    ZooEntry,
    ZooManifest,
    describe_expect,
    judge,
    load_manifest,
    present,
    run_zoo,
    select_cards,
    vpcd_port,
)
from farelab.testbed._zoo import (
    FOREIGN_LISTED,
    FOREIGN_UNLISTED,
    KIOSK,
    Expect,
    Zoo,
    ZooCard,
    ZooError,
    answer,
    build_zoo,
    parse_moment,
    write_zoo,
)

__all__ = [
    "CHECK_TERMINAL",
    "FOREIGN_LISTED",
    "FOREIGN_UNLISTED",
    "KIOSK",
    "VPCD_BASE_PORT",
    "CardCheckError",
    "CardReport",
    "CardResult",
    "Check",
    "DebitKeys",
    "Expect",
    "Presence",
    "RunError",
    "Seen",
    "Zoo",
    "ZooCard",
    "ZooEntry",
    "ZooError",
    "ZooManifest",
    "answer",
    "build_zoo",
    "check_card",
    "describe_expect",
    "judge",
    "load_manifest",
    "parse_moment",
    "present",
    "run_zoo",
    "select_cards",
    "vpcd_port",
    "write_zoo",
]
