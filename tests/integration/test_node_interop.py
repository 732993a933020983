"""The TypeScript snippet of docs/encryption-format.md, run under Node.js, reads what the service wrote.

The test takes the ```ts block from the doc itself, strips its type annotations
into plain JavaScript for Node 20, and runs it with `node` on values read from
the raw rows after real SaveIntegration calls. Change the doc's code or the
service's format and this test sees it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from integrations.v1 import integrations_pb2 as pb
from tests.harness import OTHER_KEY, TEST_KEY, Running, new_org, start_service
from tests.integration.raw_rows import (
    DEFAULT_KEY_ID,
    V2_PREFIX,
    blob_offset,
    decrypt,
    documented_write_prefix,
    encrypt_v1,
    is_encrypted,
    reencrypted,
    service_url,
    stored_config,
    tampered,
)

DOC = Path(__file__).resolve().parents[2] / "docs" / "encryption-format.md"
FUNCTION_NAME = "decryptValue"
NODE_TIMEOUT = 20.0

SAVED = {
    "stripe": {"secretKey": "sk_test_51HxNodeInterop0000004242", "publishableKey": "pk_test_51HxNodeInterop0001"},
    # Non-ASCII: Node must decode the same UTF-8 bytes.
    "ifthenpay": {"antiPhishingKey": "pässwörd ✓ 日本 🔑 anti-phishing", "mbKey": "MB-NODE-000123"},
}

# stdin: {"keys": {key id: base64}, "values": [{"stored", "organizationId", "provider", "field"}]}.
# stdout: one {"ok": clear} or {"error": message} per value. The doc's function is called with
# what its signature asks for: (stored, key) in the one-key version of the doc, or
# (stored, keys by id, context) once values are bound to their organization, provider and field.
HARNESS = f"""\
import {{ {FUNCTION_NAME} }} from "./doc-snippet.mjs";

let input = "";
for await (const chunk of process.stdin) input += chunk;
const request = JSON.parse(input);
const keys = new Map(Object.entries(request.keys).map(([id, key]) => [id, Buffer.from(key, "base64")]));
const results = request.values.map(({{ stored, organizationId, provider, field }}) => {{
  try {{
    const clear = {FUNCTION_NAME}.length === 2
      ? {FUNCTION_NAME}(stored, keys.get("{DEFAULT_KEY_ID}"))
      : {FUNCTION_NAME}(stored, keys, {{ organizationId, provider, field }});
    return typeof clear === "string" ? {{ ok: clear }} : {{ error: `returned ${{typeof clear}}` }};
  }} catch (error) {{
    return {{ error: String((error && error.message) || error) }};
  }}
}});
process.stdout.write(JSON.stringify(results));
"""


def node_binary() -> str:
    node = shutil.which("node")
    if node is None:
        reason = "`node` is not on PATH: cannot check that docs/encryption-format.md's TypeScript snippet works"
        if os.environ.get("CI"):
            pytest.fail(f"CI is set, so the Node.js interop test must run: {reason}", pytrace=False)
        pytest.skip(f"SKIPPING NODE INTEROP: {reason} (install Node.js 20+)")
    return node


def doc_typescript() -> str:
    blocks = re.findall(r"^```ts\n(.*?)^```", DOC.read_text(encoding="utf-8"), flags=re.MULTILINE | re.DOTALL)
    assert len(blocks) == 1, f"expected exactly one ```ts block in {DOC.name}, found {len(blocks)}"
    return str(blocks[0])


# --- TypeScript → JavaScript: just the syntax the doc's snippet uses -------------------------------

_PLACEHOLDER = "\x00{}\x00"
# A `/` opens a regular expression literal (rather than dividing) after one of these, or first.
_REGEX_MAY_FOLLOW = frozenset("(,=:[!&|?{};+-*%<>~^\n")


def _protect(source: str) -> tuple[str, list[str]]:
    """Replace strings, templates, regexes and comments by placeholders: type stripping never touches them."""
    kept: list[str] = []
    out: list[str] = []
    last = "\n"  # the last character of code that is not a space
    i = 0
    while i < len(source):
        char = source[i]
        end = None
        if source.startswith("//", i):
            end = source.find("\n", i) if "\n" in source[i:] else len(source)
        elif source.startswith("/*", i):
            end = source.index("*/", i) + 2
        elif char in "\"'`" or (char == "/" and last in _REGEX_MAY_FOLLOW):
            j, in_class = i + 1, False
            while source[j] != char or in_class:
                if source[j] == "\\":
                    j += 1
                elif char == "/" and source[j] in "[]":
                    in_class = source[j] == "["
                j += 1
            end = j + 1
            while char == "/" and end < len(source) and source[end].isalpha():  # regex flags
                end += 1
        if end is None:
            out.append(char)
            last = char if not char.isspace() or char == "\n" else last
            i += 1
        else:
            out.append(_PLACEHOLDER.format(len(kept)))
            kept.append(source[i:end])
            last = "a"  # a literal is an operand: a `/` after it divides
            i = end
    return "".join(out), kept


def _closing(code: str, start: int) -> int:
    """Index of the bracket that closes the one at `start`."""
    pairs = {"(": ")", "{": "}", "[": "]", "<": ">"}
    opening, depth = code[start], 0
    for index in range(start, len(code)):
        depth += code[index] == opening
        depth -= code[index] == pairs[opening]
        if depth == 0:
            return index
    raise AssertionError(f"unbalanced {opening} in the doc's ts block")


def _split_top_level(text: str, separator: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for char in text:
        depth += char in "<([{"
        depth -= char in ">)]}"
        if char == separator and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return [*parts, current]


def _strip_parameters(parameters: str) -> str:
    """`a: T, b?: U = x` → `a, b = x`."""
    stripped = []
    for parameter in _split_top_level(parameters, ","):
        declared, *default = _split_top_level(parameter, "=")
        name = declared.split(":", 1)[0].rstrip().removesuffix("?")
        stripped.append(name + (" =" + "=".join(default) if default else ""))
    return ",".join(stripped)


def _end_of_type_alias(code: str, start: int) -> int:
    """Index just after a `type X = …` declaration that starts its body at `start`."""
    index = start
    while index < len(code):
        if code[index] in "{([<":
            index = _closing(code, index)
        elif code[index] == ";":
            return index + 1
        elif (
            code[index] == "\n"
            and code[start:index].strip()
            and not code[start:index].rstrip().endswith(("|", "&", "="))
        ):
            return index
        index += 1
    return index


_SIGNATURE = re.compile(r"\bfunction\s*\w*\s*(?:<[^>]*>)?\s*\(|\((?=[^()]*\)\s*(?::[^=;{}]+)?=>)")
_RETURN_TYPE = re.compile(r"\s*:\s*[^{=;]+?(?=\s*(?:\{|=>))")


def typescript_to_javascript(source: str) -> str:
    """Strip the TypeScript the doc's snippet uses, leaving plain JavaScript for Node 20.

    Type aliases, interfaces, `import type`, annotations of parameters, return
    types and variables, non-null assertions and `as` casts, outside strings,
    regexes and comments. Syntax it does not cover makes Node fail to parse, and
    the test fails with Node's message: never a silent pass.
    """
    code, kept = _protect(source)
    code = re.sub(r"^[ \t]*import\s+type\b[^;\n]*;?[ \t]*$", "", code, flags=re.MULTILINE)
    while alias := re.search(r"^[ \t]*(?:export\s+)?type\s+\w+\s*(?:<[^>]*>)?\s*=", code, flags=re.MULTILINE):
        code = code[: alias.start()] + code[_end_of_type_alias(code, alias.end()) :]
    while interface := re.search(r"^[ \t]*(?:export\s+)?interface\s+\w+[^{]*\{", code, flags=re.MULTILINE):
        code = code[: interface.start()] + code[_closing(code, interface.end() - 1) + 1 :]
    position = 0
    while signature := _SIGNATURE.search(code, position):
        open_index = signature.end() - 1
        close_index = _closing(code, open_index)
        head = re.sub(r"\s*<[^>]*>\s*\($", "(", code[signature.start() : open_index + 1])
        rest = code[close_index + 1 :]
        if returns := _RETURN_TYPE.match(rest):
            rest = rest[returns.end() :]
        rebuilt = head + _strip_parameters(code[open_index + 1 : close_index]) + ")"
        code = code[: signature.start()] + rebuilt + rest
        position = signature.start() + len(rebuilt)
    code = re.sub(r"\b(const|let|var)\s+(\w+)\s*:\s*[^=;]+=", r"\1 \2 =", code)
    code = re.sub(r"(?<=[\w)\]])!(?!=)", "", code)  # non-null assertions: x!, f()!, a[0]!
    code = re.sub(r"\s+as\s+(?:const|[\w.]+(?:<[^<>]*>)?(?:\[\])*)(?=[\s,;)\]}])", "", code)
    return re.sub("\x00(\\d+)\x00", lambda m: kept[int(m.group(1))], code)


# --- running Node --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def node() -> str:
    return node_binary()


def write_harness(folder: Path, typescript: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "doc-snippet.mjs").write_text(typescript_to_javascript(typescript), encoding="utf-8")
    (folder / "harness.mjs").write_text(HARNESS, encoding="utf-8")
    return folder / "harness.mjs"


@pytest.fixture
def node_script(tmp_path: Path) -> Path:
    typescript = doc_typescript()
    assert re.search(rf"\bexport\s+function\s+{FUNCTION_NAME}\s*\(", typescript), (
        f"the doc's ts block no longer exports {FUNCTION_NAME}"
    )
    return write_harness(tmp_path / "node", typescript)


async def run_node(node: str, script: Path, stdin: bytes) -> tuple[int, bytes, bytes]:
    process = await asyncio.create_subprocess_exec(
        node,
        str(script),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=script.parent,
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(stdin), NODE_TIMEOUT)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return process.returncode, stdout, stderr


async def node_decrypt(
    node: str, script: Path, values: list[dict[str, str]], keys: dict[str, str] | None = None
) -> list[dict[str, str]]:
    request = {"keys": keys or {DEFAULT_KEY_ID: TEST_KEY}, "values": values}
    code, stdout, stderr = await run_node(node, script, json.dumps(request).encode())
    assert code == 0, f"node failed ({code}):\n{stderr.decode(errors='replace')}"
    results = json.loads(stdout)
    assert isinstance(results, list)
    assert len(results) == len(values)
    return results


def entry(stored: str, organization_id: str, provider: str, field: str) -> dict[str, str]:
    return {"stored": stored, "organizationId": organization_id, "provider": provider, "field": field}


# --- the service's values ------------------------------------------------------------------------


@pytest.fixture
async def located(store_location: tuple[str, str], tmp_path: Path) -> AsyncIterator[tuple[Running, str, str]]:
    kind, where = store_location
    running = await start_service(service_url(kind, where), tmp_path / "data")
    yield running, kind, where
    await running.close()


async def saved_values(svc: Running, kind: str, where: str) -> tuple[list[dict[str, str]], list[str]]:
    """(stored strings from the raw rows with where they sit, their plaintexts), after real saves."""
    org = new_org()
    entries: list[dict[str, str]] = []
    clear: list[str] = []
    for provider, values in SAVED.items():
        await svc.stub.SaveIntegration(pb.SaveIntegrationRequest(organization_id=org, provider=provider, values=values))
        row = await stored_config(kind, where, org, provider)
        for key, plaintext in values.items():
            assert is_encrypted(row[key]), row[key]
            assert row[key].startswith(documented_write_prefix()), row[key]
            entries.append(entry(row[key], org, provider, key))
            clear.append(plaintext)
    return entries, clear


async def test_node_decrypts_what_the_service_stored(
    located: tuple[Running, str, str], node: str, node_script: Path
) -> None:
    svc, kind, where = located
    entries, clear = await saved_values(svc, kind, where)
    results = await node_decrypt(node, node_script, entries)
    assert results == [{"ok": value} for value in clear]


async def test_node_rejects_tampered_foreign_truncated_and_moved_values(
    located: tuple[Running, str, str], node: str, node_script: Path
) -> None:
    svc, kind, where = located
    entries, clear = await saved_values(svc, kind, where)
    first, second = entries[0], entries[2]
    stored = first["stored"]
    where_first = (first["organizationId"], first["provider"], first["field"])
    start = blob_offset(stored)
    blob = base64.b64decode(stored[start:])
    bad = {
        "tampered": entry(tampered(stored), *where_first),
        "tampered, other provider": {**second, "stored": tampered(second["stored"])},
        "under another key": entry(reencrypted(stored, OTHER_KEY, *where_first, clear[0]), *where_first),
        "truncated": entry(stored[:start] + base64.b64encode(blob[:-1]).decode(), *where_first),
        "unknown version": entry("enc:v9:" + stored[start:], *where_first),
    }
    if documented_write_prefix() == V2_PREFIX:  # v2 binds a value to its organization, provider and field
        bad["moved to another field"] = {**first, "field": "webhookSecret"}
        bad["moved to another organization"] = {**first, "organizationId": new_org()}
    # A good value in the same run: the harness works, so the refusals are the snippet's own.
    results = await node_decrypt(node, node_script, [*bad.values(), entries[1]])
    assert results[-1] == {"ok": clear[1]}
    for (name, value), result in zip(bad.items(), results[:-1], strict=True):
        assert set(result) == {"error"}, f"Node accepted a {name} value {value['stored']!r}: {result}"
        # The documented format refuses each of them too.
        with pytest.raises(Exception):  # noqa: B017, PT011 (InvalidTag or ValueError, by case)
            decrypt(value["stored"], TEST_KEY, value["organizationId"], value["provider"], value["field"])


async def test_node_reads_dashboard_values_and_legacy_plaintext(node: str, node_script: Path) -> None:
    """The doc's table: enc:v1 values under the dashboard's key, and plaintext returned as it is."""
    org = new_org()
    values = ["sk_test_dashboardEncrypted0001", "whsec_legacyPlaintext0002"]
    results = await node_decrypt(
        node,
        node_script,
        [
            entry(encrypt_v1(values[0], TEST_KEY), org, "stripe", "secretKey"),
            entry(values[1], org, "stripe", "webhookSecret"),
        ],
    )
    assert results == [{"ok": value} for value in values]


def doc_test_vectors() -> tuple[dict[str, str], list[tuple[dict[str, str], str]]]:
    """(keys by id, [(value entry, plaintext)]) from the doc's test-vector tables."""
    text = DOC.read_text(encoding="utf-8")
    key_hex = re.search(r"[Kk]ey \(hex\) `([0-9a-fA-F]{64})`", text)
    assert key_hex, "the doc names no test-vector key"
    key = base64.b64encode(bytes.fromhex(key_hex[1])).decode()
    keys = {DEFAULT_KEY_ID: key}
    if key_id := re.search(r"Key id `([a-z0-9_-]{1,32})`", text):
        keys[key_id[1]] = key
    vectors = []
    for table in re.findall(r"<!-- test-vectors:v\d+ -->\n(.*?)<!-- /test-vectors", text, flags=re.DOTALL):
        header, _, *rows = [line.strip().strip("|").split("|") for line in table.strip().splitlines()]
        columns = [cell.strip() for cell in header]
        for row in rows:
            cells = dict(zip(columns, (cell.strip().strip("`") for cell in row), strict=True))
            context = next((json.loads(v) for k, v in cells.items() if k.startswith("organization")), ["", "", ""])
            plaintext = json.loads(cells["plaintext (JSON string)"])
            vectors.append((entry(cells["stored"], *context), plaintext))
    assert vectors, "the doc has no test vectors"
    return keys, vectors


async def test_node_decrypts_the_docs_own_test_vectors(node: str, node_script: Path) -> None:
    keys, vectors = doc_test_vectors()
    results = await node_decrypt(node, node_script, [value for value, _ in vectors], keys=keys)
    assert results == [{"ok": plaintext} for _, plaintext in vectors]
    # The tests' own reading of the format (tests/integration/raw_rows.py) agrees with the doc.
    key = keys[DEFAULT_KEY_ID]  # every key id of the vectors names this one key
    for value, plaintext in vectors:
        assert decrypt(value["stored"], key, value["organizationId"], value["provider"], value["field"]) == plaintext


async def test_the_type_stripping_keeps_the_javascript_intact(node: str, tmp_path: Path) -> None:
    """The stripper on the TypeScript features it claims to handle; strings and regexes keep their colons."""
    typescript = """
import { createHash } from "node:crypto";
type Context = { organizationId: string; provider: string };
interface Options { strict?: boolean; }
const label: string = "a: string, b!: c"; // comment: Buffer
function frame<T>(parts: Array<T>, ctx: Context | null, sep: string = ":"): string {
  const m = /^enc:v2:([a-z]+):(.*)$/s.exec("enc:v2:abc:rest")!;
  const mapped = parts.map((p: T): string => String(p) as string);
  return [label, m[1], ctx!.provider, ...mapped].join(sep) + createHash("sha256").update("x").digest("hex").length / 2;
}
export function decryptValue(stored: string, keys: Map<string, Buffer>, ctx: Context): string {
  return frame([stored, String(keys.size)], ctx);
}
"""
    script = write_harness(tmp_path / "stripper", typescript)
    results = await node_decrypt(node, script, [entry("v", "org", "prov", "f")], keys={"k": TEST_KEY})
    assert results == [{"ok": "a: string, b!: c:abc:prov:v:132"}]
