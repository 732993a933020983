"""Reading and writing `integration_config` rows behind the service's back.

What an operator with database access (or the legacy dashboard, or an
attacker with write access) sees and does: raw SQL through asyncpg for
PostgreSQL, the standard `sqlite3` module for the SQLite file. Never the
service's own store classes, so these helpers cannot share a bug with them.

`kind, where` is the `store_location` fixture's value: ("sqlite", file path)
or ("postgres", database URL).

The stored-value formats are implemented here again, from
docs/encryption-format.md and with `cryptography` directly, so the tests check
the service against the documented format rather than against its own code.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import sqlite3
import string
import struct
import uuid
from collections.abc import Mapping
from contextlib import closing
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

V1_PREFIX = "enc:v1:"
V2_PREFIX = "enc:v2:"
# docs/encryption-format.md: a single bare key (INTEGRATION_ENCRYPTION_KEY) has this id.
DEFAULT_KEY_ID = "default"
_V2 = re.compile(r"enc:v2:([a-z0-9_-]{1,32}):(.*)", re.DOTALL)
_V2_INFO = b"integrations-credential-service/value-encryption/v2"
_V2_AAD_LABEL = b"integrations/v2"
_BASE64_ALPHABET = string.ascii_letters + string.digits + "+/"

_SELECT = (
    "SELECT id, organization_id, provider, config, version, created_at, updated_at "
    "FROM integration_config WHERE organization_id = {0} AND provider = {1}"
)


def service_url(kind: str, where: str) -> str:
    return f"sqlite:///{where}" if kind == "sqlite" else where


async def raw_row(kind: str, where: str, organization_id: str, provider: str) -> dict[str, object]:
    """Every column of the row as the database returns it; `config` is the stored JSON text."""
    if kind == "postgres":
        conn = await asyncpg.connect(where)
        try:
            # No codec registered: asyncpg hands jsonb back as its text.
            record = await conn.fetchrow(_SELECT.format("$1", "$2"), organization_id, provider)
        finally:
            await conn.close()
        assert record is not None, f"no row for {organization_id}/{provider}"
        return dict(record.items())

    def read() -> dict[str, object]:
        with closing(sqlite3.connect(where)) as conn:
            conn.row_factory = sqlite3.Row
            row = conn.execute(_SELECT.format("?", "?"), (organization_id, provider)).fetchone()
        assert row is not None, f"no row for {organization_id}/{provider}"
        return {key: row[key] for key in row.keys()}  # noqa: SIM118 (sqlite3.Row is not a mapping)

    return await asyncio.to_thread(read)


def row_text(row: Mapping[str, object]) -> str:
    """The whole row as one string: what a database dump would show of it."""
    return " | ".join(str(value) for value in row.values())


async def stored_config(kind: str, where: str, organization_id: str, provider: str) -> dict[str, str]:
    config = json.loads(str((await raw_row(kind, where, organization_id, provider))["config"]))
    assert isinstance(config, dict)
    return config


async def overwrite_config(
    kind: str, where: str, organization_id: str, provider: str, config: Mapping[str, str]
) -> None:
    """Replace the stored config in place (no version bump: the dashboard and an attacker do not bump it)."""
    text = json.dumps(dict(config))
    if kind == "postgres":
        conn = await asyncpg.connect(where)
        try:
            status = await conn.execute(
                "UPDATE integration_config SET config = $3::jsonb WHERE organization_id = $1 AND provider = $2",
                organization_id,
                provider,
                text,
            )
        finally:
            await conn.close()
        assert status == "UPDATE 1"
        return

    def write() -> None:
        with closing(sqlite3.connect(where)) as conn, conn:
            cursor = conn.execute(
                "UPDATE integration_config SET config = ? WHERE organization_id = ? AND provider = ?",
                (text, organization_id, provider),
            )
            assert cursor.rowcount == 1

    await asyncio.to_thread(write)


async def insert_dashboard_row(
    kind: str, where: str, organization_id: str, provider: str, config: Mapping[str, str]
) -> None:
    """A row written the way the dashboard writes it: its own columns only, timestamps now()."""
    await insert_raw_config(kind, where, organization_id, provider, json.dumps(dict(config)))


async def insert_raw_config(kind: str, where: str, organization_id: str, provider: str, text: str) -> None:
    """Like insert_dashboard_row, but `config` is the JSON text as given (which need not be an object)."""
    row_id = str(uuid.uuid4())
    if kind == "postgres":
        conn = await asyncpg.connect(where)
        try:
            await conn.execute(
                "INSERT INTO integration_config (id, organization_id, provider, config, created_at, updated_at) "
                "VALUES ($1, $2, $3, $4::jsonb, now(), now())",
                row_id,
                organization_id,
                provider,
                text,
            )
        finally:
            await conn.close()
        return

    def write() -> None:
        with closing(sqlite3.connect(where)) as conn, conn:
            conn.execute(
                "INSERT INTO integration_config (id, organization_id, provider, config, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now'), "
                "strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now'))",
                (row_id, organization_id, provider, text),
            )

    await asyncio.to_thread(write)


# --- the documented formats, independently of the service's crypto module -------------------------


def master_key(text: str) -> bytes:
    text = text.strip()
    material = (
        bytes.fromhex(text)
        if re.fullmatch(r"[0-9a-fA-F]{64}", text)
        else base64.b64decode(text.replace("-", "+").replace("_", "/"), validate=True)
    )
    assert len(material) == 32
    return material


def _v2_subkey(key_text: str) -> bytes:
    return HKDF(algorithm=SHA256(), length=32, salt=None, info=_V2_INFO).derive(master_key(key_text))


def _v2_aad(key_id: str, organization_id: str, provider: str, field: str) -> bytes:
    parts = [part.encode() for part in (key_id, organization_id, provider, field)]
    return _V2_AAD_LABEL + b"".join(struct.pack(">I", len(part)) + part for part in parts)


def encrypt_v1(plaintext: str, key_text: str) -> str:
    """The dashboard's format: AES-256-GCM under the master key itself, no associated data."""
    nonce = os.urandom(12)
    sealed = AESGCM(master_key(key_text)).encrypt(nonce, plaintext.encode(), None)
    return V1_PREFIX + base64.b64encode(nonce + sealed).decode()


def encrypt_v2(plaintext: str, key_text: str, key_id: str, organization_id: str, provider: str, field: str) -> str:
    nonce = os.urandom(12)
    aad = _v2_aad(key_id, organization_id, provider, field)
    sealed = AESGCM(_v2_subkey(key_text)).encrypt(nonce, plaintext.encode(), aad)
    return f"{V2_PREFIX}{key_id}:" + base64.b64encode(nonce + sealed).decode()


DOC = Path(__file__).resolve().parents[2] / "docs" / "encryption-format.md"


def documented_write_prefix() -> str:
    """The prefix of the format the doc says the service writes (its heading says "written by this service").

    A doc without such a heading predates enc:v2, when the service wrote the dashboard's enc:v1.
    """
    heading = re.search(
        r"^#+ `(enc:v\d+:)`[^\n]*written by this service", DOC.read_text(encoding="utf-8"), flags=re.MULTILINE
    )
    return heading[1] if heading else V1_PREFIX


def is_encrypted(stored: str) -> bool:
    """Written in one of the documented encrypted formats (not plaintext, not an unknown version)."""
    return stored.startswith(V1_PREFIX) or _V2.fullmatch(stored) is not None


def decrypt(stored: str, key_text: str, organization_id: str, provider: str, field: str) -> str:
    """Read a stored string as the doc says; raises (cryptography's InvalidTag, ValueError) when it cannot."""
    if stored.startswith(V1_PREFIX):
        blob = base64.b64decode(stored[len(V1_PREFIX) :], validate=True)
        return AESGCM(master_key(key_text)).decrypt(blob[:12], blob[12:], None).decode()
    match = _V2.fullmatch(stored)
    if match is None:
        raise ValueError(f"not an encrypted value of a documented format: {stored[:12]!r}…")
    blob = base64.b64decode(match[2], validate=True)
    aad = _v2_aad(match[1], organization_id, provider, field)
    return AESGCM(_v2_subkey(key_text)).decrypt(blob[:12], blob[12:], aad).decode()


def reencrypted(stored: str, key_text: str, organization_id: str, provider: str, field: str, plaintext: str) -> str:
    """`plaintext` in the same format (and key id) as `stored`, but under the key `key_text`."""
    if stored.startswith(V1_PREFIX):
        return encrypt_v1(plaintext, key_text)
    match = _V2.fullmatch(stored)
    assert match is not None
    return encrypt_v2(plaintext, key_text, match[1], organization_id, provider, field)


def blob_offset(stored: str) -> int:
    """Where the base64 blob of a stored string starts."""
    if stored.startswith(V1_PREFIX):
        return len(V1_PREFIX)
    match = _V2.fullmatch(stored)
    assert match is not None, stored
    return match.start(2)


def tampered(stored: str) -> str:
    """The stored string with one base64 character of the nonce changed: still valid base64, wrong bytes.

    Position 8 of the blob text lies inside the 12-byte nonce, so the change always
    alters decoded bytes (unlike the last character, whose low bits may be padding).
    """
    start = blob_offset(stored)
    position = start + 8
    old = stored[position]
    new = _BASE64_ALPHABET[(_BASE64_ALPHABET.index(old) + 1) % len(_BASE64_ALPHABET)]
    changed = stored[:position] + new + stored[position + 1 :]
    assert base64.b64decode(changed[start:], validate=True) != base64.b64decode(stored[start:], validate=True)
    return changed
