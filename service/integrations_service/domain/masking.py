"""How secrets look outside the decrypted view."""

from __future__ import annotations

MASK_CHAR = "•"
# A fixed-width mask: the masked text tells nothing about the secret's length.
MASK = MASK_CHAR * 8
VISIBLE_TAIL = 4
# Below this length even 4 characters would reveal too much of the secret.
MIN_LENGTH_FOR_TAIL = 12


def mask_secret(value: str, *, show_tail: bool = True) -> str:
    """At most the last 4 characters, none when the secret is under 12 characters or `show_tail` is false.

    `show_tail=False` is for the platform's secrets (the environment's), which every tenant's masked view
    would show: a tenant learns nothing of them, not even their last 4 characters."""
    if not value:
        return ""
    if not show_tail or len(value) < MIN_LENGTH_FOR_TAIL:
        return MASK
    return MASK + value[-VISIBLE_TAIL:]
