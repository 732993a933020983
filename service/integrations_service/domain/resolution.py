"""The effective config: each field from the organization, else the environment, else unset.

One exception: once an organization has stored a field that binds the
provider's secrets to an endpoint or account (`FieldSpec.binds_secrets`), none
of that provider's secrets comes from the environment for it. The field-by-field
fallback would otherwise hand the platform's API key or SMTP password to
whatever endpoint the organization names. The other direction stays open: an
organization's own secret may go to the platform's configured endpoint or
account, and non-secret fields always fall back.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import datetime

from integrations_service.domain.masking import mask_secret
from integrations_service.domain.registry import FieldSpec, ProviderSpec


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


def secrets_inherited(spec: ProviderSpec, stored_keys: Collection[str]) -> bool:
    """Whether the provider's secrets may come from the environment: not once a binding field is stored."""
    return spec.binding_keys.isdisjoint(stored_keys)


def _fallback(field: FieldSpec, environment: Mapping[str, str], inherit_secrets: bool) -> str:
    if field.secret and not inherit_secrets:
        return ""
    return environment.get(field.env_var, "")


def resolve_values(
    spec: ProviderSpec,
    organization_values: Mapping[str, str],
    environment: Mapping[str, str],
    view: ConfigView,
) -> dict[str, EffectiveValue]:
    """Every field of the provider, in registry order, shown as `view` asks."""
    # `secrets_inherited` of the keys that hold a value, asked of the few binding keys only.
    inherit_secrets = not any(organization_values.get(key) for key in spec.binding_keys)
    mask = view is ConfigView.MASKED
    resolved: dict[str, EffectiveValue] = {}
    for field in spec.fields:
        if value := organization_values.get(field.key, ""):
            source = ValueSource.ORGANIZATION
        elif value := _fallback(field, environment, inherit_secrets):
            source = ValueSource.ENVIRONMENT
        else:
            source = ValueSource.UNSET
        if field.secret and mask:
            value = mask_secret(value)
        resolved[field.key] = EffectiveValue(value, source, field.secret)
    return resolved


def is_ready(spec: ProviderSpec, stored_keys: frozenset[str], environment: Mapping[str, str]) -> bool:
    """Every required field resolves, under the same rule. Needs only which keys are stored, not their values."""
    inherit_secrets = secrets_inherited(spec, stored_keys)
    return all(
        field.key in stored_keys or bool(_fallback(field, environment, inherit_secrets))
        for field in spec.fields
        if field.required
    )
