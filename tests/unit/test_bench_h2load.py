"""bench/h2load.py's pure parts: the gRPC frame it POSTs, and how it reads h2load's output."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from bench import h2load, server_metrics
from integrations.v1 import integrations_pb2 as pb

# Recorded from h2load 1.52 (nghttp2-client, Debian 12): 1 client, 64 streams, -D 2 with 1 s of
# warm-up, against bench/empty_server.py.
GRPC_RUN = """\
starting benchmark...
spawning thread #0: 1 total client(s). Timing-based test with 1s of warm-up time and 2s of main duration for measurements.
Warm-up started for thread #0.
progress: 100% of clients started
Application protocol: h2c
Warm-up phase is over for thread #0.
Main benchmark duration is started for thread #0.
Main benchmark duration is over for thread #0. Stopping all clients.
Stopped all clients for thread #0

finished in 3.00s, 11133.50 req/s, 666.04KB/s
requests: 22267 total, 22267 started, 22267 done, 22267 succeeded, 0 failed, 0 errored, 0 timeout
status codes: 22267 2xx, 0 3xx, 0 4xx, 0 5xx
traffic: 1.30MB (1364043) total, 90.67KB (92850) headers (space savings 96.29%), 151.00KB (154625) data
                     min         max         mean         sd        +/- sd
time for request:      122us     12.86ms      5.75ms      1.11ms    83.26%
time for connect:        0us         0us         0us         0us     0.00%
time to 1st byte:        0us         0us         0us         0us     0.00%
req/s           :   11132.96    11132.96    11132.96        0.00   100.00%
"""  # noqa: E501 (recorded output, verbatim)

# Recorded the same way: HTTP/1.1 (--h1), 64 clients, -n 5000, against `bao server -dev`.
HTTP1_RUN = """\
starting benchmark...
spawning thread #0: 64 total client(s). 5000 total requests
Application protocol: http/1.1
progress: 10% done
progress: 100% done

finished in 792.38ms, 6310.12 req/s, 3.47MB/s
requests: 5000 total, 5000 started, 5000 done, 5000 succeeded, 0 failed, 0 errored, 0 timeout
status codes: 4990 2xx, 0 3xx, 7 4xx, 3 5xx
traffic: 2.75MB (2885000) total, 776.37KB (795000) headers (space savings 0.00%), 1.81MB (1895000) data
                     min         max         mean         sd        +/- sd
time for request:       91us    104.56ms      8.04ms     13.25ms    87.90%
time for connect:      234us      2.87ms      1.63ms       809us    54.69%
time to 1st byte:     2.30ms     44.92ms     20.01ms     15.49ms    57.81%
req/s           :      98.87      670.68      148.09      106.06    93.75%
"""

# Recorded the same way against a closed port.
REFUSED_RUN = """\
starting benchmark...
spawning thread #0: 1 total client(s). 3 total requests

finished in 295us, 0.00 req/s, 0B/s
requests: 3 total, 0 started, 0 done, 0 succeeded, 3 failed, 3 errored, 0 timeout
status codes: 0 2xx, 0 3xx, 0 4xx, 0 5xx
traffic: 0B (0) total, 0B (0) headers (space savings 0.00%), 0B (0) data
"""

# h2load --log-file: start time (µs since the epoch), HTTP status, duration (µs).
LOG = (
    "1796114941069815\t200\t383\n1796114941070229\t200\t168\n1796114941070415\t200\t119\n1796114941070600\t200\t1330\n"
)


def test_the_grpc_frame_is_flag_zero_then_the_big_endian_length_then_the_message() -> None:
    request = pb.GetProviderConfigRequest(
        organization_id="org_" + "x" * 300, provider="stripe", view=pb.CONFIG_VIEW_DECRYPTED
    )
    message = request.SerializeToString()
    frame = h2load.grpc_frame(message)
    flag, length = struct.unpack(">BI", frame[:5])
    assert (flag, length) == (0, len(message))
    assert length > 255  # the length really is big-endian over 4 bytes, not one byte
    assert pb.GetProviderConfigRequest.FromString(frame[5:]) == request


def test_an_empty_message_is_a_five_byte_frame() -> None:
    assert h2load.grpc_frame(b"") == b"\x00\x00\x00\x00\x00"


def test_the_summary_of_a_grpc_run() -> None:
    result = h2load.parse_summary(GRPC_RUN)
    assert result.rps == pytest.approx(11133.50)
    assert (result.total, result.done, result.succeeded, result.failed, result.errored, result.timeout) == (
        22267,
        22267,
        22267,
        0,
        0,
        0,
    )
    assert result.status == {"2xx": 22267, "3xx": 0, "4xx": 0, "5xx": 0}
    assert result.data_bytes == 154625
    assert result.mean_ms == pytest.approx(5.75)
    assert result.max_ms == pytest.approx(12.86)
    assert result.seconds == pytest.approx(3.0)
    assert result.errors == 0


def test_statuses_other_than_2xx_are_errors_and_durations_in_microseconds_parse() -> None:
    result = h2load.parse_summary(HTTP1_RUN)
    assert result.errors == 10
    assert result.seconds == pytest.approx(0.79238)
    assert result.max_ms == pytest.approx(104.56)


def test_requests_that_never_got_an_answer_are_errors() -> None:
    result = h2load.parse_summary(REFUSED_RUN)
    assert (result.failed, result.errored, result.errors, result.rps) == (3, 3, 3, 0.0)


def test_output_without_a_summary_is_refused() -> None:
    with pytest.raises(h2load.H2loadError, match="no summary"):
        h2load.parse_summary("starting benchmark...\n")


def test_the_log_gives_every_latency_and_the_percentiles() -> None:
    latencies = h2load.parse_log(LOG + "garbage line\n")
    assert latencies == [0.119, 0.168, 0.383, 1.33]
    result = h2load.with_percentiles(h2load.parse_summary(GRPC_RUN), latencies)
    assert result.p50_ms == pytest.approx(0.168)
    assert result.p99_ms == pytest.approx(1.33)
    assert result.mean_ms == pytest.approx((0.119 + 0.168 + 0.383 + 1.33) / 4)


def test_side_by_side_runs_add_up() -> None:
    one, other = h2load.parse_summary(GRPC_RUN), h2load.parse_summary(HTTP1_RUN)
    total = h2load.combine([one, other], [3.0, 1.0, 2.0])
    assert total.rps == pytest.approx(11133.50 + 6310.12)
    assert total.done == 27267
    assert total.status["2xx"] == 22267 + 4990
    assert total.errors == 10
    assert (total.p50_ms, total.p99_ms) == (2.0, 3.0)


def test_the_command_line_is_time_bounded_and_posts_the_body_with_grpc_headers(tmp_path: Path) -> None:
    body = tmp_path / "get.grpc"
    load = h2load.Load(
        h2load.grpc_url("127.0.0.1:5000", "integrations.v1.IntegrationService", "GetProviderConfig"),
        clients=4,
        streams=16,
        seconds=2.5,
        body=body,
        headers=h2load.GRPC_HEADERS,
    )
    argv = h2load.command(load, tmp_path / "log.tsv")
    assert load.in_flight == 64
    assert argv[-1] == "http://127.0.0.1:5000/integrations.v1.IntegrationService/GetProviderConfig"
    joined = " ".join(argv)
    assert "--clients 4 --max-concurrent-streams 16" in joined
    assert "--duration 2500ms" in joined
    assert f"--data {body}" in joined
    assert "--header content-type: application/grpc" in joined
    assert "--header te: trailers" in joined
    assert "--h1" not in argv


def test_a_count_bounded_run_waits_for_every_answer_instead_of_a_time_bound(tmp_path: Path) -> None:
    load = h2load.Load(
        "http://127.0.0.1:8200/v1/secret/data/x",
        clients=64,
        streams=1,
        seconds=60,
        headers=("X-Vault-Token: t",),
        http1=True,
        requests=5000,
    )
    argv = h2load.command(load, tmp_path / "log.tsv")
    assert "--requests 5000" in " ".join(argv)
    assert "--duration" not in argv
    assert "--data" not in argv  # a GET
    assert "--h1" in argv


def test_the_servers_rpc_counter_is_summed_by_code() -> None:
    text = (
        "# TYPE integrations_rpc_requests_total counter\n"
        'integrations_rpc_requests_total{code="OK",method="GetProviderConfig"} 120.0\n'
        'integrations_rpc_requests_total{code="OK",method="SaveIntegration"} 3.0\n'
        'integrations_rpc_requests_total{code="INTERNAL",method="SaveIntegration"} 2.0\n'
        'integrations_rpc_requests_created{code="OK",method="GetProviderConfig"} 1.7e9\n'
    )
    before = server_metrics.parse_rpc_counts(text)
    assert before == {"OK": 123, "INTERNAL": 2}
    after = server_metrics.parse_rpc_counts(text.replace("} 2.0", "} 7.0"))
    assert server_metrics.not_ok(before, after) == {"INTERNAL": 5}
