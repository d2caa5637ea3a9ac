"""The lab status page (``vspemu up``'s console: every system on one page) in a real headless Chromium (Debian's,
driven by Playwright for Python): a three-system chain lab started with ``vspemu up --detach``; log in with the
lab's account through the page's form; a TrueCopy pair 410001 -> 410002 and a UR pair 410002 -> 410003 reach
PAIR on both sides; a path-group fault on 410001 and a host write put the TrueCopy pair in PSUE, and the fault is
listed under 410001; after clearing it and a resync the pair is PAIR again. Saves docs/lab-status-page.png."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vspemu.client import VspClient
from vspemu.client.nbd import NbdClient
from vspemu.lab import read_lab_state, stop_lab
from vspemu.system.storage import DEFAULT_PASSWORD, DEFAULT_USER

pytestmark = pytest.mark.e2e

MiB = 1 << 20
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "lab-status-page.png"

playwright_api = pytest.importorskip("playwright.sync_api")


@pytest.fixture
def browser() -> Iterator[Any]:
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (./test installs it)")
    with playwright_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[dict[str, Any]]:
    d = tmp_path / "lab"
    try:
        r = subprocess.run([sys.executable, "-m", "vspemu", "up", "--systems", "3", "--topology", "chain",
                            "--free-ports", "--detach", "--data-dir", str(d)], capture_output=True, text=True,
                           timeout=180)
        assert r.returncode == 0, r.stdout + r.stderr
        state = read_lab_state(d)
        assert state is not None and state["console"]
        yield state
    finally:
        stop_lab(d)


def cell(page: Any, pair: str, cls: str, status: str) -> None:
    """Wait (the page polls every second) until the pair's row shows ``status`` in the column ``cls``."""
    playwright_api.expect(page.locator(f'#pairs tr[data-pair="{pair}"] td.{cls} .st')).to_have_text(
        status, timeout=90_000)


def volume(c: VspClient) -> int:
    v = c.create_ldev("64M")
    c.add_lun(v)
    return v


def test_lab_page_shows_every_system(lab: dict[str, Any], browser: Any) -> None:
    systems = lab["systems"]
    c1, c2, c3 = (VspClient(s["restUrl"], verify=s["cert"]) for s in systems)
    try:
        context = browser.new_context(ignore_https_errors=True, viewport={"width": 1400, "height": 900})
        page = context.new_page()
        page.goto(lab["console"]["url"])
        # not logged in: the form; a wrong password is refused
        page.fill("#user", DEFAULT_USER)
        page.fill("#password", "wrong")
        page.click("#login button[type=submit]")
        playwright_api.expect(page.locator("#login-error")).to_contain_text("401")
        page.fill("#password", DEFAULT_PASSWORD)
        page.click("#login button[type=submit]")
        page.wait_for_selector("#view", state="visible")
        assert "token" not in page.url
        token = page.evaluate("sessionStorage.getItem('vspemu.lab.token')")
        assert isinstance(token, str) and len(token) >= 32
        rows = page.locator("#systems tbody tr")
        playwright_api.expect(rows).to_have_count(3)
        for s in systems:
            playwright_api.expect(page.locator(f'#systems tr[data-system="{s["serial"]}"] td.state')).to_have_text("up")
        # every system's own section: 410002 has paths to both its neighbours
        playwright_api.expect(page.locator('section[data-system="410002"] table.paths td.path-status')).to_have_count(4)

        # a TrueCopy pair 410001 -> 410002 and a UR pair 410002 -> 410003
        tp, ts, up, us = volume(c1), volume(c2), volume(c2), volume(c3)
        for port, ldev in ((systems[0]["nbdPort"], tp), (systems[1]["nbdPort"], up)):
            with NbdClient("127.0.0.1", port, str(ldev)) as nbd:
                nbd.write(0, os.urandom(8 * MiB))
        c1.invoke("POST", "remote-mirror-copypairs", {
            "copyGroupName": "labtc", "copyPairName": "t0", "replicationType": "TC",
            "remoteStorageDeviceId": c2.storage_device_id, "pvolLdevId": tp, "svolLdevId": ts,
            "isNewGroupCreation": True, "fenceLevel": "NEVER", "copyPace": 15}, remote=c2)
        for c in (c2, c3):
            c.create_journal(1, [c.create_ldev("64M")])
        c2.invoke("POST", "remote-mirror-copypairs", {
            "copyGroupName": "labur", "copyPairName": "u0", "replicationType": "UR",
            "remoteStorageDeviceId": c3.storage_device_id, "pvolLdevId": up, "svolLdevId": us,
            "isNewGroupCreation": True, "fenceLevel": "ASYNC", "doInitialCopy": True,
            "muNumber": 1, "pvolJournalId": 1, "svolJournalId": 1}, remote=c3)
        for pair in ("410001/labtc/t0", "410002/labur/u0"):
            cell(page, pair, "pvol-status", "PAIR")
            cell(page, pair, "svol-status", "PAIR")
        tc_row = page.locator('#pairs tr[data-pair="410001/labtc/t0"]')
        playwright_api.expect(tc_row.locator("td.primary")).to_have_text(f"410001 LDEV {tp}")
        playwright_api.expect(tc_row.locator("td.secondary")).to_have_text(f"410002 LDEV {ts}")
        playwright_api.expect(page.locator('#pairs tr[data-pair="410002/labur/u0"] td.type')).to_have_text("UR")
        # the UR master journal on 410002 is listed with its mirror
        playwright_api.expect(page.locator('section[data-system="410002"] table.journals tr[data-journal="1"] '
                                           'td.mirrors')).to_contain_text("MU1")

        # PSUE on a link fault: 410001's path group to 410002 held down, then a host write (fence NEVER)
        fault = c1.add_fault("path-group", remoteSerialNumber=410002, pathGroupId=0)
        with NbdClient("127.0.0.1", systems[0]["nbdPort"], str(tp)) as nbd:
            nbd.write(MiB, b"n" * 4096)
        cell(page, "410001/labtc/t0", "pvol-status", "PSUE")
        fault_row = page.locator(f'section[data-system="410001"] table.faults tr[data-fault="{fault["faultId"]}"]')
        playwright_api.expect(fault_row.locator("td.kind")).to_have_text("path-group")
        playwright_api.expect(page.locator('#systems tr[data-system="410001"] td.fault-count')).to_have_text("1")
        playwright_api.expect(page.locator('section[data-system="410001"] table.paths td.path-status').first
                              ).not_to_have_text("NML_01", timeout=60_000)
        assert page.text_content('#pairs tr[data-pair="410001/labtc/t0"] td.dirty') != "0 B"  # the write is marked
        cell(page, "410002/labur/u0", "pvol-status", "PAIR")  # the other pair goes on copying
        page.screenshot(path=str(SCREENSHOT), full_page=True)

        # cleared and resynchronized: PAIR on both sides again
        c1.clear_fault(fault["faultId"])
        c1.wait_path_status("410002,R9,0", "NML_01", 60)
        c1.invoke("PUT", f"remote-mirror-copypairs/{c2.storage_device_id},labtc,labtcP_,labtcS_,t0/actions/resync/"
                  "invoke", {"parameters": {"replicationType": "TC"}}, remote=c2)
        cell(page, "410001/labtc/t0", "pvol-status", "PAIR")
        cell(page, "410001/labtc/t0", "svol-status", "PAIR")
        playwright_api.expect(page.locator('section[data-system="410001"] table.faults tbody')).to_have_text(
            "no faults in force", timeout=30_000)

        # what a data value cannot do: become markup (the page only ever sets textContent)
        assert page.evaluate("document.querySelectorAll('#view script, #view img').length") == 0
        # log out: the form is back and the console token no longer works
        page.click("#logout")
        page.wait_for_selector("#login", state="visible")
        assert page.evaluate("sessionStorage.getItem('vspemu.lab.token')") is None
        r = context.request.get(lab["console"]["url"] + "/api/status", headers={"Authorization": f"Session {token}"})
        assert r.status == 401
        context.close()
    finally:
        for c in (c1, c2, c3):
            c.close()
