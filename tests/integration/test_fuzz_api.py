"""Property-based fuzzing of every unary IntegrationService RPC, on the wire, against one real `serve` process.

Every field of every request is hostile (empty, 100 KB long, astral, control characters, NUL, `../`, SQL
quotes, unknown enum numbers, many map entries, random etags and page tokens), mixed with valid values (the
registry's providers and field keys, organizations that have stored credentials) so that calls also get past
validation; and raw random bytes are sent as request bodies. Callers are the three dev-certs roles over mutual
TLS and a caller the CA vouches for but the policy gives no role.

For every call: a status the API documents (never UNKNOWN, INTERNAL, DATA_LOSS...), a small message, no
planted secret echoed anywhere in the status, BadRequest violations naming fields of the request message,
and a caller without the permission never getting anything but PERMISSION_DENIED or INVALID_ARGUMENT. At the
end the server still answers, and everything it wrote to stdout/stderr holds no planted secret, no traceback
and no "unexpected error".

The server is a subprocess so that the test can call it with grpc's sync API from hypothesis' sync tests (an
in-process server would share, and be blocked with, pytest-asyncio's event loop). Examples are derandomized
(a CI run is reproducible) and bounded so the file takes well under a minute.
"""

from __future__ import annotations

import base64
import itertools
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import grpc
import pytest
from google.protobuf.message import DecodeError, Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from integrations.v1 import integrations_pb2 as pb
from integrations_service.api.auth import ROLES, required_permission
from integrations_service.devcerts import ROLES as DEV_ROLES
from integrations_service.devcerts import make_dev_certs
from integrations_service.domain.registry import PROVIDERS, ProviderSpec
from tests.harness import TEST_KEY, Metadata
from tests.processes import Processes, ServeProcess, clean_env, health_status, own_store_location
from tests.tls_fixtures import CertificateAuthority

SERVICE = "/integrations.v1.IntegrationService"
REQUESTS: dict[str, type[Message]] = {
    "ListProviders": pb.ListProvidersRequest,
    "GetProviderConfig": pb.GetProviderConfigRequest,
    "SaveIntegration": pb.SaveIntegrationRequest,
    "DeleteIntegration": pb.DeleteIntegrationRequest,
    "ListAuditEvents": pb.ListAuditEventsRequest,
}
C = grpc.StatusCode
# What docs/api.md says a request of any shape gets from a caller the policy knows. Not UNAVAILABLE or
# DATA_LOSS: those need a store that is down or rows tampered with, and this one is neither; never INTERNAL
# ("a bug") or UNKNOWN.
DOCUMENTED = {C.OK, C.INVALID_ARGUMENT, C.NOT_FOUND, C.PERMISSION_DENIED, C.ABORTED}
# The ResourceInfo types a NOT_FOUND names (docs/api.md).
NOT_FOUND_TYPES = {"integrations.v1.Provider", "integrations.v1.Integration"}
# Replies that never hold a secret in clear (GetProviderConfig: unless the decrypted view was asked for).
MASKED_REPLIES: dict[str, type[Message]] = {
    "GetProviderConfig": pb.GetProviderConfigResponse,
    "SaveIntegration": pb.SaveIntegrationResponse,
    "ListAuditEvents": pb.ListAuditEventsResponse,
}
REFUSED = {C.PERMISSION_DENIED, C.INVALID_ARGUMENT}
MAX_MESSAGE_BYTES = 2048
MAX_REQUEST_BYTES = 1 << 20  # the server's grpc.max_receive_message_length: bigger is RESOURCE_EXHAUSTED
CALL_TIMEOUT = 30.0
# Per unary RPC and store.
EXAMPLES = 300
RAW_EXAMPLES = 120
WATCH_EXAMPLES = 100  # per store
STRANGER = "stranger"
CALLERS = (*DEV_ROLES, STRANGER)

SECRET_KEYS = frozenset(f.key for p in PROVIDERS for f in p.fields if f.secret)
FIELD_KEYS = sorted({f.key for p in PROVIDERS for f in p.fields})
PROVIDER_IDS = [p.id for p in PROVIDERS]
KNOWN_ORGS = ("org_fuzz_stored", "org_fuzz_empty")
STORED_SECRET = "sk_test_PLANTED0fuzz0stored0ABC123"
ENV_SECRET = "sk_live_PLANTED0fuzz0env0DEF456"

# Each value sent in a secret field carries a marker of its own, so a search of the log and of every status
# for all markers ever sent is a search for every secret value ever sent (a short hostile value such as "a"
# would be found everywhere).
_markers = itertools.count()


def _marker(_: object) -> str:
    return f"PLANTED0fuzz{next(_markers):06d}Q"


LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (?:DEBUG|INFO|WARNING) +[a-z_.]+: ")
MARKER = re.compile(r"PLANTED0fuzz\d{6}Q|PLANTED0fuzz0(?:stored|env)0[A-Z0-9]{6}")


# --- strategies ---------------------------------------------------------------------------------------------

_SPECIAL = st.sampled_from(
    [
        "",
        " ",
        "\x00",
        "\t\r\n",
        "\u2028",
        "\ufeff",
        "\u202e",
        "../../etc/passwd",
        "..\\..\\windows",
        "' OR '1'='1",
        '"; DROP TABLE integration_config; --',
        "%s%n%x",
        "${jndi:ldap://x}",
        "{{7*7}}",
        "\U0001f600\U00010348",
        "null",
        "-1",
        "9" * 30,
        "••••",
    ]
)
_CONTROL = st.text(st.characters(categories=["Cc"]), min_size=1, max_size=8)
_ASTRAL = st.text(st.characters(min_codepoint=0x10000, max_codepoint=0x10FFFF), min_size=1, max_size=8)
_LONG = st.builds(lambda c, n: c * n, st.characters(codec="utf-8"), st.integers(1, 25_000)) | st.builds(
    lambda n: "x" * n, st.integers(1, 100_000)
)


# Values just over (or under) the 4 KiB a value may have, in any character width.
_MEDIUM = st.builds(lambda c, n: c * n, st.characters(codec="utf-8"), st.integers(1000, 5000))


def hostile(*valid: str, long: bool = True) -> st.SearchStrategy[str]:
    """Text for one field: a valid value, a hostile one, or a valid one with hostile text around it."""
    parts: list[st.SearchStrategy[str]] = [_SPECIAL, _CONTROL, _ASTRAL, st.text(max_size=30)]
    parts.append(_LONG if long else _MEDIUM)
    bad = st.one_of(parts)
    if not valid:
        return bad
    good = st.sampled_from(valid)
    around = st.builds(lambda a, b, c: a + b + c, bad | st.just(""), good, bad)
    # Mostly valid, so that a request gets past its first field and the others are tried too (one_of would
    # weigh each of `bad`'s branches like `good`).
    return st.integers(0, 9).flatmap(lambda n: good if n < 6 else bad if n < 8 else around)


_ENUM = st.integers(-(2**31), 2**31 - 1)
_ORG = hostile(*KNOWN_ORGS)
_PROVIDER = hostile(*PROVIDER_IDS)
_FIELD_KEY = hostile(*FIELD_KEYS, long=False)
_ETAG = st.one_of(st.just(""), hostile(), st.text("0123456789abcdef", min_size=1, max_size=64))
_PAGE_TOKEN = st.one_of(
    st.just(""),
    hostile(),
    st.binary(max_size=64).map(lambda b: base64.urlsafe_b64encode(b).decode().rstrip("=")),
    st.integers(-(2**70), 2**70).map(lambda n: base64.urlsafe_b64encode(f"before:{n}".encode()).decode()),
)
# Values: those sent to a secret key get a marker somewhere inside (or are the whole marker).
_VALUE = hostile("sk_test_abc", "https://example.com", "smtp.example.com", "587", "G-ABCDE1", long=False)


# Strategies are built once, never by a flatmap for each draw: hypothesis validates each new one, which for
# maps of 300 entries took most of the run's time.
_MARKED = st.one_of(
    st.builds(lambda before, marker, after: before + marker + after, _VALUE, st.builds(_marker, st.none()), _VALUE),
    st.builds(lambda marker: "sk_test_" + marker, st.builds(_marker, st.none())),
)


def _entry(key: str, plain: str, marked: str) -> tuple[str, str]:
    return key, marked if key in SECRET_KEYS else plain


def _values_map() -> st.SearchStrategy[dict[str, str]]:
    entry = st.builds(_entry, st.one_of(st.sampled_from(FIELD_KEYS), _FIELD_KEY), _VALUE, _MARKED)
    few = st.lists(entry, max_size=6)
    many = st.lists(entry, min_size=50, max_size=300)
    return st.integers(0, 3).flatmap(lambda n: many if n == 3 else few).map(dict)


def _clear_fields() -> st.SearchStrategy[list[str]]:
    keys = st.one_of(st.sampled_from(FIELD_KEYS), _FIELD_KEY)
    return st.one_of(st.lists(keys, max_size=4), st.lists(keys, min_size=30, max_size=300))


# A valid value of each non-secret field, and the prefix a secret field's value needs.
_PLAIN = {
    "publishableKey": "pk_test_51Fuzz",
    "accountId": "acct-1",
    "baseUrl": "https://api.test.easypay.pt",
    "fromAddress": "Shop <orders@shop.example>",
    "host": "smtp.example.com",
    "port": "587",
    "username": "mailer",
    "measurementId": "G-FUZZ1234",
}
_SECRET_PREFIX = {"secretKey": "sk_test_", "webhookSecret": "whsec_"}


def _plausible_value(key: str) -> st.SearchStrategy[str]:
    """What a dashboard would send for `key`; now and then with hostile text after it."""
    if key in SECRET_KEYS:
        value = st.builds(lambda m: _SECRET_PREFIX.get(key, "") + m, st.builds(_marker, st.none()))
    else:
        value = st.just(_PLAIN.get(key, "plain"))
    spoiled = st.builds(str.__add__, value, _SPECIAL | _CONTROL)
    return st.integers(0, 3).flatmap(lambda n: value if n else spoiled)


def _plausible_save(spec: ProviderSpec) -> st.SearchStrategy[Message]:
    """A save of `spec` that mostly passes validation, so that the store, the etags and the masking are fuzzed too."""
    keys = [f.key for f in spec.fields]
    return st.builds(
        pb.SaveIntegrationRequest,
        organization_id=st.sampled_from(KNOWN_ORGS) | st.text("abc123_-", min_size=1, max_size=20),
        provider=st.just(spec.id),
        values=st.fixed_dictionaries({}, optional={key: _plausible_value(key) for key in keys}),
        clear_fields=st.lists(st.sampled_from(keys), max_size=2, unique=True),
        etag=st.just("") | _ETAG,
    )


REQUEST_STRATEGIES: dict[str, st.SearchStrategy[Message]] = {
    "ListProviders": st.builds(
        pb.ListProvidersRequest,
        organization_id=st.just("") | _ORG,
        category=st.one_of(st.sampled_from(list(pb.Category.values())), _ENUM),
    ),
    "GetProviderConfig": st.builds(
        pb.GetProviderConfigRequest,
        organization_id=_ORG,
        provider=_PROVIDER,
        view=st.one_of(st.sampled_from(list(pb.ConfigView.values())), _ENUM),
    ),
    "SaveIntegration": st.one_of(*map(_plausible_save, PROVIDERS))
    | st.builds(
        pb.SaveIntegrationRequest,
        organization_id=_ORG,
        provider=_PROVIDER,
        values=_values_map(),
        clear_fields=_clear_fields(),
        etag=_ETAG,
    ),
    "DeleteIntegration": st.builds(
        pb.DeleteIntegrationRequest,
        organization_id=_ORG,
        provider=_PROVIDER,
        allow_missing=st.booleans(),
        etag=_ETAG,
    ),
    "ListAuditEvents": st.builds(
        pb.ListAuditEventsRequest,
        organization_id=st.just("") | _ORG,
        page_size=st.one_of(st.integers(-5, 600), _ENUM),
        page_token=_PAGE_TOKEN,
    ),
}


def _mutated(data: bytes, cut: int, junk: bytes) -> bytes:
    return data[: cut % (len(data) + 1)] + junk


def _raw_bodies(rpc: str) -> st.SearchStrategy[bytes]:
    """Random bytes, and valid requests cut short or with random bytes after them."""
    valid = REQUEST_STRATEGIES[rpc].map(lambda m: m.SerializeToString())
    return st.one_of(
        st.binary(max_size=2048),
        st.builds(_mutated, valid, st.integers(0, 1 << 20), st.binary(max_size=64)),
    )


# --- the service ---------------------------------------------------------------------------------------------


@dataclass
class Fuzzed:
    process: ServeProcess
    channels: dict[str, grpc.Channel]
    admin_credentials: grpc.ChannelCredentials
    secrets_sent: set[str] = field(default_factory=set)
    calls: dict[tuple[str, bool], int] = field(default_factory=dict)

    def unary(self, caller: str, rpc: str) -> Callable[..., Any]:
        return self.channels[caller].unary_unary(
            f"{SERVICE}/{rpc}", request_serializer=None, response_deserializer=None
        )


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def fuzzed(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzed]:
    """One service for every test of the module on each store; its log is checked after the last of them."""
    where = tmp_path_factory.mktemp("fuzz")
    if request.param == "sqlite":
        database_url = f"sqlite:///{where / 'store.sqlite3'}"
    else:
        database_url = own_store_location(("postgres", ""), request)[1]
    dev = make_dev_certs(where / "certs")
    ca = CertificateAuthority.load(dev["ca"].cert, dev["ca"].key)
    stranger = ca.issue(STRANGER, uris=("spiffe://integrations.local/stranger",))
    root = dev["ca"].cert.read_bytes()
    pairs = {role: (dev[role].key.read_bytes(), dev[role].cert.read_bytes()) for role in DEV_ROLES}
    pairs[STRANGER] = (stranger.key_pem, stranger.cert_pem)
    credentials = {role: grpc.ssl_channel_credentials(root, key, cert) for role, (key, cert) in pairs.items()}
    env = clean_env(
        {
            "INTEGRATION_ENCRYPTION_KEY": TEST_KEY,
            "DATABASE_URL": database_url,
            "INTEGRATIONS_DATA_DIR": str(where / "data"),
            "INTEGRATIONS_TLS_CERT": str(dev["server"].cert),
            "INTEGRATIONS_TLS_KEY": str(dev["server"].key),
            "INTEGRATIONS_TLS_CLIENT_CA": str(dev["ca"].cert),
            "INTEGRATIONS_AUTHZ_POLICY": str(where / "certs" / "policy.toml"),
            "INTEGRATIONS_SHUTDOWN_GRACE": "1",
            "STRIPE_SECRET_KEY": ENV_SECRET,
            "INTEGRATIONS_LOG_FORMAT": "text",  # the lines LOG_LINE matches
        }
    )
    with Processes(where) as processes:
        process = processes.serve(where / "cwd", env, credentials=credentials["admin"])
        channels = {role: grpc.secure_channel(process.target, cred) for role, cred in credentials.items()}
        fuzzed = Fuzzed(process, channels, credentials["admin"], {STORED_SECRET, ENV_SECRET})
        stored = pb.SaveIntegrationRequest(
            organization_id=KNOWN_ORGS[0], provider="stripe", values={"secretKey": STORED_SECRET}
        )
        fuzzed.unary("dashboard", "SaveIntegration")(stored.SerializeToString(), timeout=CALL_TIMEOUT)
        try:
            yield fuzzed
            # Here rather than in a test of its own: pytest-randomly may run that test before the fuzzing.
            check_after(fuzzed)
        finally:
            for channel in channels.values():
                channel.close()


def check_after(fuzzed: Fuzzed) -> None:
    """The server survived the fuzzing, and nothing it wrote holds a secret sent or a sign of an unhandled error."""
    process = fuzzed.process
    assert health_status(process.target, credentials=fuzzed.admin_credentials) == "SERVING"
    reply = fuzzed.unary("dashboard", "ListProviders")(pb.ListProvidersRequest().SerializeToString(), timeout=10)
    assert pb.ListProvidersResponse.FromString(reply).providers
    assert process.terminate() == 0
    log = process.output()
    calls = sum(fuzzed.calls.values())
    assert log.count("\n") > calls, "the log holds the calls (a line per RPC): the search below is over them"
    found = sorted(set(MARKER.findall(log)))
    assert not found, f"the log holds {len(found)} secret values sent, e.g. {found[:3]}"
    assert not [secret for secret in fuzzed.secrets_sent if len(secret) >= 12 and secret in log]
    # Every line one record below ERROR: no "unexpected error" with its traceback, and no line a value sent
    # began (the log escapes control characters). Not a search for the words: field keys sent are logged, and
    # hypothesis draws text from the constants of this file.
    for line in log.splitlines():
        assert LOG_LINE.match(line), line[:500]


# --- the checks -----------------------------------------------------------------------------------------------


def _secrets_in(message: Message | None) -> set[str]:
    if isinstance(message, pb.SaveIntegrationRequest):
        return {value for key, value in message.values.items() if key in SECRET_KEYS}
    return set()


def _field_exists(path: str, request: Message | None) -> bool:
    """A violation's field: `request` (the body as a whole) or a field path of the request message."""
    if path == "request":
        return True
    if request is None:
        return False
    head = re.match(r"[a-z_]+", path)
    if head is None or head.group() not in request.DESCRIPTOR.fields_by_name:
        return False
    rest = path[head.end() :]
    if not rest:
        return True
    index = re.fullmatch(r"\[(\d+)\]", rest)
    if index is not None:
        return int(index.group(1)) < len(getattr(request, head.group()))
    # values.<key>: the key as sent, possibly cut short with a marker (status.py bounds what it echoes).
    return rest.startswith(".") and head.group() == "values"


_PRINTABLE = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=200)
# The request id a caller may send: well-formed, or anything gRPC lets through as ASCII metadata.
_METADATA = st.one_of(
    st.just(()),
    st.tuples(st.tuples(st.just("x-request-id"), st.from_regex(r"[A-Za-z0-9._:-]{1,64}", fullmatch=True) | _PRINTABLE)),
)


@dataclass(frozen=True)
class Outcome:
    code: grpc.StatusCode
    message: str = ""
    trailers: tuple[tuple[str, str | bytes], ...] = ()
    status: Any = None  # google.rpc.Status, when the error carried one
    reply: Any = None

    @classmethod
    def of(cls, call: Callable[[], Any]) -> Outcome:
        try:
            return cls(C.OK, reply=call())
        except grpc.RpcError as error:
            failed: Any = error  # a grpc.Call as well, which the stubs do not say
            return cls(
                failed.code(),
                failed.details() or "",
                tuple(failed.trailing_metadata() or ()),
                rpc_status.from_call(failed),
            )


def _unpacked(detail: Any, kind: type[Message]) -> Any:
    """`detail` (a google.protobuf.Any) as a `kind`, or None when it holds something else."""
    if not detail.Is(kind.DESCRIPTOR):
        return None
    message = kind()
    detail.Unpack(message)
    return message


def check_status(outcome: Outcome, request: Message | None, where: str) -> None:
    """Small, no planted secret anywhere in it, its details well-formed: a RequestInfo, a BadRequest naming fields of
    `request`, a ResourceInfo of a documented type."""
    assert len(outcome.message.encode()) <= MAX_MESSAGE_BYTES, where
    status_text = outcome.message + "".join(f"{key}={value!r}" for key, value in outcome.trailers)
    assert not MARKER.search(status_text), where
    assert not any(secret in status_text for secret in _secrets_in(request)), where
    if outcome.code is C.OK:
        return
    assert outcome.status is not None, f"{where}: every status the service gives carries details"
    details = list(outcome.status.details)
    infos = [i for i in (_unpacked(d, error_details_pb2.RequestInfo) for d in details) if i is not None]
    assert [0 < len(i.request_id) <= 64 for i in infos] == [True], (where, infos)
    if outcome.code is C.NOT_FOUND:
        resources = [r for r in (_unpacked(d, error_details_pb2.ResourceInfo) for d in details) if r is not None]
        assert [r.resource_type for r in resources] in ([t] for t in NOT_FOUND_TYPES), (where, resources)
    for bad in (b for b in (_unpacked(d, error_details_pb2.BadRequest) for d in details) if b is not None):
        assert outcome.code is C.INVALID_ARGUMENT, where
        assert bad.field_violations, where
        for violation in bad.field_violations:
            assert _field_exists(violation.field, request), (where, violation.field)
            assert violation.description, where


def check_call(fuzzed: Fuzzed, caller: str, rpc: str, body: bytes, metadata: Metadata = ()) -> None:
    try:
        request: Message | None = REQUESTS[rpc].FromString(body)
    except DecodeError:
        request = None
    fuzzed.secrets_sent |= _secrets_in(request)
    fuzzed.calls[rpc, request is not None] = fuzzed.calls.get((rpc, request is not None), 0) + 1
    outcome = Outcome.of(lambda: fuzzed.unary(caller, rpc)(body, timeout=CALL_TIMEOUT, metadata=metadata))
    code = outcome.code
    where = f"{caller} {rpc} ({len(body)} bytes): {code.name} {outcome.message[:300]!r}"

    if len(body) > MAX_REQUEST_BYTES:
        assert code is C.RESOURCE_EXHAUSTED, where
        return
    if request is None:
        assert code in REFUSED if caller == STRANGER else code is C.INVALID_ARGUMENT, where
    elif caller == STRANGER or required_permission(f"{SERVICE}/{rpc}", request) not in ROLES[caller]:
        assert code in REFUSED, where
    else:
        assert code in DOCUMENTED, where
    check_status(outcome, request, where)
    if code is C.OK and rpc in MASKED_REPLIES and getattr(request, "view", 0) != pb.CONFIG_VIEW_DECRYPTED:
        assert not MARKER.search(str(MASKED_REPLIES[rpc].FromString(outcome.reply))), f"{where}: a secret in clear"


def test_the_checks_find_what_they_look_for() -> None:
    save = pb.SaveIntegrationRequest(values={"secretKey": "sk_test_" + _marker(None)}, clear_fields=["a"])
    assert _field_exists("values.secretKey", save)
    assert _field_exists("values.k\\n…", save)  # an echoed key, escaped and cut short
    assert _field_exists("clear_fields[0]", save)
    assert _field_exists("request", None)
    assert _field_exists("values", save)
    for wrong in ("clear_fields[1]", "secretKey", "view", "organization_id.x", "request.x"):
        assert not _field_exists(wrong, save), wrong
    assert not _field_exists("organization_id", None)
    (secret,) = _secrets_in(save)

    def status(*details: Message) -> Any:
        packed = status_pb2.Status(code=3)
        for detail in (error_details_pb2.RequestInfo(request_id="r1"), *details):
            packed.details.add().Pack(detail)
        return packed

    def violation(path: str) -> error_details_pb2.BadRequest:
        return error_details_pb2.BadRequest(field_violations=[{"field": path, "description": "d"}])

    fine = Outcome(C.INVALID_ARGUMENT, "values.secretKey: must start with 'sk_test_'", status=status(violation("etag")))
    check_status(fine, save, "")
    for bad in (
        replace(fine, message="x" * (MAX_MESSAGE_BYTES + 1)),
        replace(fine, message=f"values.secretKey: {secret[5:]} is wrong"),
        replace(fine, trailers=(("debug-bin", secret.encode()),)),
        replace(fine, status=status(violation("view"))),
        replace(fine, status=status_pb2.Status(code=3)),  # no RequestInfo
        replace(fine, status=None),
        replace(fine, code=C.NOT_FOUND),  # no ResourceInfo
        replace(fine, code=C.ABORTED),  # a BadRequest
    ):
        with pytest.raises(AssertionError):
            check_status(bad, save, "")
    resource = error_details_pb2.ResourceInfo(resource_type="integrations.v1.Provider", resource_name="p")
    check_status(Outcome(C.NOT_FOUND, "unknown provider", status=status(resource)), save, "")
    line = "2026-12-01 17:13:37,874 {} integrations.rpc: rpc finished"
    assert LOG_LINE.match(line.format("INFO   "))
    assert not LOG_LINE.match(line.format("ERROR  "))
    assert not LOG_LINE.match("Traceback (most recent call last):")


_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    # The suite's autouse leak watch is function-scoped; it holds nothing an example could change.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _caller(rpc: str) -> st.SearchStrategy[str]:
    """Mostly a role that may make the call (else most calls end at the permission check), else anyone."""
    default = REQUESTS[rpc]()
    permitted = [role for role in DEV_ROLES if required_permission(f"{SERVICE}/{rpc}", default) in ROLES[role]]
    may, anyone = st.sampled_from(permitted), st.sampled_from(CALLERS)
    return st.integers(0, 9).flatmap(lambda n: may if n < 6 else anyone)


@pytest.mark.parametrize("rpc", list(REQUESTS))
@_SETTINGS
@given(data=st.data())
def test_hostile_requests_get_documented_bounded_statuses(fuzzed: Fuzzed, rpc: str, data: st.DataObject) -> None:
    caller = data.draw(_caller(rpc), label="caller")
    request = data.draw(REQUEST_STRATEGIES[rpc], label="request")
    check_call(fuzzed, caller, rpc, request.SerializeToString(), data.draw(_METADATA, label="metadata"))


@pytest.mark.parametrize("rpc", list(REQUESTS))
@settings(_SETTINGS, max_examples=RAW_EXAMPLES)
@given(data=st.data())
def test_raw_bytes_are_invalid_argument_unless_they_decode(fuzzed: Fuzzed, rpc: str, data: st.DataObject) -> None:
    caller = data.draw(st.sampled_from(CALLERS), label="caller")
    check_call(fuzzed, caller, rpc, data.draw(_raw_bodies(rpc), label="body"))


_WATCH = st.builds(
    pb.WatchConfigChangesRequest,
    organization_id=st.just("") | _ORG,
    providers=st.one_of(st.lists(_PROVIDER, max_size=4), st.lists(_PROVIDER, min_size=10, max_size=200)),
)


@settings(_SETTINGS, max_examples=WATCH_EXAMPLES)
@given(caller=st.sampled_from(CALLERS), request=_WATCH)
def test_hostile_watches_start_or_are_refused(
    fuzzed: Fuzzed, caller: str, request: pb.WatchConfigChangesRequest
) -> None:
    """The streaming RPC: it opens with WatchStarted, or ends INVALID_ARGUMENT or PERMISSION_DENIED."""
    watch = fuzzed.channels[caller].unary_stream(
        f"{SERVICE}/WatchConfigChanges",
        request_serializer=pb.WatchConfigChangesRequest.SerializeToString,
        response_deserializer=pb.WatchConfigChangesResponse.FromString,
    )
    stream = watch(request, timeout=CALL_TIMEOUT)
    try:
        outcome = Outcome.of(lambda: next(stream))
    finally:
        stream.cancel()
    where = f"{caller} WatchConfigChanges: {outcome.code.name} {outcome.message[:300]!r}"
    if outcome.code is C.OK:
        assert caller != STRANGER, where
        assert outcome.reply.WhichOneof("event") == "started", outcome.reply
    else:
        assert outcome.code in REFUSED, where
    check_status(outcome, request, where)
