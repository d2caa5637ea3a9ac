"""The live status page in a real headless Chromium (Debian's, driven by Playwright for Python; no browser
download): log in with the array's account through the page's form, then watch a TrueCopy pair go
COPY -> PAIR -> PSUE (link cut) -> PAIR (resync) in the DOM as the page polls. Saves docs/status-page.png."""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from vspemu.client import ApiError, VspClient
from vspemu.client.nbd import NbdClient
from vspemu.lab import SystemProcess, set_link_ports
from vspemu.system.storage import DEFAULT_PASSWORD, DEFAULT_USER

pytestmark = pytest.mark.e2e

MiB = 1 << 20
CG = "webcg"
PAGE = "/ConfigurationManager/vspemu/status"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "status-page.png"

playwright_api = pytest.importorskip("playwright.sync_api")


@pytest.fixture
def browser() -> Iterator[object]:
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (./test installs it)")
    with playwright_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


def pair_cell(page: object, cls: str, status: str) -> None:
    """Wait (as the page polls every second) until the pair's row shows ``status`` in the column ``cls``.

    (Playwright's locator assertions: its string-evaluating waits would need 'unsafe-eval', which the page's
    Content-Security-Policy rightly forbids.)"""
    cell = page.locator(f'tr[data-pair="{CG}/p1"] td.{cls}')  # type: ignore[attr-defined]
    playwright_api.expect(cell).to_have_text(status, timeout=60_000)


def test_status_page_follows_a_pair(linked: tuple[SystemProcess, SystemProcess, VspClient, VspClient],
                                    browser: object) -> None:
    p, s, pc, sc = linked
    pv, sv = pc.create_ldev("1G"), sc.create_ldev("1G")
    pc.add_lun(pv)
    sc.add_lun(sv)
    with NbdClient("127.0.0.1", p.nbd_port, str(pv)) as c:
        chunk = os.urandom(8 * MiB)  # 1 GiB of data: a copy long enough to be seen (seconds, not a blink)
        for off in range(0, 1024 * MiB, 8 * MiB):
            c.write(off, chunk)
    # the primary's certificate is self-signed for the lab: this browser context trusts it
    context = browser.new_context(ignore_https_errors=True, viewport={"width": 1200, "height": 820})  # type: ignore[attr-defined]
    page = context.new_page()
    page.goto(f"{p.rest_url}{PAGE}")
    # not logged in: the form; a wrong password is refused
    page.fill("#user", DEFAULT_USER)
    page.fill("#password", "wrong")
    page.click("#login button[type=submit]")
    playwright_api.expect(page.locator("#login-error")).to_contain_text("401")
    page.fill("#password", DEFAULT_PASSWORD)
    page.click("#login button[type=submit]")
    page.wait_for_selector("#view", state="visible")
    assert "token" not in page.url
    token = page.evaluate("sessionStorage.getItem('vspemu.token')")
    assert isinstance(token, str) and len(token) >= 16
    assert page.text_content("#system").startswith(p.storage_device_id)
    assert page.locator("#paths tbody tr").count() == 2  # CL3-A and CL4-A to the secondary

    # COPY: the secondary is held (SIGSTOP) as soon as the primary shows the pair copying, so the copy cannot
    # finish under our eyes
    job = pc.invoke("POST", "remote-mirror-copypairs",
                    {"copyGroupName": CG, "copyPairName": "p1", "replicationType": "TC",
                     "remoteStorageDeviceId": s.storage_device_id, "pvolLdevId": pv, "svolLdevId": sv,
                     "isNewGroupCreation": True, "fenceLevel": "NEVER", "copyPace": 1}, remote=sc, wait=False)
    local: dict = {}
    while local.get("pvolStatus") not in ("COPY", "PAIR"):
        try:
            local = pc.get(f"remote-mirror-copypairs/NotSpecified,{CG},{CG}P_,NotSpecified,p1")
        except ApiError:
            local = {}  # not created yet
    s.pause()
    try:
        if local["pvolStatus"] == "COPY":
            pair_cell(page, "status", "COPY")
            pair_cell(page, "pvol-status", "COPY")
        else:  # the copy won the race with SIGSTOP (a very fast machine): COPY cannot be shown this time
            assert local["pvolStatus"] == "PAIR"
            warnings.warn("the initial copy ended before the page could show COPY", stacklevel=1)
    finally:
        s.resume()
    pc.wait_job(job)
    pair_cell(page, "status", "PAIR")
    pair_cell(page, "svol-status", "PAIR")
    assert page.text_content(f'tr[data-pair="{CG}/p1"] td.progress .percent') == "100 %"

    # PSUE: the secondary's replication ports go offline and the host writes to the P-VOL (fence NEVER)
    set_link_ports(sc, False)
    with NbdClient("127.0.0.1", p.nbd_port, str(pv)) as c:
        c.write(MiB, b"n" * 4096)
    pair_cell(page, "status", "PSUE")
    playwright_api.expect(page.locator("#paths td.path-status").first).not_to_have_text("NML_01", timeout=60_000)
    assert page.text_content(f'tr[data-pair="{CG}/p1"] td.dirty') != "0 B"  # the write is marked

    # PAIR again after the link is back and a resync
    set_link_ports(sc, True)
    pc.wait_path_status(f"{s.serial},R9,0", "NML_01", 30)
    pc.invoke("PUT", f"remote-mirror-copypairs/{s.storage_device_id},{CG},{CG}P_,{CG}S_,p1/actions/resync/invoke",
              {"parameters": {"replicationType": "TC"}}, remote=sc)
    pair_cell(page, "status", "PAIR")
    pair_cell(page, "peer-status", "PAIR")
    pair_cell(page, "dirty", "0 B")

    # what a data value cannot do: become markup (the page only ever sets textContent)
    assert page.evaluate("document.querySelectorAll('#groups script, #groups img').length") == 0
    # the faults in force: a harmless one (1 ms latency) is listed while set, for the screenshot too
    delay = pc.add_fault("path-delay", remoteSerialNumber=s.serial, pathGroupId=0, latencyMs=1)
    fault_row = page.locator(f'#faults tr[data-fault="{delay["faultId"]}"]')
    playwright_api.expect(fault_row.locator("td.kind")).to_have_text("path-delay", timeout=30_000)
    playwright_api.expect(fault_row.locator("td.target")).to_contain_text(f"path group 0 to serial {s.serial}")
    page.screenshot(path=str(SCREENSHOT), full_page=True)
    pc.clear_fault(delay["faultId"])
    playwright_api.expect(page.locator("#faults tbody")).to_have_text("no faults in force", timeout=30_000)

    # log out: the session is deleted on the system and the form is back
    page.click("#logout")
    page.wait_for_selector("#login", state="visible")
    assert page.evaluate("sessionStorage.getItem('vspemu.token')") is None
    context.close()
