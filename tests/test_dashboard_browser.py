"""The Ray dashboard's actors page shows a running saga's actor.

Headless Chromium (Debian's ``chromium``, installed here when missing) loads
the dashboard, logs in with the cluster's token the way the dashboard's own
login does (the ``ray-authentication-token`` cookie), filters the actors table
by name, finds ``saga:<id>`` with its repr naming the job, and saves a
screenshot to ``test-artifacts/dashboard-actors.png``.  If Chromium cannot be
installed the test is skipped with the reason - never passed.
"""
from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import httpx
import pytest
import ray

from essential.orchestration import SagaState

from .browser import Browser, ensure_chromium
from .conftest import REPO, poll
from .test_saga_runtime import call

ARTIFACTS = REPO / "test-artifacts"
TOKEN_COOKIE = "ray-authentication-token"


def dashboard_token() -> str | None:
    """The cluster's token as Ray's own clients find it: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    return path.read_text().strip() if path.exists() else None


@pytest.fixture(scope="module")
def chromium() -> str:
    path, why = ensure_chromium()
    if path is None:
        pytest.skip(f"headless Chromium is not available, so the dashboard was not checked in a browser: {why}")
    return path


@pytest.mark.timeout(1500)
async def test_dashboard_actors_page_shows_the_running_saga(chromium: str, client: Any, store: Any) -> None:
    dashboard = "http://" + ray._private.worker.get_dashboard_url()
    saga_id = await call(client.start, "test:chain", {"sleep": {"b": 120}})
    name = f"saga:{saga_id}"
    try:

        async def step_b_running() -> bool:
            return any(s.step == "b" for s in await store.stages(saga_id))

        await poll(step_b_running, timeout=60, what="the saga to run step b")
        mode = (await asyncio.to_thread(httpx.get, f"{dashboard}/api/authentication_mode", timeout=10)).json()
        token = dashboard_token() if mode.get("authentication_mode") == "token" else None
        if mode.get("authentication_mode") == "token":
            assert token, "the dashboard wants a token and none was found (RAY_AUTH_TOKEN or ~/.ray/auth_token)"

        async with Browser(chromium) as browser:
            if token:
                await browser.set_cookie(dashboard, TOKEN_COOKIE, token)
            await browser.navigate(f"{dashboard}/#/actors")

            async def table_shown() -> bool:
                text = await browser.text()
                return "Repr" in text and "ALIVE" in text

            await poll(table_shown, timeout=90, interval=0.5, what="the dashboard's actors table")
            # the table pages ten actors at a time: filter by name as an operator would
            assert await browser.type_into_labelled("Name", name), "no Name filter on the actors page"

            async def saga_row_shown() -> bool:
                text = await browser.text()
                return name in text and f"SagaActor(saga={saga_id}, job=test:chain)" in " ".join(text.split())

            try:
                await poll(saga_row_shown, timeout=90, interval=0.5, what=f"{name} on the actors page")
            finally:
                shot = await browser.screenshot(ARTIFACTS / "dashboard-actors.png")
            text = await browser.text()
        assert name in text and "ALIVE" in text
        assert shot.stat().st_size > 10_000, "the screenshot is empty"
    finally:
        await call(client.abort, saga_id, "dashboard test done")
    saga = await call(client.wait, saga_id, 120)
    assert saga.state == SagaState.ABORTED


def test_missing_chromium_is_reported_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without Chromium and without a way to install it, the set-up names why (the test then skips)."""
    from . import browser

    monkeypatch.setattr(browser, "_found", lambda: None)
    monkeypatch.setattr(browser.shutil, "which", lambda name: None)
    path, why = browser.ensure_chromium()
    assert path is None and "apt-get" in why
