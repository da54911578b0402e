"""An agent's record in the registry (``records/agents.py``), as stored in Redis (JSON): what the
coordinator selects and verifies by, and what the dashboard lists."""

from __future__ import annotations

import time

from pydantic import BaseModel, ConfigDict, Field

from federated_learning.access import DEFAULT_ORG, DEFAULT_PROJECT


class AgentRecord(BaseModel):
    """A registered agent: what it holds and how to verify it."""

    model_config = ConfigDict(extra="forbid")

    agent_id: str
    datasets: dict[str, int]
    device: dict[str, str] = Field(default_factory=dict)
    public_key: str | None = None
    volunteer: bool = False
    """Sends updates without being asked (plain-HTTP clients through the gateway)."""
    joined_at: float = Field(default_factory=time.time)
    rounds_completed: int = 0
    org_id: str = DEFAULT_ORG
    project_id: str = DEFAULT_PROJECT
    """The project of the join token the agent joined with (the default project without one)."""

    @property
    def project(self) -> tuple[str, str]:
        return self.org_id, self.project_id
