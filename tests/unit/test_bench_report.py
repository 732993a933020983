"""The benchmark report's choice of round: the median one, a real measurement."""

from __future__ import annotations

from bench.report import CONCURRENT, SEQUENTIAL, Measurement, median_round


def _round(rps: float, cpu: float) -> Measurement:
    phases = {CONCURRENT: {"rps": rps, "mean_ms": 1.0}, SEQUENTIAL: {"rps": rps / 2, "mean_ms": 0.5}}
    return Measurement("GetProviderConfig", "service", "h2load", phases, cpu)


def test_a_row_shows_its_round_with_the_median_rate_whole() -> None:
    rounds = [_round(2500, 500), _round(3100, 430), _round(1900, 610)]
    assert median_round(rounds) is rounds[0]  # its own CPU and latency, not a mix of rounds


def test_an_even_count_takes_the_lower_middle_and_one_round_is_itself() -> None:
    rounds = [_round(2500, 500), _round(3100, 430), _round(1900, 610), _round(2800, 470)]
    assert median_round(rounds) is rounds[0]
    assert median_round(rounds[1:2]) is rounds[1]


def test_a_row_without_numbers_stays_without() -> None:
    missing = Measurement("GetProviderConfig", "OpenBao", "h2load", {}, None, "not available")
    assert median_round([missing, missing]) is missing
