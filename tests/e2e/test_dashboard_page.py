"""The web page in a real browser (headless Chromium): it renders live data from the deployment."""

from __future__ import annotations

import asyncio
import shutil
import subprocess

import pytest

from tests.e2e.conftest import Deployment, training_body, wait_status

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def render(url: str, tmp_path, *extra: str) -> str:  # type: ignore[no-untyped-def]
    assert CHROMIUM is not None
    result = subprocess.run(
        [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=8000",
         *extra, url], capture_output=True, text=True, timeout=90)
    return result.stdout


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")
async def test_page_shows_the_training_its_versions_and_agents(deployment: Deployment, agents, tmp_path) -> None:
    async with deployment.client() as http:
        training_id = (await http.post("/api/training/start", json=training_body(3))).json()["training_id"]
        await wait_status(http, training_id, {"completed"})

    dom = await asyncio.to_thread(render, deployment.dashboard_url + "/", tmp_path, "--dump-dom")

    assert training_id in dom
    assert "completed" in dom
    assert "agent-009" in dom  # agents table, from the leaderboard
    assert "roll back here" in dom  # versions table
    assert "healthy" in dom  # system health badge
