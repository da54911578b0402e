from pathlib import Path

from agents.client import FederatedClient
from federated_learning.privacy.signing import verify
from federated_learning.protocol.messages import TaskKind, UpdateSubmitted


def test_agent_keeps_its_key_across_restarts(tmp_path: Path) -> None:
    first = FederatedClient("a1", redis_url="redis://unused", state_dir=tmp_path)
    again = FederatedClient("a1", redis_url="redis://unused", state_dir=tmp_path)
    other = FederatedClient("a2", redis_url="redis://unused", state_dir=tmp_path)
    assert first.identity.public_key_bytes == again.identity.public_key_bytes
    assert first.identity.public_key_bytes != other.identity.public_key_bytes


def test_signature_covers_every_field_including_the_blob_digest() -> None:
    agent = FederatedClient("a1", redis_url="redis://unused")
    notice = UpdateSubmitted(kind=TaskKind.TRAIN, training_id="t", round=1, attempt=1, agent_id="a1",
                             update_digest="a" * 64, num_examples=5, received_model_version=0)
    signature = agent.identity.sign(notice.signed_bytes())
    assert verify(agent.identity.public_key_bytes, notice.signed_bytes(), signature)
    swapped = notice.model_copy(update={"update_digest": "b" * 64})
    assert not verify(agent.identity.public_key_bytes, swapped.signed_bytes(), signature)
