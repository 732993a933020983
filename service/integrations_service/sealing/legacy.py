"""What the service does with legacy stored values: plaintext and the dashboard's `enc:v1:`.

Neither is bound to its row: anyone who can write the table can plant a
plaintext value, or move a v1 value between organizations, and it reads as
genuine. `read` serves them (what a migration from the dashboard needs);
`refuse` treats them like tampered ciphertext once `rotate` has rewritten them
all as `enc:v2:`. Either way each one is counted, by format and provider.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

LEGACY_VALUES_ENV = "INTEGRATIONS_LEGACY_VALUES"

# (format, provider): both bounded sets, safe as metric labels.
Count = Callable[[str, str], None]


class LegacyValues(enum.Enum):
    READ = "read"
    REFUSE = "refuse"


def _uncounted(legacy_format: str, provider: str) -> None:
    del legacy_format, provider


@dataclass(frozen=True)
class LegacyPolicy:
    mode: LegacyValues = LegacyValues.READ
    count_read: Count = _uncounted
    count_refused: Count = _uncounted

    @property
    def refuses(self) -> bool:
        return self.mode is LegacyValues.REFUSE


def refusal_reason(legacy_format: str) -> str:
    """The CorruptCredential reason for a refused value: says which format, never the value."""
    what = "plaintext" if legacy_format == "plaintext" else f"enc:{legacy_format}"
    return f"a legacy {what} value, refused because {LEGACY_VALUES_ENV}=refuse"
