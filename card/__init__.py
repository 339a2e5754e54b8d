"""The simulated T-Union card and both ends of its protocol.

- The card: :func:`personalise` issues a :class:`CardImage`; :func:`process` is the card's
  operating system as a pure function; :class:`SimulatedCard` wraps it with a store and presents
  it to a transport.
- The terminal end: :class:`ReadCard`, :class:`Purchase`, :class:`Load`,
  :class:`TransactionProof`, :class:`BlockApplication`, :class:`PinReset` are sans-IO flows;
  :class:`Psam` holds the purchase and maintenance keys.
- The host end: :class:`LoadAuthority` (load keys), :class:`TacVerifier` (TAC keys).
- Transports behind :class:`Reader`: :class:`InProcessReader`; :class:`ViccClient` presents a
  card to a vpcd virtual reader (:func:`vicc_serve`, :func:`vicc_tap`); :class:`PcscReader` reads
  any PC/SC reader and :func:`running_pcscd` starts a pcscd for tests (these two load pyscard);
  :class:`RelayCard` and :func:`relay` present a card in any reader to vpcd.
- Fault injection for testing other people's terminals: a :class:`Behaviour` file's rules, acted
  out by :class:`BehavingCard` around any card.
- Helpers every part shares: money in yuan and fen (:func:`yuan_to_fen`, :func:`fen_to_yuan`),
  China Standard Time (:data:`CST`), 20-digit serials (:func:`full_serial`), the crash-test
  hook :func:`checkpoint`, and :func:`describe_path` / :func:`shown` for error messages.
- APDU traces: :class:`TracingReader` and :class:`TracingEndpoint` write each exchange to a
  :class:`TraceWriter` as a JSON line; :func:`read_trace`, :func:`decode_apdu`,
  :func:`sw_meaning`, :func:`find_tears` and :func:`format_trace` read it back as an analyser
  would; :class:`TraceCard` answers a terminal from a recording.

Each name is imported from its module when first asked for, so that a command loads only the
parts it uses (reading a card image needs neither the cipher library nor the applet).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from farelab.card._apdu import (
        SW,
        ApduFormatError,
        Command,
        Response,
        parse_command,
        parse_response,
    )
    from farelab.card._applet import (
        BANK_AID,
        PPSE_NAME,
        PSE_NAME,
        SOCIAL_AID,
        TRANSIT_AID,
        App,
        Outcome,
        Session,
        card_uid,
        is_weak_pin,
        maintenance_mac,
        process,
    )
    from farelab.card._behaviour import ACTIONS as BEHAVIOUR_ACTIONS
    from farelab.card._behaviour import COMMANDS as BEHAVIOUR_COMMANDS
    from farelab.card._behaviour import (
        BehavingCard,
        Behaviour,
        BehaviourError,
        BehaviourState,
        CardLeftError,
        CardMutedError,
        FieldFaultError,
        Firing,
        command_name,
    )
    from farelab.card._crypto import Alg, diversify, mac, session_key, tac_key
    from farelab.card._faults import checkpoint
    from farelab.card._files import (
        CST,
        BusRecord,
        CardType,
        Industry,
        LogRecord,
        MetroRecord,
        MetroStatus,
        PublicInfo,
        TripRecord,
        TxType,
        bcd_date,
        bcd_datetime,
        bcd_time,
        full_serial,
        parse_bcd_date,
    )
    from farelab.card._host import LoadAuthority, LoadAuthorization, LoadRefusal, TacVerifier
    from farelab.card._image import (
        CardBusyError,
        CardImage,
        ImageError,
        ImageLock,
        Proof,
        SocialSecurity,
        load_image,
        save_image,
    )
    from farelab.card._inproc import InProcessReader, step_of
    from farelab.card._keys import (
        DEMO_ISSUER_ID,
        DEMO_KEYS,
        CardKeys,
        IssuerKeys,
        KeysFileError,
        card_keys,
        diversify_card_key,
        load_keys_file,
    )
    from farelab.card._messages import describe_path, shown
    from farelab.card._money import fen_to_yuan, yuan_to_fen
    from farelab.card._pcsc import PcscReader, ReaderThread, list_readers
    from farelab.card._pcscd import VIRTUAL_READER, PcscdError, running_pcscd
    from farelab.card._personalise import personalise
    from farelab.card._psam import Psam, PsamError, PsamKeys, PurchaseTicket
    from farelab.card._reader import (
        CardEndpoint,
        CardRemovedError,
        Reader,
        ReaderError,
        ReaderUnavailableError,
    )
    from farelab.card._relay import RelayCard, relay
    from farelab.card._simcard import ATR, FileStore, ImageStore, MemoryStore, SimulatedCard
    from farelab.card._terminal import (
        BlockApplication,
        CappUpdate,
        CardSnapshot,
        FlowError,
        InFlight,
        InitInfo,
        Load,
        LoadDone,
        LoadRequest,
        NeedAuthorization,
        PinReset,
        PinResetDone,
        ProofFound,
        ProofMissing,
        Purchase,
        PurchaseDone,
        ReadCard,
        Refused,
        Step,
        TransactionProof,
        Transmit,
        drive,
        now_fields,
    )
    from farelab.card._trace import (
        MISMATCH_SW,
        Decoded,
        Exchange,
        TraceCard,
        TraceError,
        TraceEvent,
        TraceWriter,
        TracingEndpoint,
        TracingReader,
        decode_apdu,
        find_tears,
        format_exchange,
        format_trace,
        read_trace,
        sw_meaning,
    )
    from farelab.card._vicc import DEFAULT_PORT as VICC_PORT
    from farelab.card._vicc import ViccClient, ViccError
    from farelab.card._vicc import serve as vicc_serve
    from farelab.card._vicc import tap as vicc_tap

__all__ = [
    "ATR",
    "BANK_AID",
    "BEHAVIOUR_ACTIONS",
    "BEHAVIOUR_COMMANDS",
    "CST",
    "DEMO_ISSUER_ID",
    "DEMO_KEYS",
    "MISMATCH_SW",
    "PPSE_NAME",
    "PSE_NAME",
    "SOCIAL_AID",
    "SW",
    "TRANSIT_AID",
    "VICC_PORT",
    "VIRTUAL_READER",
    "Alg",
    "ApduFormatError",
    "App",
    "BehavingCard",
    "Behaviour",
    "BehaviourError",
    "BehaviourState",
    "BlockApplication",
    "BusRecord",
    "CappUpdate",
    "CardBusyError",
    "CardEndpoint",
    "CardImage",
    "CardKeys",
    "CardLeftError",
    "CardMutedError",
    "CardRemovedError",
    "CardSnapshot",
    "CardType",
    "Command",
    "Decoded",
    "Exchange",
    "FieldFaultError",
    "FileStore",
    "Firing",
    "FlowError",
    "ImageError",
    "ImageLock",
    "ImageStore",
    "InFlight",
    "InProcessReader",
    "Industry",
    "InitInfo",
    "IssuerKeys",
    "KeysFileError",
    "Load",
    "LoadAuthority",
    "LoadAuthorization",
    "LoadDone",
    "LoadRefusal",
    "LoadRequest",
    "LogRecord",
    "MemoryStore",
    "MetroRecord",
    "MetroStatus",
    "NeedAuthorization",
    "Outcome",
    "PcscReader",
    "PcscdError",
    "PinReset",
    "PinResetDone",
    "Proof",
    "ProofFound",
    "ProofMissing",
    "Psam",
    "PsamError",
    "PsamKeys",
    "PublicInfo",
    "Purchase",
    "PurchaseDone",
    "PurchaseTicket",
    "ReadCard",
    "Reader",
    "ReaderError",
    "ReaderThread",
    "ReaderUnavailableError",
    "Refused",
    "RelayCard",
    "Response",
    "Session",
    "SimulatedCard",
    "SocialSecurity",
    "Step",
    "TacVerifier",
    "TraceCard",
    "TraceError",
    "TraceEvent",
    "TraceWriter",
    "TracingEndpoint",
    "TracingReader",
    "TransactionProof",
    "Transmit",
    "TripRecord",
    "TxType",
    "ViccClient",
    "ViccError",
    "bcd_date",
    "bcd_datetime",
    "bcd_time",
    "card_keys",
    "card_uid",
    "checkpoint",
    "command_name",
    "decode_apdu",
    "describe_path",
    "diversify",
    "diversify_card_key",
    "drive",
    "fen_to_yuan",
    "find_tears",
    "format_exchange",
    "format_trace",
    "full_serial",
    "is_weak_pin",
    "list_readers",
    "load_image",
    "load_keys_file",
    "mac",
    "maintenance_mac",
    "now_fields",
    "parse_bcd_date",
    "parse_command",
    "parse_response",
    "personalise",
    "process",
    "read_trace",
    "relay",
    "running_pcscd",
    "save_image",
    "session_key",
    "shown",
    "step_of",
    "sw_meaning",
    "tac_key",
    "vicc_serve",
    "vicc_tap",
    "yuan_to_fen",
]

# Each public name's module, imported when the name is first asked for (the imports above are
# for type checkers): ``farelab card show`` loads the image and its files, and none of the applet,
# the terminal flows, the readers, the fault injection or pyscard.
_MODULES: dict[str, str] = {
    "_apdu": "SW ApduFormatError Command Response parse_command parse_response",
    "_applet": (
        "BANK_AID PPSE_NAME PSE_NAME SOCIAL_AID TRANSIT_AID App Outcome Session card_uid "
        "is_weak_pin maintenance_mac process"
    ),
    "_behaviour": (
        "BehavingCard Behaviour BehaviourError BehaviourState CardLeftError CardMutedError "
        "FieldFaultError Firing command_name"
    ),
    "_crypto": "Alg diversify mac session_key tac_key",
    "_faults": "checkpoint",
    "_files": (
        "CST BusRecord CardType Industry LogRecord MetroRecord MetroStatus PublicInfo TripRecord "
        "TxType bcd_date bcd_datetime bcd_time full_serial parse_bcd_date"
    ),
    "_host": "LoadAuthority LoadAuthorization LoadRefusal TacVerifier",
    "_image": (
        "CardBusyError CardImage ImageError ImageLock Proof SocialSecurity load_image save_image"
    ),
    "_inproc": "InProcessReader step_of",
    "_keys": (
        "DEMO_ISSUER_ID DEMO_KEYS CardKeys IssuerKeys KeysFileError card_keys diversify_card_key "
        "load_keys_file"
    ),
    "_messages": "describe_path shown",
    "_money": "fen_to_yuan yuan_to_fen",
    "_personalise": "personalise",
    "_psam": "Psam PsamError PsamKeys PurchaseTicket",
    "_reader": "CardEndpoint CardRemovedError Reader ReaderError ReaderUnavailableError",
    "_relay": "RelayCard relay",
    "_simcard": "ATR FileStore ImageStore MemoryStore SimulatedCard",
    "_terminal": (
        "BlockApplication CappUpdate CardSnapshot FlowError InFlight InitInfo Load LoadDone "
        "LoadRequest NeedAuthorization PinReset PinResetDone ProofFound ProofMissing Purchase "
        "PurchaseDone ReadCard Refused Step TransactionProof Transmit drive now_fields"
    ),
    "_trace": (
        "MISMATCH_SW Decoded Exchange TraceCard TraceError TraceEvent TraceWriter TracingEndpoint "
        "TracingReader decode_apdu find_tears format_exchange format_trace read_trace sw_meaning"
    ),
    "_vicc": "ViccClient ViccError",
    "_pcsc": "PcscReader ReaderThread list_readers",
    "_pcscd": "VIRTUAL_READER PcscdError running_pcscd",
}
_RENAMED: dict[str, tuple[str, str]] = {
    "BEHAVIOUR_ACTIONS": ("_behaviour", "ACTIONS"),
    "BEHAVIOUR_COMMANDS": ("_behaviour", "COMMANDS"),
    "VICC_PORT": ("_vicc", "DEFAULT_PORT"),
    "vicc_serve": ("_vicc", "serve"),
    "vicc_tap": ("_vicc", "tap"),
}
_HOMES: dict[str, tuple[str, str]] = {
    name: (module, name) for module, names in _MODULES.items() for name in names.split()
} | _RENAMED


def __getattr__(name: str) -> Any:
    """A public name, from its module (imported on first use)."""
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attr = home
    value = getattr(importlib.import_module(f"{__name__}.{module}"), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The public names, loaded or not."""
    return sorted(set(globals()) | set(__all__))
