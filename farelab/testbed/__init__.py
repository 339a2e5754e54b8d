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

See docs/testbed.md.
"""

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
    "FOREIGN_LISTED",
    "FOREIGN_UNLISTED",
    "KIOSK",
    "Expect",
    "Zoo",
    "ZooCard",
    "ZooError",
    "answer",
    "build_zoo",
    "parse_moment",
    "write_zoo",
]
