"""INTEGRATIONS_WORKERS: which stores and addresses can run several server processes."""

from __future__ import annotations

import pytest

from integrations_service.config import load_settings
from integrations_service.errors import ConfigurationError

POSTGRES = "postgresql://postgres@127.0.0.1:5432/db"


def settings(**environ: str) -> int:
    return load_settings(None, {"INTEGRATIONS_LISTEN_ADDRESS": "127.0.0.1:50051", **environ}).workers


def test_one_worker_by_default_and_several_on_postgresql() -> None:
    assert settings() == 1
    assert settings(DATABASE_URL=POSTGRES, INTEGRATIONS_WORKERS="4") == 4


@pytest.mark.parametrize("database_url", ["", "sqlite:///data/store.sqlite3"])
def test_the_embedded_store_refuses_more_than_one(database_url: str) -> None:
    with pytest.raises(ConfigurationError) as refused:
        settings(DATABASE_URL=database_url, INTEGRATIONS_WORKERS="2")
    assert "INTEGRATIONS_WORKERS is 2, but the embedded SQLite store serves one process only" in str(refused.value)
    assert "DATABASE_URL" in str(refused.value)


def test_workers_need_a_fixed_port_and_a_positive_count() -> None:
    with pytest.raises(ConfigurationError, match=r"INTEGRATIONS_WORKERS is 2, but .*any free port \(:0\)"):
        settings(DATABASE_URL=POSTGRES, INTEGRATIONS_WORKERS="2", INTEGRATIONS_LISTEN_ADDRESS="127.0.0.1:0")
    with pytest.raises(ConfigurationError, match="INTEGRATIONS_WORKERS must be at least 1"):
        settings(DATABASE_URL=POSTGRES, INTEGRATIONS_WORKERS="0")


def test_commands_that_serve_nothing_ignore_it() -> None:
    environ = {"INTEGRATIONS_WORKERS": "2", "DATABASE_URL": "sqlite:///x.sqlite3"}
    assert load_settings(None, environ, serving=False).workers == 1
