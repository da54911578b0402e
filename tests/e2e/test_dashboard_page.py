"""The web page in a real browser: Playwright drives headless Chromium against the deployed system.

The page asks for the deployment's API key (every REST call and the WebSocket need it); the
tests answer its prompt like an operator would. While a training runs, the live chart gains
points; a rollback clicked on the page reaches the coordinator, and REST and the page both
show it. Screenshots go to ``$FL_SCREENSHOT_DIR`` (the docs use ``docs/screenshots``), else to
the test's temporary folder.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from agents.client import FederatedClient
from tests.e2e.conftest import Deployment, training_body, wait_status

if TYPE_CHECKING:
    from playwright.async_api import Dialog, Error, Page

playwright_api = pytest.importorskip("playwright.async_api", reason="needs playwright (pip install playwright)")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ROLLBACK_TARGET = 1
WAIT_MS = 30_000

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")]

Versions = list[dict[str, Any]]


class PageWatch:
    """Answers the page's API-key prompt with the deployment's key, dismisses (and keeps) alerts,
    and keeps uncaught script errors."""

    def __init__(self, api_key: str) -> None:
        self.api_key = api_key
        self.prompts: list[str] = []
        self.alerts: list[str] = []
        self.errors: list[str] = []

    async def on_dialog(self, dialog: Dialog) -> None:
        if dialog.type == "prompt":
            self.prompts.append(dialog.message)
            await dialog.accept(self.api_key)
        else:
            self.alerts.append(dialog.message)
            await dialog.dismiss()

    def on_error(self, error: Error) -> None:
        self.errors.append(str(error))


@asynccontextmanager
async def open_dashboard(deployment: Deployment, watch: PageWatch) -> AsyncIterator[Page]:
    """The dashboard in a fresh headless Chromium (system binary, no sandbox: we run as root in CI)."""
    async with playwright_api.async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 1500})
            page.set_default_timeout(WAIT_MS)
            page.on("dialog", watch.on_dialog)
            page.on("pageerror", watch.on_error)
            await page.goto(deployment.dashboard_url + "/")
            yield page
        finally:
            await browser.close()


def screenshot_dir(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("FL_SCREENSHOT_DIR") or tmp_path / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


async def wait_versions(http: httpx.AsyncClient, training_id: str, accept: Callable[[Versions], bool],
                        timeout_s: float = 60.0) -> Versions:
    """Poll the training's versions until ``accept(versions)`` holds."""
    deadline = time.monotonic() + timeout_s
    versions: Versions = []
    while time.monotonic() < deadline:
        versions = (await http.get(f"/api/training/{training_id}/versions")).json()
        if accept(versions):
            return versions
        await asyncio.sleep(0.1)
    raise AssertionError(f"versions of {training_id} not as expected after {timeout_s}s: {versions}")


def rollback_children(versions: Versions, target: int) -> list[int]:
    """Versions that name the rollback target as parent, other than its natural child."""
    return [v["version"] for v in versions
            if v["version"] > target + 1 and v["parent_version"] == target]


async def chart_points(page: Page) -> int:
    return int(await page.locator("#chart").get_attribute("data-points") or 0)


async def wait_chart_points(page: Page, at_least: int) -> int:
    await page.wait_for_function("n => Number(document.getElementById('chart').dataset.points) >= n",
                                 arg=at_least)
    return await chart_points(page)


async def test_page_shows_the_training_its_versions_and_agents(
        deployment: Deployment, agents: list[FederatedClient]) -> None:
    expect = playwright_api.expect
    watch = PageWatch(deployment.api_key)
    async with deployment.client() as http:
        training_id = (await http.post("/api/training/start", json=training_body(3, privacy_level="low"))
                       ).json()["training_id"]
        await wait_status(http, training_id, {"completed"})
        metrics = (await http.get(f"/api/training/{training_id}/metrics")).json()
        budget = (await http.get(f"/api/training/{training_id}/privacy")).json()
    evaluated = sum(1 for m in metrics if m["eval_accuracy"] is not None)
    used = 100 * budget["epsilon_spent"] / budget["epsilon_target"]

    async with open_dashboard(deployment, watch) as page:
        await expect(page.locator("#trainings tbody")).to_contain_text(training_id)
        await expect(page.locator("#trainings tbody")).to_contain_text("completed")
        await expect(page.locator("#agents tbody")).to_contain_text("agent-009")
        await expect(page.locator("#versions tbody tr button.rollback")).to_have_count(4)
        await expect(page.locator("#health")).to_have_text("healthy")
        await expect(page.locator("#live")).to_have_text("live")
        await expect(page.locator("#chart")).to_have_attribute("data-points", str(evaluated))
        await expect(page.locator("#privacy-budget")).to_contain_text(
            f"ε {budget['epsilon_spent']:.2f} / {budget['epsilon_target']:.2f} spent, {used:.1f}% used")
    assert evaluated >= 3 and 0 < used <= 100

    assert len(watch.prompts) == 1 and "API key" in watch.prompts[0]
    assert watch.errors == [] and watch.alerts == []


async def test_live_chart_grows_and_a_rollback_clicked_on_the_page_takes_effect(
        deployment: Deployment, agents: list[FederatedClient], tmp_path: Path) -> None:
    expect = playwright_api.expect
    shots = screenshot_dir(tmp_path)
    watch = PageWatch(deployment.api_key)
    async with deployment.client() as http:
        training_id = (await http.post("/api/training/start", json=training_body(200))).json()["training_id"]
        await wait_status(http, training_id, {"running"}, timeout_s=60)
        async with open_dashboard(deployment, watch) as page:
            await expect(page.locator("#chart")).to_have_attribute("data-training-id", training_id)
            first = await wait_chart_points(page, 1)
            grown = await wait_chart_points(page, first + 2)
            assert grown >= first + 2
            assert int(await page.locator("#chart").get_attribute("data-loss-points") or 0) >= first
            await expect(page.locator("#live")).to_have_text("live")
            await expect(page.locator("#privacy-budget")).to_contain_text("privacy level none: no budget")
            await page.screenshot(path=str(shots / "dashboard-training.png"), full_page=True)

            versions = await wait_versions(http, training_id, lambda vs: len(vs) >= ROLLBACK_TARGET + 3)
            # The page lists the newest 30 versions and rounds are fast: roll back to a recent one.
            target = max(ROLLBACK_TARGET, max(v["version"] for v in versions) - 2)
            await page.locator(f"#versions tbody tr[data-version='{target}'] button.rollback").click()
            await expect(page.locator("#version-status")).to_contain_text(f"to version {target} requested")

            versions = await wait_versions(http, training_id, lambda vs: bool(rollback_children(vs, target)))
            child = min(rollback_children(versions, target))
            await expect(page.locator(f"#versions tbody tr[data-version='{child}']")).to_have_attribute(
                "data-parent", str(target))
            await expect(page.locator("#events")).to_contain_text(f"to {target}: rolled back by operator")
            await page.screenshot(path=str(shots / "dashboard-rollback.png"), full_page=True)
        await http.post(f"/api/training/{training_id}/stop")

    assert len(watch.prompts) == 1, "the key is asked once and kept for the rollback"
    assert watch.errors == [] and watch.alerts == []
    assert (shots / "dashboard-training.png").stat().st_size > 10_000
    assert (shots / "dashboard-rollback.png").stat().st_size > 10_000
