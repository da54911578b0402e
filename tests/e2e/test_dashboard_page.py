"""The web page in a real browser: Playwright drives headless Chromium against the deployed system.

The page needs the deployment's API key (every REST call and the WebSocket do): opened without
one it says "401: set your API key" and where the key is; the tests then type the key into its
form like an operator would. While a training runs, the live chart (uPlot, vendored) gains points
on its axes; a rollback clicked on the page reaches the coordinator, and REST and the page both
show it. The browser reaches nothing but the deployment: every other request is blocked, so the
page and ``/docs`` are shown to work offline. Screenshots go to ``$FL_SCREENSHOT_DIR`` (the docs
use ``docs/screenshots``), else to the test's temporary folder.
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
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest

from agents.client import FederatedClient
from agents.data import make_client_datasets
from tests.e2e.conftest import Deployment, training_body, wait_status

if TYPE_CHECKING:
    from playwright.async_api import Dialog, Error, Page, Route

playwright_api = pytest.importorskip("playwright.async_api", reason="needs playwright (pip install playwright)")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ROLLBACK_TARGET = 1
WAIT_MS = 30_000
LOCAL_HOSTS = {"127.0.0.1", "localhost"}
KEY_PROMPT = "401: set your API key"

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")]

Versions = list[dict[str, Any]]


class PageWatch:
    """Keeps what a page should not do: open dialogs (dismissed), throw uncaught script errors, or
    request anything off the deployment's host (blocked)."""

    def __init__(self) -> None:
        self.dialogs: list[str] = []
        self.errors: list[str] = []
        self.blocked: list[str] = []

    async def on_dialog(self, dialog: Dialog) -> None:
        self.dialogs.append(f"{dialog.type}: {dialog.message}")
        await dialog.dismiss()

    def on_error(self, error: Error) -> None:
        self.errors.append(str(error))

    async def on_request(self, route: Route) -> None:
        if urlsplit(route.request.url).hostname in LOCAL_HOSTS:
            await route.continue_()
        else:
            self.blocked.append(route.request.url)
            await route.abort("internetdisconnected")


@asynccontextmanager
async def open_page(url: str, watch: PageWatch) -> AsyncIterator[Page]:
    """``url`` in a fresh headless Chromium (system binary, no sandbox: we run as root in CI), offline
    but for the deployment."""
    async with playwright_api.async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 1500})
            page.set_default_timeout(WAIT_MS)
            page.on("dialog", watch.on_dialog)
            page.on("pageerror", watch.on_error)
            await page.route("**/*", watch.on_request)
            await page.goto(url)
            yield page
        finally:
            await browser.close()


async def enter_key(page: Page, key: str) -> None:
    """Type ``key`` into the page's key form, as an operator does."""
    await page.locator("#key-input").fill(key)
    await page.locator("#key-form button[type=submit]").click()


@asynccontextmanager
async def open_dashboard(deployment: Deployment, watch: PageWatch) -> AsyncIterator[Page]:
    """The dashboard as a new user sees it: it asks for the key, which the user then enters."""
    async with open_page(deployment.dashboard_url + "/", watch) as page:
        await playwright_api.expect(page.locator("#auth-title")).to_have_text(KEY_PROMPT)
        await enter_key(page, deployment.api_key)
        await playwright_api.expect(page.locator("#auth")).to_be_hidden()
        yield page


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


def write_validation_set(deployment: Deployment, name: str = "validation.npz") -> str:
    """The digits test set as the deployment's server-side validation file; returns its name."""
    _, test = make_client_datasets(10, "dirichlet:0.5", 0)
    folder = deployment.data_dir / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / name, x=test.x, y=test.y)
    return name


async def wait_agent_left(http: httpx.AsyncClient, agent_id: str, timeout_s: float = 30.0) -> None:
    """Poll the agents until ``agent_id`` is registered, not alive and without a last-seen time."""
    deadline = time.monotonic() + timeout_s
    agents: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        agents = (await http.get("/api/agents")).json()
        if any(a["agent_id"] == agent_id and not a["alive"] and a["last_seen"] is None for a in agents):
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{agent_id} has not left after {timeout_s}s: {agents}")


async def test_a_new_user_without_a_key_is_told_where_the_key_is(deployment: Deployment, tmp_path: Path) -> None:
    expect = playwright_api.expect
    shots = screenshot_dir(tmp_path)
    watch = PageWatch()
    async with open_page(deployment.dashboard_url + "/", watch) as page:
        auth = page.locator("#auth")
        await expect(auth).to_be_visible()
        await expect(page.locator("#auth-title")).to_have_text(KEY_PROMPT)
        await expect(auth).to_contain_text("printed by the deploy script / demo")
        await expect(auth).to_contain_text("<data dir>/run/deployment.json")
        await expect(page.locator("#live")).to_have_text("401: no key")
        await expect(page.locator("#health")).to_have_text("healthy")
        await page.screenshot(path=str(shots / "dashboard-no-key.png"), full_page=True)

        await enter_key(page, "not-the-key")
        await expect(page.locator("#auth-detail")).to_contain_text("refused the key")
        await expect(page.locator("#live")).to_have_text("401: no key")

        await enter_key(page, deployment.api_key)
        await expect(auth).to_be_hidden()
        await expect(page.locator("#live")).to_have_text("live")

    assert watch.dialogs == [] and watch.errors == [] and watch.blocked == []


async def test_page_shows_the_training_its_versions_and_agents(
        deployment: Deployment, agents: list[FederatedClient], tmp_path: Path) -> None:
    expect = playwright_api.expect
    shots = screenshot_dir(tmp_path)
    watch = PageWatch()
    async with deployment.client() as http:
        training_id = (await http.post("/api/training/start", json=training_body(3, privacy_level="low"))
                       ).json()["training_id"]
        await wait_status(http, training_id, {"completed"})
        metrics = (await http.get(f"/api/training/{training_id}/metrics")).json()
        budget = (await http.get(f"/api/training/{training_id}/privacy")).json()
        await agents[0].close("done for today")
        await wait_agent_left(http, agents[0].agent_id)
    evaluated = sum(1 for m in metrics if m["eval_accuracy"] is not None)
    used = 100 * budget["epsilon_spent"] / budget["epsilon_target"]

    async with open_dashboard(deployment, watch) as page:
        await expect(page.locator("#trainings tbody")).to_contain_text(training_id)
        await expect(page.locator("#trainings tbody")).to_contain_text("completed")
        await expect(page.locator("#trainings tbody")).to_contain_text("final model, federated eval")
        await expect(page.locator("#agents tbody")).to_contain_text("agent-009")
        left = page.locator("#agents tbody tr", has_text=agents[0].agent_id).locator("td").nth(2)
        await expect(left).to_have_text("left")
        await expect(left).to_have_class("left")
        await expect(page.locator("#agent-count")).to_contain_text("9 alive, 1 left, 0 silent of 10")
        await expect(page.locator("#versions tbody tr button.rollback")).to_have_count(4)
        await expect(page.locator("#health")).to_have_text("healthy")
        await expect(page.locator("#live")).to_have_text("live")
        await expect(page.locator("#chart")).to_have_attribute("data-points", str(evaluated))
        await expect(page.locator("#model-accuracy li[data-figure='federated']")).to_contain_text(
            "federated evaluation (agents' held-out data) of the final version")
        await expect(page.locator("#model-accuracy li[data-figure='server']")).to_contain_text(
            "server validation: none")
        await expect(page.locator("#privacy-budget")).to_contain_text(
            f"ε {budget['epsilon_spent']:.2f} / {budget['epsilon_target']:.2f} spent, {used:.1f}% used")
        await page.screenshot(path=str(shots / "dashboard-completed.png"), full_page=True)
    assert evaluated >= 3 and 0 < used <= 100
    assert watch.dialogs == [] and watch.errors == [] and watch.blocked == []


async def test_live_chart_grows_and_a_rollback_clicked_on_the_page_takes_effect(
        deployment: Deployment, agents: list[FederatedClient], tmp_path: Path) -> None:
    expect = playwright_api.expect
    shots = screenshot_dir(tmp_path)
    watch = PageWatch()
    validation = write_validation_set(deployment)
    async with deployment.client() as http:
        training_id = (await http.post("/api/training/start", json=training_body(200, validation_data=validation))
                       ).json()["training_id"]
        await wait_status(http, training_id, {"running"}, timeout_s=60)
        async with open_dashboard(deployment, watch) as page:
            chart = page.locator("#chart")
            await expect(chart).to_have_attribute("data-training-id", training_id)
            first = await wait_chart_points(page, 1)
            grown = await wait_chart_points(page, first + 2)
            assert grown >= first + 2
            assert int(await chart.get_attribute("data-loss-points") or 0) >= first
            assert int(await chart.get_attribute("data-server-points") or 0) >= first
            await expect(chart.locator(".uplot canvas")).to_have_count(1)
            await expect(chart.locator(".u-axis")).to_have_count(3)
            await expect(chart.locator(".u-legend")).to_contain_text("accuracy, federated eval (agents' held-out data)")
            await expect(chart.locator(".u-legend")).to_contain_text("accuracy, server validation")
            await expect(page.locator("#chart-empty")).to_be_hidden()
            legend = chart.locator(".u-legend .u-series")
            await expect(legend.nth(1).locator(".u-value")).not_to_have_text("–")
            await chart.locator(".u-over").hover(position={"x": 1, "y": 20})
            await expect(legend.nth(0).locator(".u-value")).to_have_text("1")
            await page.mouse.move(0, 0)
            await expect(page.locator("#model-accuracy li[data-figure='server']")).to_contain_text(
                "server validation (the server's held-out set) of version")
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

    assert watch.dialogs == [] and watch.errors == [] and watch.blocked == []
    assert (shots / "dashboard-training.png").stat().st_size > 10_000
    assert (shots / "dashboard-rollback.png").stat().st_size > 10_000


async def test_the_api_docs_render_without_internet(deployment: Deployment, tmp_path: Path) -> None:
    expect = playwright_api.expect
    shots = screenshot_dir(tmp_path)
    watch = PageWatch()
    async with open_page(deployment.dashboard_url + "/docs", watch) as page:
        await expect(page.locator("#swagger-ui .info .title")).to_contain_text("Federated learning dashboard")
        operations = page.locator("#swagger-ui .opblock")
        await expect(operations.first).to_be_visible()
        await expect(page.locator("#swagger-ui .opblock-summary-path", has_text="/api/training/start")
                     ).to_have_count(1)
        assert await operations.count() >= 10
        await page.screenshot(path=str(shots / "api-docs.png"))
    assert watch.dialogs == [] and watch.errors == [] and watch.blocked == []
