"""Idle WatchConfigChanges streams for bench/watch.py: many consumers that only receive, in their own process.

Opens `--streams` streams of WatchConfigChanges (scope: everything, or
`--organization`) to `--target`
over `--connections` HTTP/2 connections (streams spread round-robin; each
channel its own TCP connection), with raw grpc.aio stubs, and waits until
every stream has sent its first message (WatchStarted). Then it only reads:
for every ConfigChange it records when it arrived (time.monotonic(), the
system-wide CLOCK_MONOTONIC, so bench/watch.py can compare it with the time a
save was acknowledged in its own process).

Talks to bench/watch.py in JSON lines: it prints {"event": "ready", ...} once
the streams are live, then answers commands read from stdin, one per line:

- `report PATH`: writes {"arrivals": {etag: [time, ...]}, "resyncs": n,
  "duplicates": n} to PATH (arrivals of every change so far), prints
  {"event": "reported"};
- `await ETAG SECONDS`: waits up to SECONDS until every live stream has had
  the change with that etag, prints {"event": "arrived", "streams": n};
- `close N`: cancels N of the open streams, prints {"event": "closed", "n": N};
- `wait-end SECONDS`: waits up to SECONDS for every open stream to end (the
  server was sent SIGTERM), prints {"event": "ended", "codes": {code: n},
  "open": n, "last_end": time};
- end of input: cancels everything and exits.

Never prints a value: the stream carries none (organization, provider, etag, time).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import grpc

from integrations.v1 import integrations_pb2 as pb
from integrations.v1 import integrations_pb2_grpc as pb_grpc

READY_TIMEOUT_S = 60.0


class Streams:
    def __init__(self, target: str, streams: int, connections: int, organization: str = "") -> None:
        # A local subchannel pool per channel: equal channels would otherwise share one TCP connection.
        self.channels = [
            grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
            for _ in range(connections)
        ]
        self.count = streams
        self.request = pb.WatchConfigChangesRequest(organization_id=organization)
        self.calls: list[grpc.aio.UnaryStreamCall[Any, Any]] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.started = 0
        self.all_started = asyncio.Event()
        self.arrivals: dict[str, list[float]] = collections.defaultdict(list)
        self.seen: list[set[str]] = [set() for _ in range(streams)]
        self.resyncs = 0
        self.duplicates = 0
        self.ended: collections.Counter[str] = collections.Counter()
        self.open = 0
        self.last_end = 0.0
        self.all_ended = asyncio.Event()
        self.arrived = asyncio.Event()  # set on every change that arrives (`await` checks its count)

    def start(self) -> None:
        for index in range(self.count):
            stub = pb_grpc.IntegrationServiceStub(self.channels[index % len(self.channels)])
            call = stub.WatchConfigChanges(self.request, wait_for_ready=True)
            self.calls.append(call)
            self.tasks.append(asyncio.get_running_loop().create_task(self.read(index, call)))
        self.open = self.count

    async def read(self, index: int, call: grpc.aio.UnaryStreamCall[Any, Any]) -> None:
        code = "OK"
        try:
            async for reply in call:
                kind = reply.WhichOneof("event")
                if kind == "change":
                    now = time.monotonic()
                    etag = reply.change.etag
                    if etag in self.seen[index]:
                        self.duplicates += 1
                    else:
                        self.seen[index].add(etag)
                        self.arrivals[etag].append(now)
                        self.arrived.set()
                elif kind == "started":
                    self.started += 1
                    if self.started == self.count:
                        self.all_started.set()
                elif kind == "resync":
                    self.resyncs += 1
        except grpc.aio.AioRpcError as error:
            code = error.code().name
        except asyncio.CancelledError:
            code = "CANCELLED"
        finally:
            self.ended[code] += 1
            self.open -= 1
            self.last_end = time.monotonic()
            if self.open == 0:
                self.all_ended.set()

    def close(self, n: int) -> int:
        closed = 0
        for call in self.calls:
            if closed == n:
                break
            if not call.done():
                call.cancel()
                closed += 1
        return closed

    async def shutdown(self) -> None:
        for call in self.calls:
            call.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for channel in self.channels:
            await channel.close()


def say(message: dict[str, Any]) -> None:
    print(json.dumps(message), flush=True)


async def serve(args: argparse.Namespace) -> None:
    streams = Streams(args.target, args.streams, args.connections, args.organization)
    began = time.monotonic()
    streams.start()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(streams.all_started.wait(), READY_TIMEOUT_S)
    say(
        {
            "event": "ready",
            "live": streams.started,
            "ended": dict(streams.ended),
            "seconds": time.monotonic() - began,
        }
    )
    while True:
        line = await asyncio.to_thread(sys.stdin.readline)
        if not line:
            break
        command, _, argument = line.strip().partition(" ")
        if command == "report":
            report = {"arrivals": streams.arrivals, "resyncs": streams.resyncs, "duplicates": streams.duplicates}
            await asyncio.to_thread(Path(argument).write_text, json.dumps(report))
            say({"event": "reported"})
        elif command == "await":
            etag, _, seconds = argument.rpartition(" ")
            deadline = time.monotonic() + float(seconds)
            while len(streams.arrivals.get(etag, ())) < streams.started and time.monotonic() < deadline:
                streams.arrived.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(streams.arrived.wait(), max(0.0, deadline - time.monotonic()))
            say({"event": "arrived", "streams": len(streams.arrivals.get(etag, ()))})
        elif command == "close":
            n = streams.close(int(argument))
            await asyncio.sleep(0)  # let the cancelled readers finish
            say({"event": "closed", "n": n})
        elif command == "wait-end":
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(streams.all_ended.wait(), float(argument))
            say({"event": "ended", "codes": dict(streams.ended), "open": streams.open, "last_end": streams.last_end})
        else:
            say({"event": "error", "unknown": command})
    await streams.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True)
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--connections", type=int, default=100)
    parser.add_argument("--organization", default="", help="watch only this organization (default: everything)")
    args = parser.parse_args()
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
