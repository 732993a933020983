"""One interceptor around every unary RPC, and around the server-streaming ones (`_wrap_stream`).

For each call it: takes or makes a request id; names the caller from the TLS
auth context; checks the caller's permission for this RPC (and view);
turns `errors.ServiceError` into its status (`api.status`) and anything
unexpected into INTERNAL, logged with the request id (never UNKNOWN); and
writes one log line with identifiers only, never request values, which also
carries the audit record the call made, if any (`domain.audit.CallLine`).

Bytes that do not decode as the request message answer INVALID_ARGUMENT
(grpc.aio decodes before any handler runs, so the decoder is wrapped too). A
call that its deadline or its caller ended is logged and counted as
DEADLINE_EXCEEDED or CANCELLED, whatever the handler got to.

A server-streaming call (WatchConfigChanges) gets the same checks before its
first message is sent, one log line when it opens and one when it ends (not
one per message), and its messages counted.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

import grpc

from integrations_service import errors
from integrations_service.api.auth import SERVICE_PREFIX, Authorizer, Identified, peer_names
from integrations_service.api.status import status_code_of, to_grpc_status
from integrations_service.deadlines import set_call_deadline
from integrations_service.domain.audit import AuditRecord, AuditTrail, Caller, CallLine
from integrations_service.logs import log_line
from integrations_service.metrics import Metrics
from integrations_service.untrusted import bounded

log = logging.getLogger("integrations.rpc")

REQUEST_ID_KEY = "x-request-id"
_CALLER_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_current_caller: contextvars.ContextVar[Caller] = contextvars.ContextVar("caller")

Handler = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]
StreamHandler = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Any]]
Deserializer = Callable[[bytes], Any]


def current_caller() -> Caller:
    """The caller of the RPC being served (set by the interceptor for the handler's task)."""
    return _current_caller.get()


class RpcInterceptor:
    """Wraps each method's handler once, when the server registers it (`wrapped`), not per call.

    A `grpc.aio.ServerInterceptor` is awaited on every call before its handler is found; handlers wrapped at
    registration cost nothing until they run (`api.server.WrappingRegistrar` does the registering).
    """

    def __init__(self, authorizer: Authorizer, audit: AuditTrail, metrics: Metrics) -> None:
        self._authorizer = authorizer
        self._audit = audit
        self._metrics = metrics
        self._new_request_id = request_ids()

    def wrapped(self, method: str, handler: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any] | None:
        """`handler` of `method` ("/package.Service/Method") with the checks; None for one that must not be served."""
        if handler.unary_unary is None:
            if handler.unary_stream is not None and method.startswith(SERVICE_PREFIX):
                return grpc.unary_stream_rpc_method_handler(
                    self._wrap_stream(method, cast(StreamHandler, handler.unary_stream)),
                    request_deserializer=_tolerant(handler.request_deserializer),
                    response_serializer=handler.response_serializer,
                )
            if method.startswith(SERVICE_PREFIX):
                # Fail closed: a streaming method would bypass the checks this wrapper makes.
                log.error("streaming methods are not authorized; refusing", extra={"rpc": method})
                return None
            return handler  # reflection's and health's streams: open to every authenticated caller
        # Under grpc.aio the unary behaviour is a coroutine function taking an aio context.
        return grpc.unary_unary_rpc_method_handler(
            self._wrap(method, cast(Handler, handler.unary_unary)),
            request_deserializer=_tolerant(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )

    def _wrap(self, method: str, inner: Handler) -> Handler:
        rpc_metrics = self._metrics.rpc(method)

        async def handle(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            identified, caller = self._caller(context)
            line = CallLine.open()
            set_call_deadline(context.time_remaining())  # the store waits no longer than the caller does
            started = time.perf_counter()
            rpc_metrics.started()
            code = grpc.StatusCode.OK
            failed: grpc.Status | None = None
            try:
                _check_decoded(request)
                self._authorize(caller, identified, method, request)
                # No x-request-id trailer on success: a header that never repeats costs gRPC an HPACK literal per
                # call (25-50 µs of CPU per read measured), and the caller who wants to name a call sends its
                # own id, which the call's log line and audit record carry. Errors carry it (`_abort`).
                return await inner(request, context)
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED  # refined below when the deadline is what ended it
                raise
            except grpc.aio.AbortError:
                raise
            except Exception as failure:
                failed = self._failure_status(method, caller, failure)
                code = failed.code
            finally:
                # Before an error status goes out (below), not after: `abort` sends it and resumes this task only
                # once gRPC reports it sent, by when the caller may already hold the error and look for the
                # call's line, audit record or count. A returned response is sent after this block anyway.
                code = _cut_short(context, code) or code
                elapsed = time.perf_counter() - started
                rpc_metrics.handled(code, elapsed)
                _log_rpc(method, request, code, elapsed, caller, line.close())
            if failed is not None:
                await _abort(context, failed, caller.request_id)
            raise AssertionError("unreachable: abort raises")  # pragma: no cover

        return handle

    def _wrap_stream(self, method: str, inner: StreamHandler) -> StreamHandler:
        """The checks of `_wrap` for a server-streaming method: all of them before the first message."""

        async def stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            identified, caller = self._caller(context)
            started = time.perf_counter()
            rpc_metrics = self._metrics.stream_rpc(method)
            rpc_metrics.started()
            code = grpc.StatusCode.OK
            failed: grpc.Status | None = None
            sent = 0
            opened = False
            try:
                _check_decoded(request)
                self._authorize(caller, identified, method, request)
                _log_stream_opened(method, request, caller)
                opened = True
                # Our trailers ride on the status, whichever way the stream ends.
                context.set_trailing_metadata(((REQUEST_ID_KEY, caller.request_id),))
                messages = inner(request, context)
                try:
                    async for message in messages:
                        yield message
                        sent += 1
                        rpc_metrics.sent()
                finally:
                    await messages.aclose()  # type: ignore[attr-defined]  # an async generator's
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED  # refined below when the deadline is what ended it
                raise
            except grpc.aio.AbortError:
                raise
            except GeneratorExit:
                code = _cut_short(context, grpc.StatusCode.CANCELLED) or grpc.StatusCode.CANCELLED
                raise
            except Exception as failure:
                failed = self._failure_status(method, caller, failure)
                code = failed.code
            finally:
                # Before an error status goes out, as in `_wrap`.
                code = _cut_short(context, code) or code
                elapsed = time.perf_counter() - started
                rpc_metrics.handled(code)
                _log_stream_ended(method, request, code, elapsed, caller, sent, opened=opened)
            if failed is not None:
                await _abort(context, failed, caller.request_id)

        return stream

    def _caller(self, context: grpc.aio.ServicerContext[Any, Any]) -> tuple[Identified, Caller]:
        """Who is calling (as the policy sees it, and as logs and audit records show it: spiffe:…), made the
        current caller of this call's task."""
        identified = self._authorizer.identify(peer_names(context))
        caller = Caller(str(identified.name), _request_id(context) or self._new_request_id())
        _current_caller.set(caller)
        return identified, caller

    def _failure_status(self, method: str, caller: Caller, failure: Exception) -> grpc.Status:
        """What a call that raised `failure` answers: a ServiceError its own status; anything else INTERNAL, logged.

        Call it from the `except` block: the log line of an unexpected error carries its traceback.
        """
        if isinstance(failure, errors.ServiceError):
            if isinstance(failure, errors.CorruptCredential):
                self._metrics.decryption_failures.labels(failure.provider).inc()
            return to_grpc_status(status_code_of(failure), failure.message, caller.request_id, failure)
        log.exception("unexpected error", extra={"request_id": caller.request_id, "rpc": method})
        message = f"internal error; the service logged it with request id {caller.request_id}"
        return to_grpc_status(grpc.StatusCode.INTERNAL, message, caller.request_id, None)

    def _authorize(self, caller: Caller, identified: Identified, method: str, request: Any) -> None:
        try:
            self._authorizer.check(identified, method, request)
        except errors.PermissionDenied as error:
            log.warning(
                "permission denied",
                extra={
                    "event": "permission_denied",
                    "caller": caller.identity,
                    "rpc": method,
                    "request_id": caller.request_id,
                },
            )
            # A caller with no role is checked for nothing else: AuditTrail.record bounds what it sent.
            organization_id = getattr(request, "organization_id", "")
            provider = getattr(request, "provider", "")
            rpc = method.rsplit("/", 1)[-1]
            self._audit.refused(caller, rpc, error, organization_id, provider)
            raise


class Undecodable:
    """Stands in for a request whose bytes are not a valid `message_name` (the handler answers INVALID_ARGUMENT)."""

    def __init__(self, message_name: str) -> None:
        self.message_name = message_name

    def error(self) -> errors.InvalidArgument:
        description = f"the request is not a valid {self.message_name} protobuf"
        return errors.InvalidArgument([errors.FieldViolation("request", description)])


def _check_decoded(request: Any) -> None:
    if isinstance(request, Undecodable):
        raise request.error()


def _tolerant(deserializer: Deserializer | None) -> Deserializer | None:
    """`deserializer`, but bytes it refuses become an `Undecodable` instead of grpc's UNKNOWN status."""
    if deserializer is None:
        return None
    message_class = getattr(deserializer, "__self__", None)
    message_name = getattr(getattr(message_class, "DESCRIPTOR", None), "name", "request message")

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception:  # DecodeError for bad wire format and invalid UTF-8 alike; nothing else runs here
            return Undecodable(message_name)

    return deserialize


# A client whose deadline passes cancels the call (RST_STREAM) at its own clock, a moment before the
# server's copy of that deadline (counted from when the request arrived) runs out: a cancellation this
# close to the deadline is the deadline's doing.
DEADLINE_CANCEL_SLACK = 0.25


def _cut_short(context: grpc.aio.ServicerContext[Any, Any], code: grpc.StatusCode) -> grpc.StatusCode | None:
    """DEADLINE_EXCEEDED or CANCELLED when the call ended before its answer could reach the caller.

    `code` is what the handler got to: CANCELLED when its task was cancelled. gRPC cancels the task when
    the deadline's timer fires, which can be a moment before `time_remaining()` reads 0 (and before
    `cancelled()` says so), so a cancelled task within the slack of its deadline counts as the deadline's.
    """
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    if context.cancelled() or code is grpc.StatusCode.CANCELLED:
        if remaining is not None and remaining <= DEADLINE_CANCEL_SLACK:
            return grpc.StatusCode.DEADLINE_EXCEEDED
        return grpc.StatusCode.CANCELLED
    return None


def _request_id(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    """The caller's request id, when it sent a well-formed one; else ""."""
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY and isinstance(value, str) and _CALLER_REQUEST_ID.fullmatch(value):
            return value
    return ""


def request_ids() -> Callable[[], str]:
    """A source of request ids: 32 hex characters, a random 64-bit prefix made once per process and a counter.

    A request id correlates a call's log line, audit record and error; it grants nothing (a caller may even
    choose its own), so it needs to be unique, not unguessable. Within a process the counter never repeats;
    across processes (replicas, workers, restarts) two prefixes collide with probability 2**-64 per pair.
    That is as unique as a uuid4 in practice, for a string format and a counter instead of 16 random bytes
    and a UUID object per call.
    """
    prefix = secrets.token_hex(8)
    counter = itertools.count(1)
    return lambda: f"{prefix}{next(counter):016x}"


async def _abort(context: grpc.aio.ServicerContext[Any, Any], status: grpc.Status, request_id: str) -> None:
    trailing = (*status.trailing_metadata, (REQUEST_ID_KEY, request_id))
    await context.abort(status.code, status.details, trailing)


def _log_rpc(
    method: str,
    request: Any,
    code: grpc.StatusCode,
    elapsed: float,
    caller: Caller,
    audit: AuditRecord | None = None,
) -> None:
    """The call's one line; with the audit record the call made, if any (its identifiers are the record's own)."""
    if audit is None:
        # Identifiers only (bounded: the request may be one that was refused for them);
        # requests carry secrets in other fields, which are never logged.
        organization_id = bounded(getattr(request, "organization_id", "")) or None
        provider = bounded(getattr(request, "provider", "")) or None
        caller_shown, request_id = caller.identity, caller.request_id
    else:
        organization_id, provider = audit.organization_id or None, audit.provider or None
        caller_shown, request_id = audit.caller, audit.request_id
    log_line(
        log,
        logging.INFO,
        "rpc finished",
        {
            "rpc": method,
            "code": code.name,
            "duration_ms": round(elapsed * 1000, 3),
            "request_id": request_id,
            "caller": caller_shown,
            "organization_id": organization_id,
            "provider": provider,
            # None (left out of the line) for a call that made no audit record.
            "event": "audit" if audit else None,
            "outcome": audit.outcome if audit else None,
            "fields": (",".join(audit.fields) or None) if audit else None,
        },
    )


def _log_stream_opened(method: str, request: Any, caller: Caller) -> None:
    log.info(
        "stream opened",
        extra={
            "rpc": method,
            "request_id": caller.request_id,
            "caller": caller.identity,
            "organization_id": bounded(getattr(request, "organization_id", "")) or None,
            # The scope asked for, as sent (bounded: it is checked after this line).
            "providers": [bounded(p) for p in list(getattr(request, "providers", ()))[:_LOGGED_PROVIDERS]] or None,
        },
    )


_LOGGED_PROVIDERS = 16


def _log_stream_ended(
    method: str, request: Any, code: grpc.StatusCode, elapsed: float, caller: Caller, sent: int, *, opened: bool
) -> None:
    """The stream's one closing line (also for a stream refused before it opened: then the only one)."""
    log.info(
        "rpc finished" if not opened else "stream ended",
        extra={
            "rpc": method,
            "code": code.name,
            "duration_ms": round(elapsed * 1000, 3),
            "request_id": caller.request_id,
            "caller": caller.identity,
            "organization_id": bounded(getattr(request, "organization_id", "")) or None,
            "count": sent,  # messages sent
        },
    )
