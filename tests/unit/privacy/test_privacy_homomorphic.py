"""Paillier homomorphic aggregation (optional extra 'he'): sums, packing and refusals."""

from __future__ import annotations

import builtins
import dataclasses
from typing import Any

import numpy as np
import pytest

from federated_learning.privacy import homomorphic
from federated_learning.privacy.errors import ProtocolViolation
from federated_learning.privacy.homomorphic import (
    EncryptedVector,
    ForeignPublicKey,
    HEAggregator,
    HEConfig,
    HomomorphicUnavailable,
    KeyHolder,
    TooManyAgents,
    encrypt_update,
    encrypt_vector,
    pack_slots,
    unpack_slots,
)
from federated_learning.privacy.secure_aggregation import FixedPointCodec

pytest.importorskip("phe")

DIM = 12
SCALE = 2.0**16


@pytest.fixture(scope="module")
def holder() -> KeyHolder:
    return KeyHolder.generate(1024)


@pytest.fixture(scope="module")
def other_holder() -> KeyHolder:
    return KeyHolder.generate(1024)


def _config(holder: KeyHolder, **overrides: Any) -> HEConfig:
    settings: dict[str, Any] = {"vector_length": DIM, "codec": FixedPointCodec(SCALE, 1.0),
                                "max_agents": 8}
    settings.update(overrides)
    return HEConfig(holder.public_key, **settings)


def _updates(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.uniform(-1, 1, DIM) for _ in range(n)]


def _aggregate(config: HEConfig, vectors: list[EncryptedVector]) -> HEAggregator:
    aggregator = HEAggregator(config)
    for vector in vectors:
        aggregator.submit(vector)
    return aggregator


@pytest.mark.parametrize("pack", [True, False])
def test_decrypted_sum_equals_plain_sum_within_quantization(holder: KeyHolder, pack: bool) -> None:
    config = _config(holder, pack=pack)
    updates = _updates(3)
    vectors = [encrypt_vector(config, f"agent-{i}", u) for i, u in enumerate(updates)]

    total = holder.decrypt_sum(config, _aggregate(config, vectors).aggregate())

    np.testing.assert_allclose(total, np.sum(updates, axis=0), rtol=0, atol=3 * 0.5 / SCALE)


def test_packing_puts_many_values_in_one_ciphertext(holder: KeyHolder) -> None:
    config = _config(holder)

    vector = encrypt_vector(config, "agent-0", np.zeros(DIM))

    assert config.slot_bits == 21
    assert config.slots_per_ciphertext == 1023 // 21
    assert len(vector.ciphertexts) == 1
    assert vector.nbytes == 256


def test_pack_and_unpack_round_trip_by_hand() -> None:
    codes = np.array([1, 2, 3, 7, 5], dtype=np.int64)

    plaintexts = pack_slots(codes, slot_bits=3, slots=2)

    assert plaintexts == [1 | 2 << 3, 3 | 7 << 3, 5]
    np.testing.assert_array_equal(unpack_slots(plaintexts, 3, 2, 5), codes)


def test_full_slots_do_not_carry_into_neighbours(holder: KeyHolder) -> None:
    config = _config(holder, max_agents=4)
    extremes = np.tile([1.0, -1.0, 1.0], DIM // 3)
    vectors = [encrypt_vector(config, f"agent-{i}", extremes) for i in range(4)]

    total = holder.decrypt_sum(config, _aggregate(config, vectors).aggregate())

    np.testing.assert_array_equal(total, 4 * extremes)


def test_weighted_mean_matches_fedavg(holder: KeyHolder) -> None:
    config = _config(holder, weight_normaliser=40.0)
    updates, examples = _updates(3, seed=1), [10, 30, 40]
    vectors = [encrypt_update(config, f"agent-{i}", u, n)
               for i, (u, n) in enumerate(zip(updates, examples, strict=True))]

    mean = holder.decrypt_mean(config, _aggregate(config, vectors).aggregate())

    expected = np.average(updates, axis=0, weights=examples)
    np.testing.assert_allclose(mean, expected, rtol=0, atol=1e-4)


def test_equal_inputs_give_different_ciphertexts(holder: KeyHolder) -> None:
    config = _config(holder)
    update = np.full(DIM, 0.25)

    first = encrypt_vector(config, "agent-0", update)
    second = encrypt_vector(config, "agent-1", update)

    assert set(first.ciphertexts).isdisjoint(second.ciphertexts)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_update_is_rejected(holder: KeyHolder, bad: float) -> None:
    update = np.zeros(DIM)
    update[3] = bad

    with pytest.raises(ValueError, match="1 NaN or infinite"):
        encrypt_vector(_config(holder), "agent-0", update)


def test_wrong_length_update_is_rejected(holder: KeyHolder) -> None:
    with pytest.raises(ValueError, match=f"update has {DIM + 1} values; the session expects {DIM}"):
        encrypt_vector(_config(holder), "agent-0", np.zeros(DIM + 1))


def test_weight_above_one_is_rejected(holder: KeyHolder) -> None:
    with pytest.raises(ValueError, match="num_examples must be in"):
        encrypt_update(_config(holder, weight_normaliser=10.0), "agent-0", np.zeros(DIM), 11)


def test_upload_under_another_key_is_rejected(holder: KeyHolder, other_holder: KeyHolder) -> None:
    foreign = encrypt_vector(_config(other_holder), "agent-0", np.zeros(DIM))

    with pytest.raises(ForeignPublicKey, match=other_holder.public_key.fingerprint):
        HEAggregator(_config(holder)).submit(foreign)


def test_key_holder_refuses_an_aggregate_under_another_key(
        holder: KeyHolder, other_holder: KeyHolder) -> None:
    config = _config(other_holder)
    aggregate = _aggregate(config, [encrypt_vector(config, "agent-0", np.zeros(DIM))]).aggregate()

    with pytest.raises(ForeignPublicKey):
        holder.decrypt_sum(config, aggregate)


def test_agent_beyond_the_slot_capacity_is_rejected(holder: KeyHolder) -> None:
    config = _config(holder, max_agents=2)
    aggregator = _aggregate(config, [encrypt_vector(config, f"agent-{i}", np.zeros(DIM))
                                     for i in range(2)])

    with pytest.raises(TooManyAgents, match="at most 2 agents; got 3"):
        aggregator.submit(encrypt_vector(config, "agent-2", np.zeros(DIM)))


def test_key_holder_refuses_more_agents_than_the_slots_hold(holder: KeyHolder) -> None:
    config = _config(holder, max_agents=2)
    vector = encrypt_vector(config, "agent-0", np.zeros(DIM))
    inflated = dataclasses.replace(_aggregate(config, [vector]).aggregate(),
                                   agent_ids=("a", "b", "c"))

    with pytest.raises(TooManyAgents):
        holder.decrypt_sum(config, inflated)


def test_key_holder_refuses_fewer_than_min_agents(holder: KeyHolder) -> None:
    lenient, strict = _config(holder), _config(holder, min_agents=2)
    aggregate = _aggregate(lenient, [encrypt_vector(lenient, "agent-0", np.zeros(DIM))]).aggregate()

    with pytest.raises(ProtocolViolation, match="aggregate of 1 agents; min_agents is 2"):
        holder.decrypt_sum(strict, aggregate)


def test_repeated_agent_and_non_ciphertexts_are_rejected(holder: KeyHolder) -> None:
    config = _config(holder)
    vector = encrypt_vector(config, "agent-0", np.zeros(DIM))
    aggregator = _aggregate(config, [vector])

    with pytest.raises(ProtocolViolation, match="uploaded twice"):
        aggregator.submit(vector)
    for value in (0, holder.public_key.n, holder.public_key.nsquare):
        forged = dataclasses.replace(vector, agent_id=f"forged-{value}", ciphertexts=(value,))
        with pytest.raises(ProtocolViolation, match="not a ciphertext"):
            aggregator.submit(forged)


def test_config_refuses_slots_wider_than_the_key(holder: KeyHolder) -> None:
    with pytest.raises(ValueError, match="needs 66 bits"):
        _config(holder, max_agents=2**48)


def test_missing_phe_raises_an_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_phe(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "phe" or name.startswith("phe."):
            raise ImportError(f"No module named '{name}'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_phe)

    assert not homomorphic.phe_available()
    with pytest.raises(HomomorphicUnavailable, match=r"pip install 'federated-learning\[he\]'"):
        KeyHolder.generate(1024)
