"""The live dashboard: a real run's page in Debian's headless Chromium, and its JSON and event stream over HTTP."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any
from unittest.mock import ANY

import aiohttp
import pytest
from selenium import webdriver

from coordinator.__main__ import build_parser, dashboard_address, validate
from coordinator.admin import AdminAccess
from coordinator.config import FederationConfig
from coordinator.dashboard import Dashboard, LocalRuns, ServedRuns, dashboard_access, server
from coordinator.dashboard import events as event_stream
from coordinator.outputs import RunOutputs
from coordinator.serving import ServingCoordinator
from phalanx.cli import parse_with_config
from phalanx.identity import AddressError
from phalanx.telemetry import Telemetry
from tests.certs import Pki
from tests.harness import REPO, Coordinator, start_coordinator, start_echo_site, stop_sites
from tests.test_admin_access import RUN, client_context
from tests.test_cli import png_size

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SCREENSHOT = REPO / "test-artifacts" / "dashboard.png"
LOCAL_STEPS = 4
OPEN = AdminAccess(tls=False, loopback_only=True)
SHUTDOWN_BOUND = 3.0
"""Seconds a dashboard with an open stream may take to close (aiohttp would wait its shutdown timeout)."""

PROBE = """
const all = (selector) => [...document.querySelectorAll(selector)];
const text = (id) => document.getElementById(id).textContent;
return {
  rounds: all("#rounds tbody tr").map((tr) => tr.dataset.round),
  loss: all("#loss-chart circle.point").map((c) => c.getAttribute("data-round")),
  accuracy: all("#accuracy-chart circle.point").map((c) => c.getAttribute("data-round")),
  sites: Object.fromEntries(all("#sites tbody tr").map((tr) => [tr.dataset.site, {
    liveness: tr.querySelector(".liveness").textContent,
    activity: tr.querySelector(".activity").textContent,
    joined: tr.querySelector(".rounds-joined").textContent,
  }])),
  runs: all("#runs tbody tr").map((tr) => tr.dataset.run),
  state: text("run-state"),
  round: text("live-round"),
  connection: text("connection"),
};
"""


@dataclass
class LiveRun:
    url: str
    coordinator: Coordinator
    execution: asyncio.Future[list[dict[str, Any]]]


@asynccontextmanager
async def live_run(tmp_path: Path, *, rounds: int, delay: float) -> AsyncIterator[LiveRun]:
    """A run of `rounds` over two echo sites that take `delay` seconds a job, with its dashboard on loopback."""
    coordinator = await start_coordinator(tmp_path, rounds=rounds, min_trainers=2, local_steps=LOCAL_STEPS)
    runs = LocalRuns(coordinator.app.registry)
    runs.add(coordinator.app.run, RunOutputs(tmp_path))
    dashboard = Dashboard(runs, OPEN, None)
    url = await dashboard.start("127.0.0.1:0")
    sites = [await start_echo_site(coordinator.address, k, delay=delay) for k in range(2)]
    execution = asyncio.ensure_future(coordinator.app.execute())
    try:
        yield LiveRun(url, coordinator, execution)
    finally:
        execution.cancel()
        await asyncio.gather(execution, return_exceptions=True)
        await dashboard.close()
        await stop_sites(sites)
        await coordinator.close()


def open_chromium() -> webdriver.Chrome:
    """Debian's Chromium through its chromedriver: nothing is downloaded."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        pytest.fail(f"{' and '.join(missing)} missing: the browser test needs `apt-get install -y chromium chromium-driver`")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(argument)
    return webdriver.Chrome(service=webdriver.ChromeService(executable_path=str(CHROMEDRIVER)), options=options)


async def test_a_browser_follows_a_live_run_round_by_round(tmp_path: Path) -> None:
    browser = await asyncio.to_thread(open_chromium)
    try:
        async with live_run(tmp_path, rounds=3, delay=1.0) as run:
            await asyncio.to_thread(browser.get, run.url + "/")
            seen: list[dict[str, Any]] = []
            async with asyncio.timeout(30):
                while not seen or not all("1" in seen[-1][part] for part in ("rounds", "loss", "accuracy")):
                    await asyncio.sleep(0.1)
                    seen.append(await asyncio.to_thread(browser.execute_script, PROBE))
            page = seen[-1]
            assert (page["state"], page["connection"], page["runs"]) == ("running", "live", ["run-1"])
            assert set(page["sites"]) == {"echo-0", "echo-1"}
            for site in page["sites"].values():
                assert site["liveness"] == "live" and int(site["joined"]) >= 1
            activities = {site["activity"] for p in seen for site in p["sites"].values()}
            assert any(re.fullmatch(rf"training [1-{LOCAL_STEPS}] / {LOCAL_STEPS}", a) for a in activities), activities
            SCREENSHOT.parent.mkdir(exist_ok=True)
            SCREENSHOT.unlink(missing_ok=True)
            assert await asyncio.to_thread(browser.save_screenshot, str(SCREENSHOT))
            width, height = png_size(SCREENSHOT)  # the window less the browser's own bars
            assert width == 1400 and height > 600 and SCREENSHOT.stat().st_size > 20_000
            assert [row["round"] for row in await run.execution] == [0, 1, 2, 3]
            async with asyncio.timeout(10):  # the last row and the end of the run reach the page too
                while (page := await asyncio.to_thread(browser.execute_script, PROBE))["state"] != "completed":
                    await asyncio.sleep(0.1)
            assert page["rounds"] == ["3", "2", "1", "0"] and page["loss"] == ["0", "1", "2", "3"]
            errors = [e for e in await asyncio.to_thread(browser.get_log, "browser") if e["level"] == "SEVERE"]
            assert errors == []  # a script error, or anything the page's content security policy refused
    finally:
        await asyncio.to_thread(browser.quit)


async def events(response: aiohttp.ClientResponse) -> AsyncIterator[tuple[str, Any]]:
    """The server-sent events of `response`, parsed: (event, JSON data)."""
    kind, data = "message", []
    async for raw in response.content:
        line = raw.decode().rstrip("\n")
        if not line:
            if data:
                yield kind, json.loads("\n".join(data))
            kind, data = "message", []
        elif line.startswith("event: "):
            kind = line.removeprefix("event: ")
        elif line.startswith("data: "):
            data.append(line.removeprefix("data: "))


async def test_the_event_stream_and_the_json_follow_a_run(tmp_path: Path) -> None:
    async with live_run(tmp_path, rounds=2, delay=0.4) as run, aiohttp.ClientSession() as http:
        async with http.get(run.url + "/api/events", params={"run": "run-1"}) as response:
            assert response.status == 200 and response.content_type == "text/event-stream"
            first: dict[str, Any] = {}
            training: list[dict[str, Any]] = []
            async with asyncio.timeout(30):
                async for kind, data in events(response):
                    first.setdefault(kind, data)
                    if kind == "progress" and data["round"] == 1 and data["phase"] == "train":
                        training.append(data)
                    if kind == "row" and data["row"]["round"] == 1:
                        break
        assert {"runs", "sites", "run", "rows", "progress"} <= set(first)
        assert first["run"]["id"] == "run-1" and first["runs"][0]["id"] == "run-1"
        assert training, "no progress event while round 1 trained"
        assert any(s["state"] == "training" and 0 < s["step"] <= LOCAL_STEPS for p in training for s in p["sites"])
        assert data["index"] == 1 and data["row"]["status"] == "ok"

        rows = await run.execution
        assert await get(http, run.url + "/api/runs") == [
            {"id": "run-1", "state": "completed", "reason": "", "rounds": 2, "completed_rounds": 2}
        ]
        detail = await get(http, run.url + "/api/runs/run-1")
        assert detail["run"]["state"] == "completed" and detail["progress"]["phase"] == "finished"
        assert [(s["name"], s["rounds_joined"]) for s in detail["progress"]["sites"]] == [("echo-0", 2), ("echo-1", 2)]
        assert await get(http, run.url + "/api/runs/run-1/rows") == json.loads(json.dumps(rows))
        sites = await get(http, run.url + "/api/sites")
        assert [(s["name"], s["live"]) for s in sites["sites"]] == [("echo-0", True), ("echo-1", True)]
        assert all(abs(sites["now"] - s["heard"]) < 10 for s in sites["sites"]) and abs(sites["now"] - time.time()) < 10
        for path in ("/api/runs/nope", "/api/runs/nope/rows", "/api/events?run=nope"):
            assert await get(http, run.url + path, status=404) == {"error": "no run 'nope'"}
        for path in (f"/api/runs/{'x' * 65}", f"/api/events?run={'x' * 5000}"):
            assert await get(http, run.url + path, status=404) == {"error": "no such run"}


async def get(http: aiohttp.ClientSession, url: str, status: int = 200, **kwargs: Any) -> Any:
    async with http.get(url, **kwargs) as response:
        assert response.status == status and response.content_type == "application/json"
        return await response.json()


async def test_a_served_runs_state_reaches_the_stream(tmp_path: Path) -> None:
    telemetry = Telemetry.create("phalanx-coordinator")
    coordinator = ServingCoordinator(FederationConfig(listen="127.0.0.1:0"), telemetry, tmp_path / "state")
    dashboard = Dashboard(ServedRuns(coordinator), OPEN, None)
    try:
        await coordinator.start()
        url = await dashboard.start("127.0.0.1:0")
        record = await coordinator.submit(RUN)  # waits for sites that never come
        async with aiohttp.ClientSession() as http:
            assert [(r["id"], r["state"]) for r in await get(http, url + "/api/runs")] == [(record.id, "running")]
            assert await get(http, f"{url}/api/runs/{record.id}/rows") == []
            async with http.get(url + "/api/events", params={"run": record.id}) as response, asyncio.timeout(10):
                stream = events(response)
                assert await anext(stream) == ("runs", [record.to_json() | {"state": "running", "started": ANY}])
                await coordinator.stop(record.id)
                async for kind, data in stream:
                    if kind == "run" and data["state"] == "stopped":
                        break
            assert data["reason"] == "stopped by an admin"
            assert await get(http, url + "/api/runs/nope", status=404) == {"error": "no run 'nope'"}
    finally:
        await dashboard.close()
        await coordinator.close()
        telemetry.shutdown()


async def test_event_streams_are_bounded_kept_alive_and_ended(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server, "MAX_STREAMS", 1)
    monkeypatch.setattr(event_stream, "KEEPALIVE_SECONDS", 0.3)
    coordinator = await start_coordinator(tmp_path)
    dashboard = Dashboard(LocalRuns(coordinator.app.registry), OPEN, None)
    url = await dashboard.start("127.0.0.1:0")
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(url + "/api/events") as first, asyncio.timeout(10):
                while await first.content.readline() != b": keep-alive\n":  # nothing changes: a comment comes
                    pass
                assert await get(http, url + "/api/events", status=503) == {"error": "1 event streams are open already"}
            async with asyncio.timeout(10):  # the client went away: its stream ends and frees its place
                while (response := await http.get(url + "/api/events")).status == 503:
                    response.release()
                    await asyncio.sleep(0.1)
            assert response.status == 200
            async with asyncio.timeout(SHUTDOWN_BOUND):  # closing ends the open stream at once
                await dashboard.close()
                assert await response.content.read() is not None and response.content.at_eof()
            response.release()
    finally:
        await dashboard.close()
        await coordinator.close()


async def test_the_page_ships_in_the_package_and_names_no_other_site(tmp_path: Path) -> None:
    coordinator = await start_coordinator(tmp_path)
    runs = LocalRuns(coordinator.app.registry)
    runs.add(coordinator.app.run, RunOutputs(tmp_path))
    dashboard = Dashboard(runs, OPEN, None)
    url = await dashboard.start("127.0.0.1:0")
    try:
        async with aiohttp.ClientSession() as http:
            for path, content_type in (("/", "text/html"), ("/static/dashboard.js", "text/javascript"), ("/static/dashboard.css", "text/css")):
                async with http.get(url + path) as response:
                    assert (response.status, response.content_type, response.charset) == (200, content_type, "utf-8")
                    assert "default-src 'none'" in response.headers["Content-Security-Policy"]
                    assert response.headers["X-Content-Type-Options"] == "nosniff"
            for path in ("/static/nope.js", "/static/..%2Fserver.py", "/static/__init__.py"):
                assert await get(http, url + path, status=404) == {"error": "no such file"}
            assert await get(http, url + "/api/runs") == [
                {"id": "run-1", "state": "waiting", "reason": "", "rounds": 1, "completed_rounds": 0}
            ]
            assert (await get(http, url + "/api/runs/run-1"))["progress"]["phase"] == "waiting"
    finally:
        await dashboard.close()
        await coordinator.close()
    static = resources.files("coordinator.dashboard").joinpath("static")
    files = {item.name: item.read_text() for item in static.iterdir()}
    assert set(files) == {"index.html", "dashboard.js", "dashboard.css"}
    for name, text in files.items():
        for external in ("http://", "https://", "//cdn", "@import"):
            assert external not in text, f"{name} names {external}"
    assert re.findall(r'(?:src|href)="([^"]*)"', files["index.html"]) == ["data:,", "static/dashboard.css", "static/dashboard.js"]
    assert ".innerHTML" not in files["dashboard.js"] and "eval(" not in files["dashboard.js"]


def test_a_loopback_dashboard_is_plain_http_for_this_machine_and_any_other_needs_an_admin(pki: Pki) -> None:
    creds = pki.creds("coordinator")
    for tls in (None, creds):
        access, served_with = dashboard_access(tls, "127.0.0.1:8080")
        assert access.open and not access.tls and served_with is None
    access, served_with = dashboard_access(creds, "0.0.0.0:8080")
    assert access.tls and not access.open and served_with is creds
    access, served_with = dashboard_access(None, "10.1.2.3:8080")  # --insecure off loopback: refuses every request
    assert not access.tls and not access.open and served_with is None


async def test_the_dashboard_keeps_the_status_apis_access_rule(tmp_path: Path, pki: Pki) -> None:
    coordinator = await start_coordinator(tmp_path)
    runs = LocalRuns(coordinator.app.registry)
    plaintext = Dashboard(runs, AdminAccess(tls=False, loopback_only=False), None)
    tls = Dashboard(runs, AdminAccess(tls=True, loopback_only=True), pki.creds("coordinator"))
    try:
        plain_url, tls_url = await plaintext.start("127.0.0.1:0"), await tls.start("127.0.0.1:0")
        assert tls_url.startswith("https://")
        async with aiohttp.ClientSession() as http:
            for path in ("/", "/api/runs", "/api/events"):
                body = await get(http, plain_url + path, status=403)
                assert "admin certificate" in body["error"]
            body = await get(http, tls_url + "/api/runs", status=401, ssl=client_context(pki, None))
            assert "client certificate" in body["error"]
            body = await get(http, tls_url + "/api/runs", status=403, ssl=client_context(pki, "site-a"))
            assert "site 'site-a'" in body["error"]
            assert await get(http, tls_url + "/api/runs", ssl=client_context(pki, "admin")) == []
    finally:
        await plaintext.close()
        await tls.close()
        await coordinator.close()


def test_the_flag_binds_loopback_by_default_and_refuses_plaintext_elsewhere(capsys: pytest.CaptureFixture[str]) -> None:
    assert dashboard_address("8080") == "127.0.0.1:8080" and dashboard_address("[::1]:0") == "[::1]:0"
    with pytest.raises(AddressError, match="address must be host:port"):
        dashboard_address("localhost")
    parser = build_parser()
    args = parse_with_config(parser, ["--dashboard", "0"])
    validate(parser, args, None)
    assert args.dashboard == "127.0.0.1:0"
    assert parse_with_config(parser, []).dashboard == ""
    for value, says in (("0.0.0.0:8080", "refusing to listen on 0.0.0.0:8080 without TLS"), ("nope", "address must be host:port")):
        args = parse_with_config(parser, ["--dashboard", value])
        with pytest.raises(SystemExit) as exited:
            validate(parser, args, None)
        assert exited.value.code == 2 and says in capsys.readouterr().err
