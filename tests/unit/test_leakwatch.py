"""The suite-wide log check (tests/leakwatch.py) recognises what it must, and only that."""

from __future__ import annotations

import base64

import pytest

from tests.harness import TEST_KEY
from tests.leakwatch import leaked_kinds

RAW_KEY = base64.b64decode(TEST_KEY)


@pytest.mark.parametrize(
    "text",
    [
        "saved sk_live_51HxAbCdEfGhIjKl",
        "rk_test_restricted123",
        "whsec_environment_default_7777",
        f"key={TEST_KEY}",
        f"key={RAW_KEY.hex()}",
        f"key={base64.urlsafe_b64encode(RAW_KEY).decode()}",
    ],
)
def test_secrets_are_found(text: str) -> None:
    assert leaked_kinds(text)


@pytest.mark.parametrize(
    "text",
    [
        "values.secretKey: must start with 'sk_test_' or 'sk_live_' or 'rk_test_' or 'rk_live_'",
        "values.webhookSecret: must start with 'whsec_'",
        "pk_test_51HxPublishable0001 is public",
        "secretKey ••••••••4242",
        "enc:v2:default:AAAAAAAAAAAAAAAA49jqg6sIRG7hsbh6pEEO6m7MPUINqdafqo0C1nQvGtqQK/HI6egvkcDXmW/x0Hg4",
    ],
)
def test_ordinary_log_text_is_not_flagged(text: str) -> None:
    assert leaked_kinds(text) == []
