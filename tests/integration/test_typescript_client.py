"""The TypeScript client (clients/typescript) against real `integrations-service serve` processes.

Installs its npm dependencies from the lockfile when needed (`make ts-install`),
compiles it with `tsc` (strict; a type error fails here), starts the servers
(plaintext on SQLite and on PostgreSQL, mutual TLS with the `dev-certs`
certificates) and runs its `node --test` suites with the targets and
certificate paths in the environment. Each run must pass exactly the number
of tests below, with none failed, skipped or cancelled: a suite that silently
stops running its tests fails here too. The Next.js files of docs/dashboard.md
are type-checked against the client's real types, and its server actions run
against a real service; so does the watch example of the client's README.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import grpc
import pytest

from tests.conftest import CreateDatabase
from tests.harness import TEST_KEY, new_org
from tests.integration.raw_rows import encrypt_v1, insert_dashboard_row, service_url, tampered
from tests.integration.test_node_interop import node_binary
from tests.integration.test_store_outage import TcpProxy
from tests.leakwatch import leaked_kinds
from tests.processes import Processes, ServeProcess, clean_env, own_store_location, run_cli

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "clients" / "typescript"
COMPILED = PACKAGE / "dist" / "test"
WEBHOOK_DEFAULT = "whsec_typescript_env_default_7777"
NODE_TIMEOUT = 120
DASHBOARD_DOC = ROOT / "docs" / "dashboard.md"
README = PACKAGE / "README.md"

# The `test(...)` count of each suite (clients/typescript/test/*.test.ts): update with the suites.
EXPECTED = {
    "plaintext.test.js": 10,
    "retries.test.js": 6,
    "config.test.js": 6,
    "transport.test.js": 3,
    "mtls.test.js": 9,
    "outage.test.js": 2,
    "watch.test.js": 5,
    "watch-shutdown.test.js": 1,
}


@dataclass(frozen=True)
class NodeRun:
    code: int
    output: str
    summary: dict[str, int]


@pytest.fixture(scope="module")
def compiled() -> Path:
    """The client and its tests compiled by `tsc` (strict), dependencies installed from the lockfile.

    Incremental (tsconfig.json keeps its record in dist/.tsbuildinfo, which `npm run clean` removes
    with the rest of dist): tsc checks again what changed since the last build, and what depends on
    it, and reports the errors of the unchanged files from its record; after `make ts-build` (as in
    `make lint`) or an earlier run this takes seconds instead of a whole compile.
    """
    node_binary()  # skips (or fails, in CI) without Node.js
    tsc_build = [str(PACKAGE / "node_modules" / ".bin" / "tsc"), "-p", "tsconfig.json"]
    for command in (["make", "--no-print-directory", "ts-install"], tsc_build):
        done = subprocess.run(
            command,
            cwd=ROOT if command[0] == "make" else PACKAGE,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert done.returncode == 0, f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout}{done.stderr}"
    return COMPILED


def node(arguments: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Node.js with `arguments` in `cwd`, with only `env` (and what a process needs) in its environment."""
    return subprocess.run(
        [node_binary(), *arguments],
        cwd=cwd,
        env=clean_env(env),
        capture_output=True,
        text=True,
        timeout=NODE_TIMEOUT,
        check=False,
    )


def run_suites(compiled: Path, suites: list[str], env: dict[str, str]) -> NodeRun:
    done = node(["--test", "--test-reporter=tap", *(str(compiled / suite) for suite in suites)], PACKAGE, env)
    output = done.stdout + done.stderr
    summary = {name: int(count) for name, count in re.findall(r"^# (\w+) (\d+)$", done.stdout, flags=re.MULTILINE)}
    return NodeRun(done.returncode, output, summary)


def assert_all_passed(run: NodeRun, suites: list[str]) -> None:
    expected = sum(EXPECTED[suite] for suite in suites)
    failed = "\n".join(line for line in run.output.splitlines() if "not ok" in line or "error:" in line)
    assert run.code == 0, f"node --test exited {run.code}:\n{failed or run.output[-4000:]}"
    counts = {key: run.summary.get(key, -1) for key in ("pass", "fail", "skipped", "cancelled", "todo")}
    assert counts == {"pass": expected, "fail": 0, "skipped": 0, "cancelled": 0, "todo": 0}, run.output[-4000:]


def assert_no_leak(process: ServeProcess) -> None:
    assert leaked_kinds(process.output()) == [], "the service logged a credential during the TypeScript tests"


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    with Processes(tmp_path) as started:
        yield started


def serve_env(tmp_path: Path, database_url: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    return clean_env(
        {
            "INTEGRATION_ENCRYPTION_KEY": TEST_KEY,
            "DATABASE_URL": database_url,
            "INTEGRATIONS_DATA_DIR": str(tmp_path / "data"),
            "INTEGRATIONS_SHUTDOWN_GRACE": "1",
            "STRIPE_WEBHOOK_SECRET": WEBHOOK_DEFAULT,
            **(extra or {}),
        }
    )


@pytest.fixture
def plaintext_server(
    store_location: tuple[str, str], request: pytest.FixtureRequest, processes: Processes, tmp_path: Path
) -> tuple[ServeProcess, str, str]:
    kind, where = own_store_location(store_location, request)
    process = processes.serve(tmp_path / "serve", serve_env(tmp_path, service_url(kind, where)))
    return process, kind, where


async def test_typescript_client_plaintext(compiled: Path, plaintext_server: tuple[ServeProcess, str, str]) -> None:
    process, kind, where = plaintext_server
    # A stored secret the service cannot decrypt (a tampered dashboard-era value): DATA_LOSS.
    broken_org = new_org()
    broken = {"secretKey": tampered(encrypt_v1("sk_test_51HxTypeScriptTampered0000", TEST_KEY))}
    await insert_dashboard_row(kind, where, broken_org, "stripe", broken)
    # Retries, settings and misbehaving sockets do not depend on the store: they run once, on SQLite.
    # The watch runs on both: its events come from the process itself on SQLite, from pg_notify on PostgreSQL.
    per_store = ["plaintext.test.js", "watch.test.js"]
    suites = [*per_store, "retries.test.js", "config.test.js", "transport.test.js"] if kind == "sqlite" else per_store
    env = {
        "ITS_PLAIN_TARGET": process.target,
        "ITS_PLAIN_LOG": str(process.stderr_path),
        "ITS_DATA_LOSS_ORG": broken_org,
        "ITS_WEBHOOK_DEFAULT": WEBHOOK_DEFAULT,
    }
    run = await asyncio.to_thread(run_suites, compiled, suites, env)
    assert_all_passed(run, suites)
    assert_no_leak(process)


def test_typescript_client_watch_shutdown(compiled: Path, processes: Processes, tmp_path: Path) -> None:
    """The suite sends SIGTERM to the server itself, once its watch is live, and sees the stream end."""
    process = processes.serve(tmp_path / "serve", serve_env(tmp_path, f"sqlite:///{tmp_path / 'store.sqlite3'}"))
    suites = ["watch-shutdown.test.js"]
    env = {"ITS_SHUTDOWN_TARGET": process.target, "ITS_SHUTDOWN_PID": str(process.popen.pid)}
    run = run_suites(compiled, suites, env)
    assert_all_passed(run, suites)
    assert process.popen.wait(10) == 0, process.stderr()


@pytest.mark.postgres
async def test_typescript_client_store_outage(
    compiled: Path, processes: Processes, tmp_path: Path, postgres_database_factory: CreateDatabase
) -> None:
    database = urlsplit(await postgres_database_factory())
    proxy = TcpProxy(database.hostname or "127.0.0.1", database.port or 5432)
    await proxy.start()
    userinfo = database.netloc.rpartition("@")[0]
    proxied = urlunsplit(database._replace(netloc=f"{userinfo}@127.0.0.1:{proxy.port}"))
    env = serve_env(tmp_path, proxied, {"INTEGRATIONS_DB_TIMEOUT": "1"})
    try:
        process = await asyncio.to_thread(processes.serve, tmp_path / "serve", env)
    finally:
        await proxy.stop()  # the store is gone from here on; the service keeps answering
    suites = ["outage.test.js"]
    run = await asyncio.to_thread(run_suites, compiled, suites, {"ITS_OUTAGE_TARGET": process.target})
    assert_all_passed(run, suites)


def test_typescript_client_mutual_tls(compiled: Path, processes: Processes, tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    made = run_cli(["dev-certs", "--out", str(certs)], tmp_path, clean_env())
    assert made.returncode == 0, made.stderr
    tls = {
        "INTEGRATIONS_TLS_CERT": str(certs / "server.crt"),
        "INTEGRATIONS_TLS_KEY": str(certs / "server.key"),
        "INTEGRATIONS_TLS_CLIENT_CA": str(certs / "ca.crt"),
        "INTEGRATIONS_AUTHZ_POLICY": str(certs / "policy.toml"),
    }
    health = grpc.ssl_channel_credentials(
        (certs / "ca.crt").read_bytes(), (certs / "admin.key").read_bytes(), (certs / "admin.crt").read_bytes()
    )
    env = serve_env(tmp_path, f"sqlite:///{tmp_path / 'store.sqlite3'}", tls)
    process = processes.serve(tmp_path / "serve", env, credentials=health)
    suites = ["mtls.test.js"]
    run = run_suites(
        compiled,
        suites,
        {
            "ITS_MTLS_TARGET": process.target,
            "ITS_CERTS_DIR": str(certs),
            "ITS_WEBHOOK_DEFAULT": WEBHOOK_DEFAULT,
        },
    )
    assert_all_passed(run, suites)
    assert_no_leak(process)


# What a Next.js project provides around the doc's files: its tsconfig (as `create-next-app` writes
# it), the framework's modules the files use, and the dashboard's own session helper.
DOC_TSCONFIG = """{
  "compilerOptions": {
    "target": "ES2022", "lib": ["dom", "dom.iterable", "esnext"], "module": "esnext",
    "moduleResolution": "bundler", "jsx": "preserve", "strict": true, "noEmit": true,
    "isolatedModules": true, "esModuleInterop": true, "skipLibCheck": true, "paths": {"@/*": ["./*"]}
  },
  "include": ["**/*.ts", "**/*.tsx"]
}
"""
DOC_STUBS = {
    "next-stubs.d.ts": """declare module "server-only" {}
declare module "next/cache" { export function revalidatePath(path: string, type?: "page" | "layout"): void; }
declare module "next/navigation" { export function notFound(): never; }
""",
    "lib/auth.ts": """type Action<T> = (organizationId: string) => Promise<T>;
export async function withActiveOrg<T>(action: Action<T>): Promise<T> {
  return action("org_dashboard_doc");
}
""",
}


def doc_files(doc: Path = DASHBOARD_DOC) -> dict[str, str]:
    """The doc's ```ts/```tsx blocks that start with `// file: <path>`, by path."""
    text = doc.read_text(encoding="utf-8")
    blocks = re.findall(r"^```tsx?\n// file: (\S+)\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)
    return {path: body for path, body in blocks}


def write_doc_project(extra: dict[str, str]) -> Path:
    """The doc's files plus the stubs in a fresh folder inside the package (removed by the caller).

    Inside the package, so that `@integrations/client` resolves to it by its own name, and React's
    types and the client's dependencies resolve from its node_modules.
    """
    files = doc_files()
    assert set(files) == {
        "lib/integrations.ts",
        "app/(dashboard)/integrations/actions.ts",
        "app/(dashboard)/integrations/page.tsx",
        "app/(dashboard)/integrations/[provider]/page.tsx",
        "app/(dashboard)/integrations/[provider]/provider-form.tsx",
    }
    project = Path(tempfile.mkdtemp(prefix=".doccheck-", dir=PACKAGE))
    for name, body in {**files, **DOC_STUBS, **extra}.items():
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text(body, encoding="utf-8")
    return project


def tsc(project: Path, config: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(PACKAGE / "node_modules" / ".bin" / "tsc"), "-p", str(project / config)],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_dashboard_doc_files_type_check(compiled: Path) -> None:
    project = write_doc_project({"tsconfig.json": DOC_TSCONFIG})
    try:
        done = tsc(project, "tsconfig.json")
    finally:
        shutil.rmtree(project)
    assert done.returncode == 0, f"docs/dashboard.md does not type-check:\n{done.stdout}{done.stderr}"


# The doc's server actions, compiled and run under Node against a real service, called the way
# its form calls them. `next/cache` and `server-only` are stand-ins in the project's node_modules;
# `@/` imports are pointed at the compiled files.
DOC_RUN_TSCONFIG = """{
  "compilerOptions": {
    "target": "ES2022", "lib": ["dom", "esnext"], "module": "esnext", "moduleResolution": "bundler",
    "strict": true, "skipLibCheck": true, "paths": {"@/*": ["./*"]}, "outDir": "out", "rootDir": "."
  },
  "files": ["next-stubs.d.ts", "lib/auth.ts", "lib/integrations.ts", "app/(dashboard)/integrations/actions.ts"]
}
"""
DOC_RUN_MODULES = {
    "node_modules/server-only/package.json": '{"name": "server-only", "type": "module", "exports": "./index.js"}',
    "node_modules/server-only/index.js": "export {};\n",
    "node_modules/next/package.json": '{"name": "next", "type": "module", "exports": {"./cache": "./cache.js"}}',
    "node_modules/next/cache.js": (
        "export const revalidated = [];\nexport function revalidatePath(path) { revalidated.push(path); }\n"
    ),
}
DOC_RUN_SCRIPT = Path(__file__).with_name("dashboard_doc_actions.mjs")


async def test_dashboard_doc_server_actions_run(compiled: Path, processes: Processes, tmp_path: Path) -> None:
    process = processes.serve(tmp_path / "serve", serve_env(tmp_path, f"sqlite:///{tmp_path / 'store.sqlite3'}"))
    auth = "export async function withActiveOrg(action) { return action(process.env.DOC_ORGANIZATION); }\n"
    runner = DOC_RUN_SCRIPT.read_text(encoding="utf-8")
    project = write_doc_project({"tsconfig.json": DOC_RUN_TSCONFIG, **DOC_RUN_MODULES, "run.mjs": runner})
    try:
        built = tsc(project, "tsconfig.json")
        assert built.returncode == 0, f"{built.stdout}{built.stderr}"
        out = project / "out"
        (out / "lib" / "auth.js").write_text(auth, encoding="utf-8")
        for compiled_file in out.rglob("*.js"):
            text = compiled_file.read_text(encoding="utf-8")
            text = re.sub(r'from "@/(lib/[a-z]+)"', lambda m: f'from "{(out / m[1]).as_posix()}.js"', text)
            compiled_file.write_text(text, encoding="utf-8")
        done = await run_doc_project(project, process)
    finally:
        shutil.rmtree(project)
    assert done.returncode == 0, f"the doc's server actions failed:\n{done.stdout}{done.stderr}"
    assert "dashboard doc actions: ok" in done.stdout
    assert_no_leak(process)


async def run_doc_project(project: Path, process: ServeProcess) -> subprocess.CompletedProcess[str]:
    """`node run.mjs` in a compiled doc project, against `process`, for a new organization."""
    env = {"INTEGRATIONS_SERVICE_TARGET": process.target, "DOC_ORGANIZATION": new_org()}
    return await asyncio.to_thread(node, ["run.mjs"], project, env)


# The README's watch example, compiled as a Node.js (ESM) project would and run through a proxy
# whose connections the runner cuts, against a real service.
README_RUN_TSCONFIG = """{
  "compilerOptions": {
    "target": "ES2022", "module": "nodenext", "moduleResolution": "nodenext", "types": ["node"],
    "strict": true, "skipLibCheck": true, "outDir": "out", "rootDir": "."
  },
  "files": ["follow-changes.ts"]
}
"""
README_RUN_SCRIPT = Path(__file__).with_name("readme_watch_example.mjs")


async def test_readme_watch_example_runs(compiled: Path, processes: Processes, tmp_path: Path) -> None:
    files = doc_files(README)
    assert set(files) == {"follow-changes.ts"}
    process = processes.serve(tmp_path / "serve", serve_env(tmp_path, f"sqlite:///{tmp_path / 'store.sqlite3'}"))
    project = Path(tempfile.mkdtemp(prefix=".doccheck-", dir=PACKAGE))
    try:
        extra = {"tsconfig.json": README_RUN_TSCONFIG, "run.mjs": README_RUN_SCRIPT.read_text(encoding="utf-8")}
        for name, body in {**files, **extra}.items():
            (project / name).write_text(body, encoding="utf-8")
        built = tsc(project, "tsconfig.json")
        assert built.returncode == 0, f"the README's watch example does not compile:\n{built.stdout}{built.stderr}"
        done = await run_doc_project(project, process)
    finally:
        shutil.rmtree(project)
    assert done.returncode == 0, f"the README's watch example failed:\n{done.stdout}{done.stderr}"
    assert "readme watch example: ok" in done.stdout
    assert "config watch ended, again in ~100 ms: UnavailableError UNAVAILABLE" in done.stderr
    assert_no_leak(process)
