"""The effective config: each field from the organization, else the environment, else unset."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from integrations_service.domain.masking import mask_secret
from integrations_service.domain.registry import ProviderSpec


class ValueSource(enum.Enum):
    ORGANIZATION = "organization"
    ENVIRONMENT = "environment"
    UNSET = "unset"


class ConfigView(enum.Enum):
    MASKED = "masked"
    DECRYPTED = "decrypted"


@dataclass(frozen=True)
class EffectiveValue:
    value: str
    source: ValueSource
    secret: bool


@dataclass(frozen=True)
class EffectiveConfig:
    organization_id: str
    provider: str
    values: Mapping[str, EffectiveValue]
    etag: str
    update_time: datetime | None


def resolve_values(
    spec: ProviderSpec,
    organization_values: Mapping[str, str],
    environment: Mapping[str, str],
    view: ConfigView,
) -> dict[str, EffectiveValue]:
    """Every field of the provider, in registry order, shown as `view` asks."""
    resolved: dict[str, EffectiveValue] = {}
    for field in spec.fields:
        if value := organization_values.get(field.key, ""):
            source = ValueSource.ORGANIZATION
        elif value := environment.get(field.env_var, ""):
            source = ValueSource.ENVIRONMENT
        else:
            source = ValueSource.UNSET
        if field.secret and view is ConfigView.MASKED:
            value = mask_secret(value)
        resolved[field.key] = EffectiveValue(value, source, field.secret)
    return resolved


def is_ready(spec: ProviderSpec, stored_keys: frozenset[str], environment: Mapping[str, str]) -> bool:
    """Every required field resolves. Needs only which keys are stored, not their values."""
    return all(
        field.key in stored_keys or bool(environment.get(field.env_var)) for field in spec.fields if field.required
    )
