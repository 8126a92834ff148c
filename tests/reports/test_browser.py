"""The HTML report in a real headless Chromium: no console errors, no request beyond the file
itself, and a job named like a script shows up as text (nothing runs).

Needs Debian's chromium (``.ci/chromium.sh`` installs it); skipped without it, except under
``CI=true``, where it fails.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from reports.files import write_demo_report
from scheduler.store import JobStore
from telemetry.store import open_store
from tests.reports.chromium import DevTools, find_chromium
from tests.reports.conftest import Rig

SCRIPT_NAME = "<script>alert(1)</script>"


@pytest.fixture(scope="module")
def chromium() -> str:
    binary = find_chromium()
    if binary is None:
        message = "chromium is not installed: .ci/chromium.sh installs it"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true but {message}", pytrace=False)
        pytest.skip(message)
    return binary


@pytest.fixture(scope="module")
def html_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("browser")
    url = f"sqlite:///{folder / 'powertrain.db'}"
    store = open_store(url)
    try:
        rig = Rig(store, gpus=2)
        rig.run(15)
        job = rig.start_job(SCRIPT_NAME, (0,), user="<img src=x onerror=alert(3)>", watts=500.0)
        JobStore(store).set_fields(job.id, argv=["python", "<iframe src=https://example.com>"])
        rig.run(90)
        rig.end_job(job)
        rig.run(15)
    finally:
        store.close()
    return write_demo_report(url, folder / "report.html")


@pytest.fixture
def browser(chromium: str, tmp_path: Path) -> Iterator[DevTools]:
    tools = DevTools(chromium, tmp_path / "profile")
    try:
        tools.open_page()
        yield tools
    finally:
        tools.close()


def test_the_report_loads_cleanly_and_shows_the_script_name_as_text(
    browser: DevTools, html_report: Path
) -> None:
    page_url = html_report.as_uri()
    browser.call("Page.navigate", {"url": page_url})
    browser.wait_for("Page.loadEventFired")
    browser.drain(1.0)

    errors = [
        e for e in browser.events
        if e["method"] == "Runtime.exceptionThrown"
        or (e["method"] == "Runtime.consoleAPICalled"
            and e["params"]["type"] in ("error", "assert"))
        or (e["method"] == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")
    ]
    assert errors == []
    dialogs = [e for e in browser.events if e["method"] == "Page.javascriptDialogOpening"]
    assert dialogs == []
    requested = [e["params"]["request"]["url"] for e in browser.events
                 if e["method"] == "Network.requestWillBeSent"]
    assert page_url in requested
    assert [u for u in requested if u != page_url and not u.startswith("data:")] == []

    def evaluate(expression: str) -> object:
        result = browser.call("Runtime.evaluate",
                              {"expression": expression, "returnByValue": True})
        return result["result"].get("value")

    assert SCRIPT_NAME in str(evaluate("document.body.innerText"))
    assert evaluate("document.scripts.length") == 0
    assert evaluate("document.querySelectorAll('iframe').length") == 0
    # the charts decoded: four images with real sizes, all from data: URIs
    sizes = evaluate("Array.from(document.images).map(i => [i.naturalWidth, i.src.slice(0, 5)])")
    assert isinstance(sizes, list) and len(sizes) == 4
    assert all(width > 500 and scheme == "data:" for width, scheme in sizes)
