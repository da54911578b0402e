"""Pairwise-masking secure aggregation (Bonawitz et al. 2017) with dropouts."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from scipy import stats

from federated_learning.privacy.errors import (
    AggregationOverflow,
    InsufficientSurvivors,
    ProtocolViolation,
    ShareDecryptionFailed,
)
from federated_learning.privacy.secure_aggregation import (
    FixedPointCodec,
    SecAggClient,
    SecAggConfig,
    SecAggServer,
    ShareBundle,
    UnmaskRequest,
    decrypt_share,
    encrypt_share,
    run_session,
)

DIM = 1000


def _updates(n: int, dim: int = DIM, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"agent-{i:02d}": rng.uniform(-1, 1, dim).astype(np.float32) for i in range(n)}


def _secret(label: str) -> bytes:
    return hashlib.sha256(label.encode()).digest()


def _clients(n: int, seeded: bool = False) -> dict[str, SecAggClient]:
    names = [f"agent-{i:02d}" for i in range(n)]
    if seeded:
        return {a: SecAggClient.from_secrets(a, _secret(a + "c"), _secret(a + "s"),
                                             _secret(a + "b")) for a in names}
    return {a: SecAggClient.generate(a) for a in names}


def _after_share_round(
    clients: dict[str, SecAggClient], config: SecAggConfig
) -> SecAggServer:
    server = SecAggServer(config)
    for client in clients.values():
        server.register(client.advertise())
    roster = server.roster()
    for agent_id, client in clients.items():
        server.submit_shares(agent_id, client.share_keys(roster))
    for recipient, bundles in server.deliveries().items():
        clients[recipient].receive_shares(b for b in bundles if isinstance(b, ShareBundle))
    return server


def _plain_sum(updates: dict[str, np.ndarray], agents: list[str]) -> np.ndarray:
    return np.asarray(np.sum([updates[a].astype(np.float64) for a in agents], axis=0))


def test_unmasked_sum_equals_plain_sum_within_quantization_error() -> None:
    updates = _updates(8)
    config = SecAggConfig(b"session-1", threshold=5, vector_length=DIM)

    total, _ = run_session(updates, config)

    bound = 8 * 0.5 / config.codec.scale
    np.testing.assert_allclose(total, _plain_sum(updates, list(updates)), atol=bound)


@pytest.mark.parametrize("self_mask", [True, False])
def test_up_to_n_minus_t_dropouts_before_upload_are_recovered(self_mask: bool) -> None:
    updates = _updates(10)
    config = SecAggConfig(b"session-2", threshold=6, vector_length=DIM, self_mask=self_mask)
    dropped = ["agent-01", "agent-04", "agent-05", "agent-09"]

    total, cost = run_session(updates, config, dropped)

    survivors = [a for a in updates if a not in dropped]
    np.testing.assert_allclose(total, _plain_sum(updates, survivors), atol=10 * 0.5 / 2**16)
    assert cost.dropouts == 4


def test_dropouts_after_upload_are_still_summed() -> None:
    updates = _updates(7)
    clients = _clients(7)
    server = _after_share_round(clients, SecAggConfig(b"session-3", 4, DIM))
    for agent_id, client in clients.items():
        if agent_id != "agent-06":
            server.submit_masked(client.mask(updates[agent_id]))
    request = server.unmask_request()
    responders = ["agent-00", "agent-02", "agent-03", "agent-05"]

    total = server.aggregate(clients[a].unmask(request) for a in responders)

    expected = _plain_sum(updates, [a for a in updates if a != "agent-06"])
    np.testing.assert_allclose(total, expected, atol=7 * 0.5 / 2**16)


def test_too_few_uploads_fail_naming_the_counts() -> None:
    updates = _updates(6)
    config = SecAggConfig(b"session-4", threshold=4, vector_length=DIM)

    with pytest.raises(InsufficientSurvivors,
                       match="at least 4 agents at stage 'masked input'; got 3"):
        run_session(updates, config, ["agent-00", "agent-01", "agent-02"])


def test_too_few_unmask_responses_fail_naming_the_counts() -> None:
    updates = _updates(5)
    clients = _clients(5)
    server = _after_share_round(clients, SecAggConfig(b"session-5", 4, DIM))
    for agent_id, client in clients.items():
        server.submit_masked(client.mask(updates[agent_id]))
    request = server.unmask_request()

    with pytest.raises(InsufficientSurvivors) as raised:
        server.aggregate(clients[a].unmask(request) for a in ["agent-00", "agent-01", "agent-02"])

    assert (raised.value.survivors, raised.value.threshold) == (3, 4)
    assert raised.value.stage == "unmasking"


def test_roster_below_threshold_is_refused() -> None:
    server = SecAggServer(SecAggConfig(b"session-6", 3, DIM))
    for client in _clients(2).values():
        server.register(client.advertise())

    with pytest.raises(InsufficientSurvivors, match="stage 'advertise keys'; got 2"):
        server.roster()


def test_masked_update_is_indistinguishable_from_uniform() -> None:
    dim = 65_536
    clients = _clients(3, seeded=True)
    server = _after_share_round(clients, SecAggConfig(b"session-7", 2, dim))
    structured = np.linspace(-0.01, 0.01, dim)

    masked = clients["agent-00"].mask(structured).vector
    plain = FixedPointCodec().encode(structured)

    byte_counts = np.bincount(masked.view(np.uint8), minlength=256)
    top_byte_counts = np.bincount((masked >> 24).astype(np.int64), minlength=256)
    assert stats.chisquare(byte_counts).pvalue > 1e-3
    assert stats.chisquare(top_byte_counts).pvalue > 1e-3
    assert stats.chisquare(np.bincount(plain.view(np.uint8), minlength=256)).pvalue < 1e-12
    assert server.config.vector_length == dim


def test_client_refuses_to_reveal_both_secrets_of_an_agent() -> None:
    updates = _updates(4)
    clients = _clients(4)
    server = _after_share_round(clients, SecAggConfig(b"session-8", 3, DIM))
    for agent_id, client in clients.items():
        server.submit_masked(client.mask(updates[agent_id]))
    client = clients["agent-00"]
    client.unmask(server.unmask_request())

    with pytest.raises(ProtocolViolation, match="both mask secrets of agents \\['agent-03'\\]"):
        client.unmask(UnmaskRequest(("agent-00", "agent-01", "agent-02"), ("agent-03",)))
    with pytest.raises(ProtocolViolation, match="both mask secrets"):
        client.unmask(UnmaskRequest(("agent-00", "agent-01", "agent-02"), ("agent-02",)))


def test_server_rejects_protocol_breaches() -> None:
    clients = _clients(3)
    server = _after_share_round(clients, SecAggConfig(b"session-9", 2, DIM))
    masked = clients["agent-00"].mask(np.zeros(DIM))
    server.submit_masked(masked)

    with pytest.raises(ProtocolViolation, match="uploaded twice"):
        server.submit_masked(masked)
    with pytest.raises(ProtocolViolation, match="must be uint32\\[1000\\]"):
        server.submit_masked(type(masked)("agent-01", np.zeros(10, np.uint32)))


def test_shares_travel_encrypted_between_agents() -> None:
    updates = _updates(4)
    clients = _clients(4)
    config = SecAggConfig(b"session-10", 3, DIM)
    server = SecAggServer(config)
    for client in clients.values():
        server.register(client.advertise())
    roster = server.roster()
    for agent_id, client in clients.items():
        server.submit_shares(agent_id, client.seal_shares(client.share_keys(roster)))
    for recipient, sealed in server.deliveries().items():
        clients[recipient].receive_shares(clients[recipient].open_shares(sealed))  # type: ignore[arg-type]
    for agent_id, client in clients.items():
        server.submit_masked(client.mask(updates[agent_id]))
    request = server.unmask_request()

    total = server.aggregate(client.unmask(request) for client in clients.values())

    np.testing.assert_allclose(total, _plain_sum(updates, list(updates)), atol=4 * 0.5 / 2**16)


def test_tampered_or_misaddressed_share_fails_to_decrypt() -> None:
    clients = _clients(3)
    server = SecAggServer(SecAggConfig(b"session-11", 2, DIM))
    for client in clients.values():
        server.register(client.advertise())
    roster = server.roster()
    bundle = clients["agent-00"].share_keys(roster)[0]
    clients["agent-01"].share_keys(roster)
    key = clients["agent-00"].share_key("agent-01")
    sealed = encrypt_share(bundle, key, b"session-11")

    assert decrypt_share(sealed, clients["agent-01"].share_key("agent-00"), b"session-11") == bundle
    flipped = bytes([sealed.ciphertext[0] ^ 1]) + sealed.ciphertext[1:]
    with pytest.raises(ShareDecryptionFailed, match="does not authenticate"):
        decrypt_share(type(sealed)(sealed.sender, sealed.recipient, sealed.nonce, flipped), key,
                      b"session-11")
    with pytest.raises(ShareDecryptionFailed):
        decrypt_share(type(sealed)(sealed.sender, "agent-02", sealed.nonce, sealed.ciphertext),
                      key, b"session-11")


def test_fixed_point_wraps_negative_values_and_bounds_the_agent_count() -> None:
    codec = FixedPointCodec(scale=2.0**16, clip_range=1.0)
    values = np.array([-1.0, -0.5, 0.25, 3.0])

    encoded = codec.encode(values)
    total = encoded + encoded

    np.testing.assert_array_equal(codec.decode_sum(total, 2), [-2.0, -1.0, 0.5, 2.0])
    assert codec.max_agents == (2**31 - 1) // 2**16
    with pytest.raises(AggregationOverflow, match="at most 32767"):
        codec.decode_sum(total, 40_000)


def test_masking_refuses_a_wrong_length_update() -> None:
    clients = _clients(2)
    _after_share_round(clients, SecAggConfig(b"session-12", 2, DIM))

    with pytest.raises(ValueError, match="update has 5 values; session expects 1000"):
        clients["agent-00"].mask(np.zeros(5))
