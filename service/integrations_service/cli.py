"""`integrations-service`: serve, migrate, gen-key."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Sequence

from integrations_service import app, logs
from integrations_service.config import Settings, add_flags, load_settings
from integrations_service.crypto import EncryptionKey
from integrations_service.errors import ConfigurationError, Unavailable
from integrations_service.store.factory import open_store

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
    return parser


async def _serve(settings: Settings) -> None:
    running = await app.start(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    log.info("shutting down", extra={"event": "shutting_down"})
    await running.stop(settings.shutdown_grace)


async def _migrate(settings: Settings) -> None:
    store = await open_store(settings.database_url, settings.data_dir, timeout=settings.db_timeout,
                             pool_size=1)
    await store.close()
    log.info("migrations applied", extra={"event": "migrated"})


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "gen-key":
        print(EncryptionKey.generate().to_text())
        return 0
    try:
        settings = load_settings(args, os.environ)
    except ConfigurationError as error:
        print(f"integrations-service: {error}", file=sys.stderr)
        return 2
    logs.configure(json_lines=settings.json_logs)
    if getattr(args, "check", False):
        print("configuration is valid", file=sys.stderr)
        return 0
    try:
        asyncio.run(_serve(settings) if args.command == "serve" else _migrate(settings))
    except (ConfigurationError, Unavailable) as error:
        log.error("cannot start: %s", error, extra={"event": "start_failed"})
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
