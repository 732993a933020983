"""A log-capture secret check over the whole suite.

Every log record any test produces (the service's loggers at DEBUG, every
other logger at WARNING) is formatted, exception text included, and searched
for the suite's encryption keys in every encoding and for anything shaped like
a Stripe secret. A test during which such a record appears fails in its
teardown, naming the logger but not the secret. The focused leak tests in
tests/integration/test_secret_leaks.py plant specific values and also read
subprocess logs; this one keeps every other test honest.
"""

from __future__ import annotations

import base64
import logging
import re
from collections.abc import Iterator

import pytest

from tests.harness import OTHER_KEY, TEST_KEY

# Shapes of secret credentials (publishable keys are public, and format messages quote bare prefixes).
_SHAPES = re.compile(r"\b(?:sk|rk)_(?:test|live)_[A-Za-z0-9]{6,}|\bwhsec_[A-Za-z0-9_]{6,}")


def _key_forms(text: str) -> set[str]:
    raw = base64.b64decode(text)
    return {text, text.rstrip("="), raw.hex(), raw.hex().upper(), base64.urlsafe_b64encode(raw).decode().rstrip("=")}


_KEYS = _key_forms(TEST_KEY) | _key_forms(OTHER_KEY)


def leaked_kinds(text: str) -> list[str]:
    kinds = ["an encryption key" for key in _KEYS if key in text]
    if _SHAPES.search(text):
        kinds.append("a credential-shaped value")
    return kinds


class LeakWatch(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
        self.findings: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record) + " " + " ".join(str(v) for v in record.__dict__.values())
        except Exception:  # a record that cannot be formatted is not this handler's to report
            return
        for kind in leaked_kinds(text):
            self.findings.append(f"{record.name} {record.levelname}: {kind}")


@pytest.fixture(scope="session")
def leak_watch() -> Iterator[LeakWatch]:
    watch = LeakWatch()
    root, ours = logging.getLogger(), logging.getLogger("integrations")
    previous = ours.level
    root.addHandler(watch)
    ours.setLevel(logging.DEBUG)
    yield watch
    root.removeHandler(watch)
    ours.setLevel(previous)


@pytest.fixture(autouse=True)
def no_secret_in_logs(leak_watch: LeakWatch) -> Iterator[None]:
    leak_watch.findings.clear()
    yield
    if leak_watch.findings:
        found = sorted(set(leak_watch.findings))
        pytest.fail("log records of this test hold secrets: " + "; ".join(found), pytrace=False)
