"""The rules both Python clients share (integrations_client._core), without a socket.

The shells run a `Call` by its stub method name, so the names and request types
checked here are what keeps the asyncio and the blocking client calling the
right RPC with the right message.
"""

from __future__ import annotations

import copy
import inspect
import pickle
from typing import Any

import grpc
import pytest

from integrations.v1 import integrations_pb2 as pb
from integrations_client import (
    ClientClosed,
    ConfigurationError,
    IntegrationsClient,
    IntegrationsClientSync,
    Unavailable,
)
from integrations_client._core import Call, ClientCore
from integrations_client.models import ProviderCredentials

SERVICE = pb.DESCRIPTOR.services_by_name["IntegrationService"]
KEY = ("org_a", "stripe")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def core(**kwargs: Any) -> ClientCore[object]:
    return ClientCore("127.0.0.1:1", **kwargs)


def every_call(client: ClientCore[object]) -> list[Call[Any, Any, Any]]:
    return [
        client._credentials_call(KEY, None, True),
        client._list_providers_call("org_a", "payments", None),
        client._masked_config_call(*KEY, None),
        client._save_call(*KEY, {"secretKey": "sk_test_x"}, ["webhookSecret"], "etag-1", None),
        client._delete_call(*KEY, True, "etag-1", None),
    ]


@pytest.mark.parametrize("index", range(5))
def test_every_call_names_an_rpc_of_the_service_that_takes_its_request(index: int) -> None:
    call = every_call(core())[index]
    rpc = SERVICE.methods_by_name[call.method]
    assert rpc.input_type.full_name == call.request.DESCRIPTOR.full_name
    reply_type = getattr(pb, rpc.output_type.name)
    call.convert(reply_type())  # the converter accepts that RPC's reply


def test_writes_invalidate_the_key_they_change_and_reads_invalidate_nothing() -> None:
    invalidated = {call.method: call.invalidates for call in every_call(core())}
    assert invalidated == {
        "GetProviderConfig": None,
        "ListProviders": None,
        "SaveIntegration": KEY,
        "DeleteIntegration": KEY,
    }


def test_a_call_takes_the_client_deadline_unless_it_gives_its_own() -> None:
    client = core(timeout=3.5, wait_for_ready=False)
    assert client._list_providers_call(None, None, None).timeout == 3.5
    assert client._list_providers_call(None, None, 0.25).timeout == 0.25
    assert client._list_providers_call(None, None, None).wait_for_ready is False
    assert client._credentials_call(KEY, None, True).wait_for_ready is True


def test_requests_carry_what_the_caller_asked_for() -> None:
    client = core()
    save, delete = every_call(client)[3:]
    assert save.request == pb.SaveIntegrationRequest(
        organization_id="org_a",
        provider="stripe",
        values={"secretKey": "sk_test_x"},
        clear_fields=["webhookSecret"],
        etag="etag-1",
    )
    assert delete.request == pb.DeleteIntegrationRequest(
        organization_id="org_a", provider="stripe", allow_missing=True, etag="etag-1"
    )
    assert client._credentials_call(KEY, None, True).request.view == pb.CONFIG_VIEW_DECRYPTED
    assert client._masked_config_call(*KEY, None).request.view == pb.CONFIG_VIEW_MASKED
    assert client._list_providers_call(None, None, None).request.organization_id == ""


def test_clear_fields_given_as_one_string_is_refused() -> None:
    with pytest.raises(TypeError, match="clear_fields"):
        core()._save_call(*KEY, None, "secretKey", "", None)


def test_invalidate_forgets_one_key_one_organization_or_everything() -> None:
    client = core(clock=FakeClock())
    keys = [("org_a", "stripe"), ("org_a", "resend"), ("org_b", "stripe")]

    def fill() -> None:
        for key in keys:
            client._cache.put(key, _credentials(), client._cache.clock())
            client._inflight[key] = object()

    fill()
    client.invalidate("org_a", "stripe")
    assert sorted(client._inflight) == [("org_a", "resend"), ("org_b", "stripe")]
    assert client.cache_stats.size == 2
    client.invalidate("org_a")
    assert list(client._inflight) == [("org_b", "stripe")]
    assert client.cache_stats.size == 1
    fill()
    client.invalidate()
    assert client._inflight == {}
    assert client.cache_stats.size == 0
    with pytest.raises(ValueError, match="organization_id"):
        client.invalidate(provider="stripe")


def test_a_read_landing_after_its_key_was_invalidated_is_not_stored() -> None:
    client = core(clock=FakeClock())
    flight = client._inflight[KEY] = object()
    client.invalidate(*KEY)
    client._landed(KEY, flight, _credentials(), client._cache.clock())
    assert client._fresh(KEY) is None
    client._inflight[KEY] = flight
    client._landed(KEY, flight, _credentials(), client._cache.clock())
    assert client._fresh(KEY) is not None


def test_a_refresh_with_a_stale_value_to_fall_back_on_does_not_wait_for_the_service() -> None:
    clock = FakeClock()
    client = core(clock=clock, cache_ttl=30, stale_if_error=300)
    assert client._start_read(KEY).wait_for_ready is True
    client._cache.put(KEY, _credentials(), clock())
    clock.now += 31
    assert client._start_read(KEY).wait_for_ready is False
    clock.now += 300
    assert client._start_read(KEY).wait_for_ready is True
    assert client.cache_stats.rpc_count == 3


def test_both_clients_take_the_documented_constructor_arguments() -> None:
    expected = {
        "target": inspect.Parameter.empty,
        "tls": None,
        "cache_ttl": 30.0,
        "cache_max_entries": 1024,
        "stale_if_error": 300.0,
        "timeout": 2.0,
        "wait_for_ready": True,
        "channel_options": (),
        "channels": 1,
        "watch": True,
        "insecure_plaintext_any_address": False,
    }
    for cls in (IntegrationsClient, IntegrationsClientSync):
        parameters = inspect.signature(cls).parameters
        assert list(parameters) == [
            *list(expected)[:-4],
            "clock",
            "channel_options",
            "channels",
            "watch",
            "insecure_plaintext_any_address",
        ]
        assert {name: parameters[name].default for name in expected} == expected


def _credentials() -> ProviderCredentials:
    return core()._credentials_call(KEY, None, True).convert(pb.GetProviderConfigResponse())


def test_calls_take_the_channels_in_turn_each_on_a_connection_of_its_own() -> None:
    client = core(channels=3)
    assert [client._next_channel() for _ in range(7)] == [0, 1, 2, 0, 1, 2, 0]
    assert ("grpc.use_local_subchannel_pool", 1) in client._options
    single = core()
    assert {single._next_channel() for _ in range(3)} == {0}
    assert ("grpc.use_local_subchannel_pool", 1) not in single._options
    with pytest.raises(ValueError, match="channels must be at least 1"):
        core(channels=0)


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        ({"target": ""}, "target"),
        ({"timeout": 0}, "timeout"),
        ({"channels": 0}, "channels"),
        ({"cache_ttl": -1}, "cache_ttl"),
        ({"stale_if_error": -1}, "stale_if_error"),
        ({"cache_max_entries": 0}, "cache_max_entries"),
    ],
)
def test_a_wrong_argument_is_a_configuration_error_naming_it(arguments: dict[str, Any], named: str) -> None:
    """clients/python/README.md: ConfigurationError (a ValueError) reports a wrong client configuration."""
    target = arguments.pop("target", "127.0.0.1:1")
    with pytest.raises(ConfigurationError, match=named):
        ClientCore(target, **arguments)


# --- decrypted values never leave the object by accident ---------------------------------------------------


def _secret_credentials() -> ProviderCredentials:
    config = pb.ProviderConfig(
        organization_id="org_a",
        provider="stripe",
        values={"secretKey": pb.ConfigValue(value=SECRET, source=pb.VALUE_SOURCE_ORGANIZATION, secret=True)},
        etag="etag-1",
    )
    return core()._credentials_call(KEY, None, True).convert(pb.GetProviderConfigResponse(config=config))


SECRET = "sk_test_51UnitSecretKey0000004242"


def test_credentials_refuse_pickling_with_a_clear_error() -> None:
    """A pickled ProviderCredentials (a Django or Flask cache, a Celery argument) would write the decrypted
    values to Redis or disk in clear text: refused, for the object and for its `values`, with a message that
    names the way out and never a value."""
    creds = _secret_credentials()
    for thing in (creds, creds.values):
        for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
            with pytest.raises(TypeError, match="cannot be pickled") as caught:
                pickle.dumps(thing, protocol=protocol)
            assert SECRET not in str(caught.value)


def test_credentials_copy_as_themselves() -> None:
    """Immutable: copy and deepcopy (of a settings dict holding them, say) give the same object back."""
    creds = _secret_credentials()
    assert copy.copy(creds) is creds
    assert copy.deepcopy({"stripe": creds})["stripe"] is creds
    assert copy.deepcopy(creds.values) is creds.values
    assert creds["secretKey"] == SECRET


def test_a_call_repr_never_shows_its_request() -> None:
    """A traceback that shows frame locals (Sentry, rich, pytest --showlocals) prints the `call` of a failed
    save(): its request holds the new secret values."""
    save = core()._save_call(*KEY, {"secretKey": SECRET}, (), "", None)
    assert SECRET not in repr(save)
    assert "SaveIntegration" in repr(save)


def test_a_call_cut_short_by_its_channel_is_client_closed_once_closed_else_unavailable() -> None:
    client = core()
    call = client._list_providers_call(None, None, None)
    cut = client._cut_short(call)  # the asyncio client's retired channel, closed after its grace period
    assert isinstance(cut, Unavailable)
    assert not isinstance(cut, ClientClosed)
    client._closed = True
    closed = client._cut_short(call)
    assert isinstance(closed, ClientClosed)
    assert isinstance(closed, RuntimeError)
    assert closed.code is grpc.StatusCode.CANCELLED
    assert "ListProviders" in str(closed)


@pytest.mark.parametrize(
    ("target", "local"),
    [
        ("127.0.0.1:50051", True),
        ("127.8.9.10:1", True),
        ("localhost:50051", True),
        ("LOCALHOST:50051", True),
        ("[::1]:50051", True),
        ("ipv4:127.0.0.1:50051", True),
        ("dns:///localhost:50051", True),
        ("unix:/run/integrations.sock", True),
        ("integrations.internal:50051", False),
        ("10.0.0.7:50051", False),
        ("128.0.0.1:50051", False),
        ("127.0.0.1.evil.example:50051", False),
        ("localhost.evil.example:50051", False),
        ("[2001:db8::1]:50051", False),
        ("ipv4:127.0.0.1:1,10.0.0.1:2", False),  # a list with a remote address in it
        ("dns:///integrations:50051", False),
    ],
)
def test_plaintext_is_refused_to_a_target_off_this_machine(target: str, local: bool) -> None:
    """Without tls (INTEGRATIONS_CLIENT_* gone missing), decrypted credentials would cross the network in clear:
    only a loopback address or a local socket is served plaintext, unless the caller says it is meant."""
    if local:
        IntegrationsClientSync(target).close()
    else:
        with pytest.raises(ConfigurationError, match="not a loopback address") as refused:
            IntegrationsClientSync(target)
        assert "insecure_plaintext_any_address" in str(refused.value)
        IntegrationsClientSync(target, insecure_plaintext_any_address=True).close()
