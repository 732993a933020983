"""`integrations-service rotate` on the embedded SQLite store, with rows written behind the service's back."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from tests.harness import TEST_KEY
from tests.processes import clean_env, run_cli

KEYS = f"k1:{TEST_KEY}"


def test_a_lone_surrogate_is_reported_and_leaves_its_row_as_it_is_while_the_rest_rotates(tmp_path: Path) -> None:
    # SQLite's JSON text can hold "\ud800" (PostgreSQL's jsonb refuses it). Sealing it raised UnicodeEncodeError
    # out of its batch, and so did writing its row back: every run stopped with a traceback at that batch.
    path = tmp_path / "store.sqlite3"
    env = clean_env({"DATABASE_URL": f"sqlite:///{path}", "INTEGRATION_ENCRYPTION_KEYS": KEYS})
    migrated = run_cli(["migrate"], tmp_path, env)
    assert migrated.returncode == 0, migrated.stderr
    bad = '{"secretKey":"sk_test_\\ud800","publishableKey":"pk_test_SurrogateRow0001"}'
    fine = json.dumps({"secretKey": "sk_test_SurrogateRow0002"})
    with sqlite3.connect(path) as conn:
        conn.executemany(
            "INSERT INTO integration_config (id, organization_id, provider, config, version, created_at, updated_at) "
            "VALUES (?, ?, 'stripe', ?, 1, '2026-01-01T00:00:00+00:00', '2026-01-01T00:00:00+00:00')",
            [("row-1", "org_a", bad), ("row-2", "org_b", fine)],
        )
    conn.close()

    result = run_cli(["rotate", "--batch-size", "2"], tmp_path, env)

    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    report = json.loads(result.stdout)
    assert report["undecryptable"] == [{"row_id": "row-1", "field": "secretKey"}]
    assert (report["rows_rewrapped"], report["values_rewrapped"]) == (1, 1)
    assert "SurrogateRow" not in result.stdout + result.stderr
    with sqlite3.connect(path) as conn:
        configs = dict(conn.execute("SELECT id, config FROM integration_config").fetchall())
    conn.close()
    assert configs["row-1"] == bad
    assert json.loads(configs["row-2"])["secretKey"].startswith("enc:v2:k1:")
