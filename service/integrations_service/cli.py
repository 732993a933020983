"""`integrations-service`: serve, migrate, gen-key, rotate, retire-key, dev-certs, healthcheck."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from integrations_service import app, healthcheck, logs, supervisor
from integrations_service.api.server import SERVICE_NAME
from integrations_service.config import (
    KEY_MATERIAL_ENVS,
    Settings,
    add_flags,
    json_logs_wanted,
    load_healthcheck_settings,
    load_settings,
)
from integrations_service.crypto import EncryptionKey
from integrations_service.crypto.keyring import KEY_ID_PATTERN
from integrations_service.devcerts import expiring, make_dev_certs
from integrations_service.domain.audit import Caller
from integrations_service.domain.rotation import RotationReport, Rotator
from integrations_service.errors import ConfigurationError, FailedPrecondition, Unavailable
from integrations_service.sealing import LegacyValues, Sealer

log = logging.getLogger("integrations.cli")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="integrations-service", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the gRPC service")
    add_flags(serve)
    serve.add_argument("--check", action="store_true", help="validate the configuration and exit")
    migrate = commands.add_parser("migrate", help="apply database migrations and exit")
    add_flags(migrate)
    commands.add_parser("gen-key", help="print a new random encryption key (base64)")
    rotate = commands.add_parser("rotate", help="re-encrypt every stored value under the active key")
    add_flags(rotate)
    rotate.add_argument("--batch-size", type=_batch_size, default=100, help="rows per transaction (default: 100)")
    retire = commands.add_parser("retire-key", help="retire a key once no stored value needs it")
    add_flags(retire)
    retire.add_argument("key_id", type=_key_id, help="the id of the key to retire")
    health = commands.add_parser("healthcheck", help="exit 0 when the local service reports SERVING")
    health.add_argument("--address", help="host:port (default: INTEGRATIONS_LISTEN_ADDRESS)")
    health.add_argument("--timeout", type=float, default=3.0, help="seconds (default: 3)")
    health.add_argument(
        "--ready",
        action="store_true",
        help=f"readiness: check {SERVICE_NAME}, NOT_SERVING while the store is unreachable (default: liveness)",
    )
    certs = commands.add_parser("dev-certs", help="write a development CA, server and per-role client certificates")
    certs.add_argument("--out", type=Path, default=Path(".data/dev-certs"), help="folder (default: .data/dev-certs)")
    certs.add_argument(
        "--if-expiring", action="store_true", help="only when a certificate is missing or expires within a day"
    )
    return parser


def _batch_size(text: str) -> int:
    """A count of rows, at least 1: a scan of 0 rows per batch would find nothing and report a complete rotation."""
    try:
        size = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if size < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (got {size})")
    return size


def _key_id(text: str) -> str:
    """A key id as a keyring names it; anything else is refused without being repeated.

    What is pasted here by mistake is as likely key material (`k1:<key>` is how a keyring lists a
    key): it must not reach a log line, an error message or a terminal's scrollback.
    """
    if not KEY_ID_PATTERN.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"not a key id (not shown: it may be key material): a key id is {KEY_ID_PATTERN.pattern}, "
            "the part before ':' in a keyring entry"
        )
    return text


async def _serve(settings: Settings) -> None:
    # Handled from before the start, so that no moment serves without them, and one that comes meanwhile (a
    # worker told to stop while it starts; as PID 1 of a container, unhandled, it would not even be delivered)
    # ends the start where it is (a wait for the store, for another replica's migrations): it closes what it
    # opened, and nothing served yet.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    starting = asyncio.ensure_future(app.start(settings))
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait((starting, stopping), return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():
        starting.cancel()
    try:
        running = await starting
    except asyncio.CancelledError:
        if not stop.is_set():
            raise
        log.info("stopped before serving", extra={"event": "stopped"})
        return
    finally:
        if not stopping.done():
            stopping.cancel()
    await stop.wait()
    log.info("shutting down", extra={"event": "shutting_down"})
    await running.stop(settings.shutdown_grace)


async def _migrate(settings: Settings) -> None:
    await app.migrate(settings)
    log.info("migrations applied", extra={"event": "migrated"})


async def _rotate(settings: Settings, batch_size: int) -> int:
    caller = Caller(f"cli:rotate@{getpass.getuser()}")
    rewrap_legacy = settings.legacy_values is LegacyValues.READ
    # What the batches committed so far did: progress is reported after each batch's transaction.
    done = RotationReport()

    def progress(report: RotationReport) -> None:
        done.rows_scanned, done.rows_rewrapped, done.values_rewrapped = (
            report.rows_scanned,
            report.rows_rewrapped,
            report.values_rewrapped,
        )
        _progress(report)

    # An outage while opening the store propagates: main() logs "cannot start". One once rows are being read is this.
    async with app.maintenance(settings, pool_size=2) as parts:
        rotator = Rotator(
            parts.store, Sealer(parts.cipher), parts.audit, caller, batch_size, progress, rewrap_legacy=rewrap_legacy
        )
        try:
            report = await rotator.rotate()
        except Unavailable as error:
            _interrupted(error, done)
            return 1
    summary = {
        "rows_scanned": report.rows_scanned,
        "rows_rewrapped": report.rows_rewrapped,
        "values_rewrapped": report.values_rewrapped,
        "from_keys": dict(report.from_keys),
        "active_key_id": parts.cipher.active_key_id,
        "undecryptable": [{"row_id": row, "field": field} for row, field in report.undecryptable],
        # Found before this run, and still legacy after it: 0 remaining means refuse can be switched on.
        "legacy_values": dict(report.legacy_found),
        "legacy_values_remaining": report.legacy_remaining,
        "unreadable_rows": report.unreadable_rows,
    }
    print(json.dumps(summary, indent=2))
    if not report.complete:
        log.error(
            "rotation incomplete: values left as they are; see undecryptable, legacy_values_remaining "
            "and unreadable_rows",
            extra={
                "event": "rotation_incomplete",
                "count": len(report.undecryptable),
                "legacy_remaining": report.legacy_remaining,
                "unreadable_rows": len(report.unreadable_rows),
            },
        )
        return 1
    return 0


def _interrupted(error: Unavailable, done: RotationReport) -> None:
    log.error(
        "rotation stopped part-way: %s; %d rows scanned, %d rewrapped (%d values) so far, in batches that are "
        "committed; run `integrations-service rotate` again to resume: it skips what is already rotated",
        error,
        done.rows_scanned,
        done.rows_rewrapped,
        done.values_rewrapped,
        extra={
            "event": "rotation_interrupted",
            "rows_scanned": done.rows_scanned,
            "rows_rewrapped": done.rows_rewrapped,
        },
    )


def _progress(report: RotationReport) -> None:
    log.info(
        "rotation progress: %d rows scanned, %d rewrapped, %d values",
        report.rows_scanned,
        report.rows_rewrapped,
        report.values_rewrapped,
        extra={"event": "rotation_progress"},
    )


async def _retire(settings: Settings, key_id: str) -> int:
    try:
        async with app.maintenance(settings, pool_size=1) as parts:
            rotator = Rotator(
                parts.store, Sealer(parts.cipher), parts.audit, Caller(f"cli:retire-key@{getpass.getuser()}")
            )
            rows = await rotator.retire(key_id)
    except FailedPrecondition as error:
        log.error("cannot retire key %r: %s", key_id, error, extra={"event": "retire_refused", "key_id": key_id})
        return 1
    log.info("key %r retired (%d rows checked)", key_id, rows, extra={"event": "key_retired", "key_id": key_id})
    return 0


def _dev_certs(directory: Path, if_expiring: bool) -> int:
    if if_expiring:
        reason = expiring(directory)
        if reason is None:
            print(f"development certificates in {directory}/ are valid for more than a day: kept")
            return 0
        print(f"renewing the development certificates: {reason}")
    issued = make_dev_certs(directory)
    print(f"wrote a development CA, server and client certificates to {directory}/")
    print("serve mutual TLS with:")
    print(f"  export INTEGRATIONS_TLS_CERT={issued['server'].cert} INTEGRATIONS_TLS_KEY={issued['server'].key}")
    print(f"  export INTEGRATIONS_TLS_CLIENT_CA={issued['ca'].cert} INTEGRATIONS_AUTHZ_POLICY={directory}/policy.toml")
    return 0


def _healthcheck(address: str | None, timeout: float, ready: bool) -> int:
    try:
        settings = load_healthcheck_settings(address, os.environ)
    except ConfigurationError as error:
        print(f"healthcheck: {error}", file=sys.stderr)
        return healthcheck.UNHEALTHY
    return healthcheck.check(settings, timeout, SERVICE_NAME if ready else "")


def _invalid_configuration(error: ConfigurationError, json_lines: bool) -> None:
    """One JSON line in JSON mode (its newlines escaped), else the plain text a terminal reads best."""
    if json_lines:
        log.error("%s", error, extra={"event": "invalid_configuration"})
    else:
        print(f"integrations-service: {error}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "gen-key":
        print(EncryptionKey.generate().to_text())
        return 0
    if args.command == "dev-certs":
        return _dev_certs(args.out, args.if_expiring)
    if args.command == "healthcheck":
        return _healthcheck(args.address, args.timeout, ready=args.ready)
    try:
        settings = load_settings(args, os.environ, serving=args.command == "serve")
    except ConfigurationError as error:
        json_lines = json_logs_wanted(args, os.environ)
        if json_lines:
            logs.configure(json_lines=True)
        _invalid_configuration(error, json_lines)
        return 2
    finally:
        for name in KEY_MATERIAL_ENVS:
            os.environ.pop(name, None)
    logs.configure(json_lines=settings.json_logs)
    if getattr(args, "check", False):
        try:
            app.check_security_files(settings)
        except ConfigurationError as error:
            _invalid_configuration(error, settings.json_logs)
            return 2
        if settings.json_logs:
            log.info("configuration is valid", extra={"event": "configuration_valid"})
        else:
            print("configuration is valid", file=sys.stderr)
        return 0
    try:
        if args.command == "serve" and settings.workers > 1:
            return supervisor.run(settings, _serve)
        return asyncio.run(_run(args, settings))
    except (ConfigurationError, Unavailable, FailedPrecondition) as error:  # e.g. rotate under a spent key
        log.error("cannot start: %s", error, extra={"event": "start_failed"})
        return 1
    except KeyboardInterrupt:
        return 130


async def _run(args: argparse.Namespace, settings: Settings) -> int:
    if args.command == "serve":
        await _serve(settings)
    elif args.command == "migrate":
        await _migrate(settings)
    elif args.command == "rotate":
        return await _rotate(settings, args.batch_size)
    elif args.command == "retire-key":
        return await _retire(settings, args.key_id)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
