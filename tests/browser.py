"""Headless Chromium driven over the DevTools protocol (no extra package: aiohttp's websocket client).

Used by tests/test_dashboard_browser.py to look at the Ray dashboard as an
operator would.  Chromium is Debian's ``chromium`` package; :func:`ensure_chromium`
installs it when missing and otherwise says why it cannot.
"""
from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import aiohttp

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
]  # fmt: skip


def _found() -> str | None:
    for path in CHROMIUM_CANDIDATES:
        if os.access(path, os.X_OK):
            return path
    return shutil.which("chromium")


def ensure_chromium(timeout: float = 900.0) -> tuple[str | None, str]:
    """``(path, "")`` when Chromium is there or could be installed, else ``(None, why not)``."""
    path = _found()
    if path:
        return path, ""
    apt = shutil.which("apt-get")
    if apt is None:
        return None, "Chromium is not installed and there is no apt-get to install Debian's chromium package"
    prefix: list[str] = []
    if os.geteuid() != 0:
        sudo = shutil.which("sudo")
        if sudo is None:
            return None, "Chromium is not installed; installing it needs root (apt-get) and sudo is missing"
        prefix = [sudo, "-n"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    log: list[str] = []
    for cmd in ([*prefix, apt, "update", "-q"], [*prefix, apt, "install", "-y", "-q", "chromium"]):
        try:
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return None, f"`{' '.join(cmd)}` failed: {exc}"
        log.append(done.stdout[-1500:] + done.stderr[-1500:])
        if done.returncode != 0:
            return None, f"`{' '.join(cmd)}` exited {done.returncode}: {log[-1].strip()[-800:]}"
    path = _found()
    if path is None:
        return None, "apt-get installed chromium but no chromium executable was found"
    return path, ""


class Browser:
    """One headless Chromium with one page; ``async with Browser(path) as b: await b.navigate(url)``."""

    def __init__(self, executable: str, *, width: int = 1600, height: int = 1000) -> None:
        self.executable = executable
        self.width, self.height = width, height
        self.profile = tempfile.mkdtemp(prefix="essential-chromium-")
        self.proc: subprocess.Popen | None = None
        self._http: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}

    async def __aenter__(self) -> "Browser":
        self.proc = subprocess.Popen(
            [self.executable, *FLAGS, f"--user-data-dir={self.profile}", f"--window-size={self.width},{self.height}",
             "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        port_file = Path(self.profile) / "DevToolsActivePort"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            if self.proc.poll() is not None:
                raise RuntimeError(f"chromium exited with code {self.proc.returncode} at start")
            if loop.time() > deadline:
                raise RuntimeError("chromium did not open its DevTools port within 60s")
            await asyncio.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        self._http = aiohttp.ClientSession()
        targets = await (await self._http.get(f"http://127.0.0.1:{port}/json/list")).json()
        page = next(t for t in targets if t["type"] == "page")
        self._ws = await self._http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
        self._reader = asyncio.create_task(self._read())
        await self.send("Page.enable")
        await self.send("Network.enable")
        await self.send("Emulation.setDeviceMetricsOverride", width=self.width, height=self.height,
                        deviceScaleFactor=1, mobile=False)  # fmt: skip
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if self._reader is not None:
            self._reader.cancel()
        if self._ws is not None:
            await self._ws.close()
        if self._http is not None:
            await self._http.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                await asyncio.to_thread(self.proc.wait, 10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        shutil.rmtree(self.profile, ignore_errors=True)

    async def _read(self) -> None:
        assert self._ws is not None
        async for msg in self._ws:
            data = json.loads(msg.data)
            future = self._pending.pop(data.get("id"), None) if "id" in data else None
            if future is not None and not future.done():
                future.set_result(data)

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        assert self._ws is not None
        ident = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._pending[ident] = future
        await self._ws.send_str(json.dumps({"id": ident, "method": method, "params": params}))
        reply = await asyncio.wait_for(future, 30)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    async def set_cookie(self, url: str, name: str, value: str) -> None:
        await self.send("Network.setCookie", url=url, name=name, value=value, httpOnly=True, path="/")

    async def navigate(self, url: str) -> None:
        await self.send("Page.navigate", url=url)

    async def evaluate(self, expression: str) -> Any:
        reply = await self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        return reply.get("result", {}).get("value")

    async def text(self) -> str:
        return await self.evaluate("document.body ? document.body.innerText : ''") or ""

    async def type_into_labelled(self, label: str, text: str) -> bool:
        """Focus the input of the form field labelled ``label`` and type ``text`` (real key events)."""
        found = await self.evaluate(
            "(() => { for (const input of document.querySelectorAll('input')) {"
            " const field = input.closest('.MuiFormControl-root, .MuiTextField-root');"
            " const lab = field && field.querySelector('label');"
            f" if (lab && lab.innerText.trim() === {json.dumps(label)}) {{ input.focus(); input.click(); return true; }}"
            " } return false; })()"
        )
        if found:
            await self.send("Input.insertText", text=text)
        return bool(found)

    async def screenshot(self, path: Path) -> Path:
        shot = await self.send("Page.captureScreenshot", format="png")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(shot["data"]))
        return path
