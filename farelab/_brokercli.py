"""``farelab backend broker-config``: the broker's accounts and roles, written from the device
registry as a ready Mosquitto configuration."""

from __future__ import annotations

import argparse
import os
import secrets
from pathlib import Path

from farelab._errors import CliError
from farelab.backend import (
    BACKEND_ACCOUNT,
    DEFAULT_GROUP,
    FORMATS,
    Store,
    StoreError,
    find_dynsec_plugin,
    write_broker_config,
)

__all__ = ["add_parser"]

SECRET_VARIABLE = "FARELAB_BACKEND_PASSWORD"  # noqa: S105 (a variable's name)
_SECRET_FILE = "backend.password"  # noqa: S105 (a file name)


def add_parser(cmds: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``broker-config`` under ``farelab backend``."""
    cfg = cmds.add_parser(
        "broker-config",
        help="write the broker's configuration (accounts and roles) from the device registry",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=f"""\
Write a Mosquitto 2.x configuration in which every client logs in and may do only what its
role and its own id allow:

  validator  publish farelab/v1/dev/<id>/tx and …/status; subscribe to its own …/ack, …/params
  kiosk      publish farelab/v1/kiosk/<id>/load/req; subscribe to its own …/load/resp
  backend    (account {BACKEND_ACCOUNT}) everything under farelab/, and the shared
             subscriptions $share/<group>/farelab/… of its --group(s)

Anyone else, anonymous clients, revoked devices and devices registered without a password
may do nothing. The accounts' passwords come from the registry's hashes (`farelab backend
devices add`), never in clear. Written into --out: farelab.conf, and dynamic-security.json
(--format dynsec, the default: Mosquitto's dynamic-security plugin, the only way Mosquitto
refuses a subscription, such as a device joining the backend's shared group) or
farelab.passwd and farelab.acl (--format acl: for a broker without the plugin; Mosquitto's
acl_file grants every subscription). Start the broker with `mosquitto -c OUT/farelab.conf`,
and again after every change to the registry. The files are readable by their owner only and
the broker keeps its persistence file beside them: write them as the user Mosquitto runs as.""",
    )
    cfg.add_argument("--db", required=True, metavar="URL", help="the ledger's database URL")
    cfg.add_argument("--out", required=True, type=Path, metavar="DIR", help="folder to write")
    cfg.add_argument(
        "--backend-password",
        metavar="PW",
        help=f"the {BACKEND_ACCOUNT} account's password (default: ${SECRET_VARIABLE}, else a new "
        f"random one written to DIR/{_SECRET_FILE})",
    )
    cfg.add_argument(
        "--listener",
        default="127.0.0.1:1883",
        metavar="HOST:PORT",
        help="where the broker listens (default 127.0.0.1:1883)",
    )
    cfg.add_argument("--format", choices=FORMATS, default="dynsec", help="default dynsec")
    cfg.add_argument(
        "--plugin",
        metavar="PATH",
        help="mosquitto_dynamic_security.so (default: found in /usr/lib)",
    )
    cfg.add_argument(
        "--group",
        action="append",
        metavar="NAME",
        help=f"the backend's shared-subscription group (repeatable; default {DEFAULT_GROUP})",
    )
    cfg.add_argument("--certfile", metavar="PEM", help="TLS: the broker's certificate")
    cfg.add_argument("--keyfile", metavar="PEM", help="TLS: the broker's private key")
    cfg.set_defaults(func=_broker_config)


def _listener(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise CliError(f"--listener {text!r} must be HOST:PORT, a port from 1 to 65535")
    return host, int(port)


def _broker_config(args: argparse.Namespace) -> int:
    listener = _listener(args.listener)
    if (args.certfile is None) != (args.keyfile is None):
        raise CliError("--certfile and --keyfile go together")
    password = args.backend_password or os.environ.get(SECRET_VARIABLE) or ""
    generated = not password
    if generated:
        password = secrets.token_urlsafe(18)
    plugin = args.plugin or find_dynsec_plugin()
    try:
        store = Store(args.db, create=False)
    except StoreError as exc:
        raise CliError(str(exc)) from None
    try:
        conf, found, left_out = write_broker_config(
            store,
            args.out,
            backend_password=password,
            listener=listener,
            fmt=args.format,
            plugin=plugin,
            groups=args.group or [DEFAULT_GROUP],
            certfile=args.certfile,
            keyfile=args.keyfile,
        )
        if generated:
            secret = conf.parent / _SECRET_FILE
            fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(password + "\n")
    except ValueError as exc:
        raise CliError(str(exc)) from None
    except OSError as exc:
        raise CliError(f"--out {args.out}: cannot write: {exc.strerror}") from None
    finally:
        store.close()
    roles = [a.role for a in found]
    print(
        f"wrote {conf} ({args.format}): {roles.count('validator')} validator(s), "
        f"{roles.count('kiosk')} kiosk(s) and the {BACKEND_ACCOUNT} account"
    )
    if left_out:
        print(f"left out (revoked, or registered without a password): {', '.join(left_out)}")
    if generated:
        print(f"the {BACKEND_ACCOUNT} account's new password is in {conf.parent / _SECRET_FILE}")
    scheme = "mqtts" if args.certfile else "mqtt"
    print(f"start the broker:  mosquitto -c {conf}")
    print(
        f"start the backend: farelab backend run --broker "
        f"'{scheme}://{BACKEND_ACCOUNT}:PASSWORD@{listener[0]}:{listener[1]}' --db …"
    )
    return 0
