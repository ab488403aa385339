"""The status page in a real headless Chromium (Debian's, driven by Playwright) against a real server."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import pytest
from helpers import start_extensions, wait_state

CHROMIUM = os.environ.get("KERB_JUPYTER_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.browser


@contextlib.asynccontextmanager
async def status_page(app, base_url: str, **page_args):
    """The status page, logged in with the server's token, in a fresh headless Chromium."""
    from playwright.async_api import async_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium is not installed: run scripts/setup")
    url = f"http://127.0.0.1:{app.port}{base_url}kerb-jupyter/?token={app.identity_provider.token}"
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        try:
            page = await browser.new_page(**page_args)
            await page.goto(url)
            yield page
        finally:
            await browser.close()


@pytest.fixture
def jp_server_config(kj_config, sandbox):
    from conftest import write_config

    clusters = {n: sandbox.cluster_config(n) for n in sandbox.servers}
    clusters["offline"] = {"host": "localhost", "port": 9, "dbname": "x", "connect_timeout": 2}
    write_config(kj_config, sandbox, clusters=clusters)
    return {"ServerApp": {"jpserver_extensions": {"kerb_jupyter": True}},
            "KerbJupyterApp": {"config_file": str(kj_config)}}


async def test_status_page_in_a_real_browser(jp_serverapp, jp_fetch, jp_base_url, sandbox, tmp_path):
    await start_extensions(jp_serverapp)
    await wait_state(jp_fetch, "valid")
    async with status_page(jp_serverapp, jp_base_url, viewport={"width": 1000, "height": 900}) as page:
        await page.wait_for_selector("#banner.green")
        assert await page.text_content("#principal") == sandbox.principal
        assert await page.text_content("#headline") == "Ticket valid"
        first = await page.text_content("#countdown")
        await page.wait_for_function(
            "(first) => document.getElementById('countdown').textContent !== first", arg=first)
        assert "config" in await page.text_content("#identity")
        # One check button per cluster; a good one and an unreachable one.
        await page.click("tr[data-cluster=analytics] button.check")
        await page.wait_for_selector("tr[data-cluster=analytics] td.result.ok")
        ok = await page.text_content("tr[data-cluster=analytics] td.result")
        assert sandbox.principal in ok and "GSSAPI yes" in ok
        await page.click("tr[data-cluster=offline] button.check")
        await page.wait_for_selector("tr[data-cluster=offline] td.result.bad")
        bad = await page.text_content("tr[data-cluster=offline] td.result")
        assert "cannot reach cluster 'offline'" in bad
        # Renew now goes through XSRF-protected POST with the login cookie.
        await page.click("#renew")
        await page.wait_for_function("document.getElementById('renew-result').textContent !== ''")
        assert await page.text_content("#renew-result") == "renewed"
        # The same POST with the login cookie but without the XSRF header is refused by Jupyter.
        refused = await page.evaluate(
            "fetch(document.querySelector('meta[name=kj-base]').content + '/api/renew', "
            "{method: 'POST', credentials: 'same-origin'}).then(r => r.status)")
        assert refused == 403
        # KERB_JUPYTER_SCREENSHOTS=docs keeps the picture (docs/status-page.png was made this way).
        shots = Path(os.environ.get("KERB_JUPYTER_SCREENSHOTS", tmp_path))
        shots.mkdir(exist_ok=True)
        await page.screenshot(path=str(shots / "status-page.png"), full_page=True)
        assert (shots / "status-page.png").stat().st_size > 10_000


async def test_status_page_turns_red_when_the_kdc_rejects_us(jp_serverapp, jp_fetch, jp_base_url, sandbox):
    from helpers import extension
    from playwright.async_api import async_playwright

    keeper = extension(jp_serverapp).keeper
    keeper.principal = keeper.state.principal = "nobody@KERB.TEST"
    await start_extensions(jp_serverapp)
    await wait_state(jp_fetch, "error")
    url = f"http://127.0.0.1:{jp_serverapp.port}{jp_base_url}kerb-jupyter/?token={jp_serverapp.identity_provider.token}"
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        try:
            page = await browser.new_page()
            await page.goto(url)
            await page.wait_for_selector("#banner.red")
            assert await page.text_content("#headline") == "Needs attention"
            assert "nobody@KERB.TEST" in await page.text_content("#error")
            assert await page.is_visible("#error")
            assert "-1765" not in await page.text_content("#error")  # words, not krb5 numbers
            # Renew now after rejected credentials: the reason, and no new request to the KDC.
            await page.click("#renew")
            await page.wait_for_function("document.getElementById('renew-result').textContent !== ''")
            said = await page.text_content("#renew-result")
            assert "nobody@KERB.TEST" in said and "to protect the account from lockout" in said
        finally:
            await browser.close()
