"""The top-up kiosk: host-authorized loads under the 1000-yuan cap, transfers of a replaced card's
balance (R6) and cash refunds, safe against a pulled card or a killed kiosk.

- The session: :class:`LoadSession` is one card at the kiosk as a sans-IO state machine — it
  reads the card once, settles what an earlier session left torn, then does its action
  (:class:`Present`, :class:`TopUp`, :class:`Transfer`, :class:`Refund`).  It emits
  :class:`farelab.card.Transmit`, :class:`HostCall`, :class:`Intent` and :class:`StatusChange`
  (the :data:`Event` union) and ends in a :class:`LoadResult` or a :class:`CardView`.
- The shell: :class:`Kiosk` drives sessions over a reader (through a :data:`Run`), a
  :class:`Host` and a :class:`KioskJournal`; :func:`terminal_for` is the terminal id
  ``farelab topup`` gives a kiosk; :data:`KILL_POINTS` are its crash-test points.
- Hosts: :class:`Host` is what a host looks like (:class:`MqttHost`: the backend over MQTT);
  silence is :class:`HostUnreachableError`.
- The journal: :class:`KioskJournal` (:class:`KioskJournalError` for a file that is not one)
  and its unsettled rows, :class:`PendingLoad`.
- Amounts: :class:`AmountRules`, :func:`check_amount`, :func:`parse_amount`, :func:`room`.
"""

from farelab.topup._host import Host, HostUnreachableError, MqttHost, host_closed_after
from farelab.topup._journal import KioskJournal, KioskJournalError, PendingLoad
from farelab.topup._rules import AmountRules, check_amount, parse_amount, room
from farelab.topup._session import (
    Action,
    CardView,
    Event,
    HostCall,
    Intent,
    LoadResult,
    LoadSession,
    Present,
    Refund,
    StatusChange,
    TopUp,
    Transfer,
    new_request_id,
)
from farelab.topup._station import KILL_POINTS, Kiosk, Run, terminal_for

__all__ = [
    "KILL_POINTS",
    "Action",
    "AmountRules",
    "CardView",
    "Event",
    "Host",
    "HostCall",
    "HostUnreachableError",
    "Intent",
    "Kiosk",
    "KioskJournal",
    "KioskJournalError",
    "LoadResult",
    "LoadSession",
    "MqttHost",
    "PendingLoad",
    "Present",
    "Refund",
    "Run",
    "StatusChange",
    "TopUp",
    "Transfer",
    "check_amount",
    "host_closed_after",
    "new_request_id",
    "parse_amount",
    "room",
    "terminal_for",
]
