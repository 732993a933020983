"""What the docs state as fact, read from the docs and checked against the code.

The README's settings, commands and provider fields; docs/api.md's violation fields and fallback table;
docs/security.md's roles; the variables, defaults and log events any doc names; the Python client's
constructor. (Metrics: test_metrics_catalog.py; the README's grpcurl sessions run in
tests/integration/test_grpcurl.py.)
"""

from __future__ import annotations

import argparse
import ast
import inspect
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from integrations.v1 import integrations_pb2 as pb
from integrations_client import IntegrationsClient, IntegrationsClientSync
from integrations_client import config as client_config
from integrations_service import cli
from integrations_service.api.auth import ROLES, SERVICE_PREFIX, required_permission
from integrations_service.config import (
    ENCRYPTION_KEY_ENV,
    ENCRYPTION_KEY_FILE_ENV,
    ENCRYPTION_KEYS_ENV,
    HEALTHCHECK_FILE_ENVS,
    HEALTHCHECK_SERVER_NAME_ENV,
    SETTINGS,
    Setting,
)
from integrations_service.domain.registry import PROVIDERS, ProviderSpec, all_env_vars
from integrations_service.store import postgres
from tests.conftest import POSTGRES_URL_ENV

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
CONFIG_ROWS = {match.group(1): line for line in README.splitlines() if (match := re.match(r"\| `([A-Z_]+)` \|", line))}


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s.env)
def test_every_setting_has_a_readme_row_with_its_flag_and_default(setting: Setting) -> None:
    row = CONFIG_ROWS.get(setting.env)
    assert row is not None, f"{setting.env} is missing from the README's configuration table"
    assert f"`{setting.flag}`" in row
    if setting.default not in (None, "", "false"):
        assert f"`{setting.default}`" in row


def test_every_readme_setting_exists_in_the_code() -> None:
    documented_only = {
        "INTEGRATION_ENCRYPTION_KEY_FILE",
        "INTEGRATION_ENCRYPTION_KEYS",
        "INTEGRATION_ENCRYPTION_KEY",
        "INTEGRATIONS_HEALTHCHECK_CA",
    }
    unknown = set(CONFIG_ROWS) - {s.env for s in SETTINGS} - documented_only
    assert not unknown, f"README documents settings the code does not read: {unknown}"


@pytest.mark.parametrize("env_var", all_env_vars())
def test_every_provider_fallback_is_in_the_readme(env_var: str) -> None:
    assert f"`{env_var}`" in README


def _cells(text: str, first_cell: str) -> list[str]:
    """The cells of the table row of `text` whose first cell is `first_cell`."""
    rows = [line for line in text.splitlines() if line.startswith(f"| {first_cell} |")]
    assert len(rows) == 1, f"no single table row for {first_cell} in the docs"
    return [cell.strip() for cell in rows[0].strip("|").split("|")]


@pytest.mark.parametrize("provider", PROVIDERS, ids=lambda p: p.id)
def test_docs_mark_exactly_the_endpoint_and_account_fields(provider: ProviderSpec) -> None:
    """README's † marks and docs/api.md's Environment fallback table name the registry's binds_secrets fields."""
    binding = sorted(provider.binding_keys)
    readme_fields = _cells(README, f"`{provider.id}`")[2]
    assert sorted(re.findall(r"`(\w+)`\**†", readme_fields)) == binding
    api_cells = _cells((ROOT / "docs" / "api.md").read_text(), f"`{provider.id}`")
    assert sorted(re.findall(r"`(\w+)`", api_cells[1])) == binding
    # "secrets the rule withholds": every secret field, once a binding field is stored; none without one.
    withheld = sorted(f.key for f in provider.fields if f.secret) if binding else []
    assert sorted(re.findall(r"`(\w+)`", api_cells[2])) == withheld


DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "deploy" / "kubernetes" / "README.md"]
SERVICE_SOURCE = "\n".join(path.read_text() for path in (ROOT / "service" / "integrations_service").rglob("*.py"))
# How the docs name a log event: `"event": "x"`, "logged (`x`", "logs `x`", "an `x` log line", ...
_EVENT_MENTIONS = (
    r'"event": "(\w+)"',
    r"\blog(?:s|ged)(?:\s+as|\s+at\s+error\s+level)?\s+\(?`(\w+)`",
    r"`(\w+)`\s+log\s+line",
    r"`(\w+)`\s+is\s+logged",
)


def _documented_events(text: str) -> set[str]:
    return {name for pattern in _EVENT_MENTIONS for name in re.findall(pattern, text)}


def test_the_event_mentions_are_found() -> None:
    """The patterns still find the events the docs are known to name (else the next test checks nothing)."""
    everything = "\n".join(doc.read_text() for doc in DOCS)
    assert {
        "audit",
        "permission_denied",
        "audit_lost",
        "worker_died",
        "ambiguous_caller",
        "workers_crash_loop",
    } <= _documented_events(everything)


@pytest.mark.parametrize("doc", DOCS, ids=lambda path: str(path.relative_to(ROOT)))
def test_every_log_event_the_docs_name_is_logged_by_the_code(doc: Path) -> None:
    missing = {event for event in _documented_events(doc.read_text()) if f'"event": "{event}"' not in SERVICE_SOURCE}
    assert not missing, f"{doc.name} names log events the service never logs: {sorted(missing)}"


def _client_envs() -> set[str]:
    return {getattr(client_config, name) for name in client_config.__all__ if name.startswith("ENV_")}


def _env_vars_read() -> set[str]:
    service = {setting.env for setting in SETTINGS} | set(HEALTHCHECK_FILE_ENVS)
    service |= {ENCRYPTION_KEY_ENV, ENCRYPTION_KEYS_ENV, ENCRYPTION_KEY_FILE_ENV, HEALTHCHECK_SERVER_NAME_ENV}
    return service | _client_envs() | {POSTGRES_URL_ENV}


@pytest.mark.parametrize(
    "doc", [*DOCS, ROOT / "clients" / "python" / "README.md"], ids=lambda p: str(p.relative_to(ROOT))
)
def test_every_integrations_variable_the_docs_name_is_read_by_the_code(doc: Path) -> None:
    read = _env_vars_read()
    named = set(re.findall(r"\bINTEGRATIONS?_[A-Z0-9_]*[A-Z0-9]\b", doc.read_text()))
    unknown = {name for name in named - read if not any(env.startswith(name + "_") for env in read)}
    assert not unknown, f"{doc.name} names variables nothing reads: {sorted(unknown)}"


def test_defaults_stated_in_passing_are_the_settings_defaults() -> None:
    """ "`INTEGRATIONS_X` (default 5 s)", "`INTEGRATIONS_X`, default 1000", "`INTEGRATIONS_X` (60 s)", ...

    deploy/kubernetes/README.md states the manifests' values instead, so it is not read here.
    """
    defaults = {setting.env: setting.default for setting in SETTINGS}
    stated = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = " ".join(doc.read_text().split())  # a mention may wrap over lines
        for match in re.finditer(r"`(INTEGRATIONS_\w+)`,? \((?:seconds, )?(?:default )?(\d+)(?: s)?[;,)]", text):
            stated.append((doc.name, match.group(1), match.group(2)))
        for match in re.finditer(r"`(INTEGRATIONS_\w+)`,? (?:\w+ )?\(?default (\d+)", text):
            stated.append((doc.name, match.group(1), match.group(2)))
    assert len(stated) >= 6, stated  # the patterns still find the known mentions
    wrong = [(doc, env, value, defaults.get(env)) for doc, env, value in stated if defaults.get(env) != value]
    assert not wrong, f"defaults stated in the docs that are not the code's (doc, variable, stated, code): {wrong}"


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    actions = [a for a in cli._parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(actions[0].choices)


def test_the_readme_commands_table_is_the_clis_commands_and_their_flags() -> None:
    section = README.split("Commands of `integrations-service`:", 1)[1].split("\n\n", 2)[1]
    rows = re.findall(r"^\| `([a-z-]+)((?: [^`]*)?)` \|", section, re.M)
    commands = _subcommands()
    assert sorted(name for name, _ in rows) == sorted(commands)
    for name, usage in rows:
        flags = {flag for action in commands[name]._actions for flag in action.option_strings}
        assert set(re.findall(r"--[a-z-]+", usage)) <= flags, (name, usage)


SECURITY = (ROOT / "docs" / "security.md").read_text()


def _requests_of(column: str) -> list[tuple[str, Any]]:
    """The calls a column of docs/security.md's role table stands for: "GetProviderConfig decrypted", "A, B", ..."""
    calls: list[tuple[str, Any]] = []
    for part in column.split(", "):
        name, _, view = part.partition(" ")
        request = pb.GetProviderConfigRequest(
            view=pb.CONFIG_VIEW_DECRYPTED if view == "decrypted" else pb.CONFIG_VIEW_MASKED
        )
        calls.append((f"{SERVICE_PREFIX}{name}", request if name == "GetProviderConfig" else None))
    return calls


def test_the_role_table_of_docs_security_md_is_what_each_role_may_call() -> None:
    header = next(line for line in SECURITY.splitlines() if line.startswith("| role |"))
    columns = [cell.strip() for cell in header.strip("|").split("|")][1:]
    rows = {
        cells[0].strip("`"): cells[1:]
        for line in SECURITY.splitlines()
        if line.startswith("| `")
        and (cells := [cell.strip() for cell in line.strip("|").split("|")])[0] in {f"`{role}`" for role in ROLES}
    }
    assert sorted(rows) == sorted(ROLES)
    for role, cells in rows.items():
        assert len(cells) == len(columns), role
        for column, cell in zip(columns, cells, strict=True):
            for method, request in _requests_of(column):
                allowed = required_permission(method, request) in ROLES[role]
                assert allowed == (cell == "yes"), (role, column, cell)


def test_docs_api_md_names_every_field_a_violation_can_name() -> None:
    """docs/api.md, Errors: the BadRequest field names; the code's are its FieldViolation literals and paths."""
    api = " ".join((ROOT / "docs" / "api.md").read_text().split())
    listed = api.split("violations name each bad field:", 1)[1].split("`NOT_FOUND` carries", 1)[0]
    documented = {re.sub(r"\[<\w+>\]$|\.<\w+>$", "", name) for name in re.findall(r"`([^`]+)`", listed)}
    code = set(re.findall(r'FieldViolation\(\s*f?"([a-z_]+)', SERVICE_SOURCE))
    code |= set(re.findall(r'\bpath = f"([a-z_]+)\[', SERVICE_SOURCE))
    assert {"clear_fields", "values"} <= code  # the patterns still find them
    assert documented == code


CLIENT_README = (ROOT / "clients" / "python" / "README.md").read_text()


@pytest.mark.parametrize("client", [IntegrationsClient, IntegrationsClientSync], ids=lambda c: c.__name__)
def test_the_client_readme_shows_the_constructors_keywords_and_defaults(client: type) -> None:
    shown = CLIENT_README.split("## Building a client", 1)[1].split("```python\n", 1)[1].split("\n)", 1)[0]
    documented = dict(re.findall(r"^    (\w+)=([^,]+),", shown, re.M))
    parameters = inspect.signature(client).parameters
    keywords = {name: p for name, p in parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert sorted(documented) == sorted(keywords)
    for name, default in documented.items():
        # `clock=time.monotonic`: names a function; the rest are literals.
        code = keywords[name].default
        assert (code is time.monotonic) if default == "time.monotonic" else code == ast.literal_eval(default), name


@pytest.mark.parametrize("provider", PROVIDERS, ids=lambda p: p.id)
def test_the_readme_provider_table_marks_each_fields_secret_required_and_env_var(provider: ProviderSpec) -> None:
    """`| `stripe` | payments | ***`secretKey`*** (`STRIPE_SECRET_KEY`), ...`: `*` secret, `**` required, `***` both."""
    _, category, fields = _cells(README, f"`{provider.id}`")
    assert category.split(",")[0] == provider.category.value
    assert ("UI only" in category) is not provider.runtime_supported
    shown = re.findall(r"(\**)`(\w+)`\**†? \(`(\w+)`\)", fields)
    expected = [("*" * (bool(f.secret) + 2 * bool(f.required)), f.key, f.env_var) for f in provider.fields]
    assert shown == expected


def test_the_sqlstates_docs_operations_md_calls_outages_are_the_stores() -> None:
    operations = (ROOT / "docs" / "operations.md").read_text()
    table = operations.split("| SQLSTATE | meaning | examples |", 1)[1].split("\n\n", 1)[0]
    documented = set(re.findall(r"^\| `(\w+)` \|", table, re.M))
    assert documented == {*postgres._UNAVAILABLE_SQLSTATE_CLASSES, *postgres._UNAVAILABLE_SQLSTATES}
    # "At start-up, `28` and `3D` at the first connection stop the service with a configuration error instead"
    assert set(postgres._CONFIGURATION_SQLSTATE_CLASSES) == {"28", "3D"}
    assert "At start-up, `28` and `3D` at the first connection" in " ".join(operations.split())


@pytest.mark.parametrize("target", ["run", "run-mtls"])
def test_make_run_needs_only_python_as_the_readme_says(target: str) -> None:
    """README: `make run` creates .venv and installs constraints.txt; Node.js is for the tests, not for serving.

    `make -n -B` prints every command the target would run from zero (nothing is run).
    """
    plan = subprocess.run(["make", "-n", "-B", target], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "-c constraints.txt" in plan
    assert "npm" not in plan, f"`make {target}` from zero runs npm:\n{plan}"


def test_the_supervisors_numbers_in_docs_operations_md_are_the_codes() -> None:
    """Worker processes: the kill deadline, the restart backoff and the crash-loop budget, as stated."""
    from integrations_service import supervisor

    text = " ".join((ROOT / "docs" / "operations.md").read_text().split())
    stated = [
        f"after `INTEGRATIONS_SHUTDOWN_GRACE` + {supervisor.STOP_MARGIN:g} s",
        f"backoff ({supervisor.FIRST_BACKOFF:g} s, doubling up to {supervisor.MAX_BACKOFF:g} s; back to "
        f"{supervisor.FIRST_BACKOFF:g} s once a worker has lived {supervisor.STABLE_SECONDS:g} s)",
        f"dies more than {supervisor.RESTART_BUDGET} times within {supervisor.RESTART_WINDOW:g} s",
    ]
    missing = [phrase for phrase in stated if phrase not in text]
    assert not missing, missing
