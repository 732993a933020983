"""The sealing layer's rules, without a store: what a save stores, what a read gets, what it refuses."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime

import pytest

from integrations_service.crypto import EncryptionKey, Keyring, ValueCipher, ValueContext, seal_v1
from integrations_service.errors import CorruptConfig, CorruptCredential
from integrations_service.sealing import LegacyPolicy, LegacyValues, Sealer, Target
from integrations_service.store import StoredIntegration, StoredValue, UnreadableConfig

KEY_OLD, KEY_NEW = EncryptionKey.generate(), EncryptionKey.generate()
TARGET = Target("org_1", "stripe")
FIELDS = frozenset({"secretKey", "publishableKey", "webhookSecret"})
SK = "sk_test_51SealingUnitTest0001"
PK = "pk_test_51SealingUnitTest0001"


def cipher(*keys: tuple[str, EncryptionKey]) -> ValueCipher:
    return ValueCipher(Keyring(list(keys) or [("new", KEY_NEW)]))


def row(config: dict[str, StoredValue] | UnreadableConfig) -> StoredIntegration:
    now = datetime.now(UTC)
    return StoredIntegration("row_1", TARGET.organization_id, TARGET.provider, config, 1, now, now)


def test_seal_then_unseal_gives_the_values_back_and_the_store_sees_no_clear_text() -> None:
    sealer = Sealer(cipher())
    stored = sealer.seal({"secretKey": SK, "publishableKey": PK}, TARGET)
    assert all(value.startswith("enc:v2:new:") for value in stored.values())
    assert SK not in "".join(stored.values())
    assert sealer.unseal(row(stored), FIELDS) == {"secretKey": SK, "publishableKey": PK}


def test_unseal_decrypts_only_the_fields_asked_for() -> None:
    sealer = Sealer(cipher())
    stored = sealer.seal({"secretKey": SK}, TARGET) | {"publishableKey": StoredValue("enc:v2:new:not-base64!")}
    assert sealer.unseal(row(stored), {"secretKey"}) == {"secretKey": SK}


def test_a_value_moved_to_another_field_or_organization_is_refused() -> None:
    sealer = Sealer(cipher())
    sealed = sealer.seal({"secretKey": SK}, Target("org_2", "stripe"))["secretKey"]
    with pytest.raises(CorruptCredential) as refused:
        sealer.unseal(row({"secretKey": sealed}), FIELDS)
    assert refused.value.fields == ("secretKey",)


def test_unseal_names_every_broken_field_and_never_a_value() -> None:
    sealer = Sealer(cipher())
    good = sealer.seal({"secretKey": SK}, TARGET)
    broken = {"publishableKey": StoredValue("enc:v2:new:AAAA"), "webhookSecret": StoredValue("enc:v2:gone:AAAA")}
    with pytest.raises(CorruptCredential) as refused:
        sealer.unseal(row(good | broken), FIELDS)
    assert list(refused.value.fields) == ["publishableKey", "webhookSecret"]
    assert SK not in str(refused.value)


def test_an_unreadable_config_is_refused_whole() -> None:
    with pytest.raises(CorruptConfig, match="is not a JSON object"):
        Sealer(cipher()).unseal(row(UnreadableConfig("is not a JSON object")), FIELDS)
    assert not Sealer(cipher()).readable(row(UnreadableConfig("is not a JSON object")), FIELDS)


def test_legacy_values_are_read_and_counted_or_refused_by_policy() -> None:
    v1 = StoredValue(seal_v1(KEY_OLD, SK, b"\x01" * 12))
    legacy = {"secretKey": v1, "publishableKey": StoredValue(PK)}
    reads, refusals = Counter[str](), Counter[str]()
    keys = cipher(("new", KEY_NEW), ("default", KEY_OLD))

    def counting(mode: LegacyValues) -> Sealer:
        policy = LegacyPolicy(
            mode,
            count_read=lambda fmt, provider: reads.update([f"{fmt}/{provider}"]),
            count_refused=lambda fmt, provider: refusals.update([f"{fmt}/{provider}"]),
        )
        return Sealer(keys, policy)

    assert counting(LegacyValues.READ).unseal(row(legacy), FIELDS) == {"secretKey": SK, "publishableKey": PK}
    assert reads == {"v1/stripe": 1, "plaintext/stripe": 1}

    refusing = counting(LegacyValues.REFUSE)
    assert sorted(refusing.refused_fields(row(legacy), FIELDS)) == ["publishableKey", "secretKey"]
    with pytest.raises(CorruptCredential, match="INTEGRATIONS_LEGACY_VALUES=refuse") as refused:
        refusing.unseal(row(legacy), FIELDS)
    assert list(refused.value.fields) == ["publishableKey", "secretKey"]
    assert refusals == {"v1/stripe": 1, "plaintext/stripe": 1}


def test_merge_keeps_untouched_ciphertext_and_never_carries_plaintext_back() -> None:
    sealer = Sealer(cipher())
    kept_ciphertext = sealer.seal({"secretKey": SK}, TARGET)["secretKey"]
    current = row({"secretKey": kept_ciphertext, "publishableKey": StoredValue(PK), "webhookSecret": StoredValue("x")})
    kept_clear = sealer.unseal(current, FIELDS - {"webhookSecret"})

    stored = sealer.merge(current, kept_clear, {}, {"webhookSecret"}, TARGET)

    assert stored["secretKey"] == kept_ciphertext  # not re-encrypted
    assert stored["publishableKey"].startswith("enc:v2:new:")  # legacy plaintext now sealed
    assert "webhookSecret" not in stored  # cleared
    assert sealer.unseal(row(stored), FIELDS) == {"secretKey": SK, "publishableKey": PK}


def test_reseal_moves_a_value_to_the_active_key_only() -> None:
    old = Sealer(cipher(("old", KEY_OLD)))
    stored = old.seal({"secretKey": SK}, TARGET)["secretKey"]
    rotated = Sealer(cipher(("new", KEY_NEW), ("old", KEY_OLD)))
    assert not rotated.is_current(stored)

    resealed = rotated.reseal(stored, ValueContext(TARGET.organization_id, TARGET.provider, "secretKey"))

    assert rotated.is_current(resealed)
    assert Sealer(cipher(("new", KEY_NEW))).unseal(row({"secretKey": resealed}), FIELDS) == {"secretKey": SK}


def test_fingerprints_correlate_values_without_holding_them() -> None:
    sealer = Sealer(cipher())
    first, again = sealer.fingerprints({"secretKey": SK}), sealer.fingerprints({"secretKey": SK})
    assert first == again
    assert SK not in first["secretKey"]
    assert sealer.fingerprints({"secretKey": PK}) != first
