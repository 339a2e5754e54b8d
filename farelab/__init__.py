"""farelab: an open, testable simulator of contactless transit fare collection on China's
T-Union cards: the card, the bus and metro validators, the top-up kiosk and the clearing backend.

The packages, from the bottom layer up (each names its public API in its ``__init__``):

- :mod:`farelab.card`: the simulated card and both ends of its protocol (APDUs, files, keys,
  MAC and TAC), the readers it is presented through.
- :mod:`farelab.protocol`: the contract between devices and backend: records, batches and acks
  on the wire, topics, parameter and load-authorization messages, the files' marks.
- :mod:`farelab.validator`, :mod:`farelab.topup`, :mod:`farelab.backend`: the validators, the
  kiosk and the clearing backend, each a sans-IO core in a thin asyncio shell; none imports
  another.
- :mod:`farelab.testbed`: scoring terminals farelab did not write (the card zoo and its answer
  key, the conformance run), built on the layers below.
- :mod:`farelab.bench`: the benchmarks.  The ``farelab`` command is ``farelab._cli``.

Docstrings cite the rules of the source documents by their ids in docs/rules.md (R1–R13) and the
card protocol by its sections in docs/card-protocol.md (B1–B6).
"""

__version__ = "0.1.0"
