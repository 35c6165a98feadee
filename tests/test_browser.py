"""The member's pages in a real headless Chromium (Debian's), driven by Playwright.

Needs /usr/bin/chromium (`apt-get install chromium`) and the playwright package (its
own browser download is not used). Skipped when either is missing, unless
LISTGATE_TEST_BROWSER=required.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from gateway import lists
from gateway.clock import ManualClock
from gateway.lists import MailingList, Member
from gateway.schema import Mode
from gateway.signing import LinkSigner
from gateway.store import Store
from gateway.templates import Templates
from gateway.web import WebServer
from tests.support import REPO

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
REQUIRED = os.environ.get("LISTGATE_TEST_BROWSER", "") == "required"


def _missing() -> str:
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is missing (apt-get install chromium)"
    if importlib.util.find_spec("playwright") is None:
        return "the playwright package is missing (pip install playwright; no browser download)"
    return ""


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    missing = _missing()
    if missing:
        if REQUIRED:
            pytest.fail(f"LISTGATE_TEST_BROWSER=required but {missing}")
        pytest.skip(f"browser tests need Chromium and Playwright: {missing}")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS,
                                    headless=True)
        try:
            yield browser
        finally:
            browser.close()


class Site:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.signer = LinkSigner(bytes(range(32)))
        with store.write() as conn:
            self.discuss = lists.create(conn, "discuss@example.org", now=0.0,
                                        display_name="Discuss")
            self.alice = lists.add_member(conn, self.discuss, "alice@example.net", now=0.0,
                                          display_name="Alice <Example>")
            self.bob = lists.add_member(conn, self.discuss, "bob@example.net", now=0.0,
                                        mode=Mode.DIGEST_MIME)
        self.server = WebServer(store, signer=self.signer,
                                templates=Templates(REPO / "templates"), clock=ManualClock(),
                                base_url="")
        host, port = self.server.start("127.0.0.1", 0)
        self.origin = f"http://{host}:{port}"

    def url(self, member: Member, kind: str = "u") -> str:
        token = self.signer.member_token(member.list_id, member.id, member.address)
        return f"{self.origin}/l/{member.list_id}/{kind}/{token}"

    def member(self, lst: MailingList, address: str) -> Member | None:
        with self.store.read() as conn:
            return lists.find_member(conn, lst.id, [address])


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    store = Store(f"sqlite:///{tmp_path / 'browser.db'}", clock=ManualClock())
    store.upgrade()
    site = Site(store)
    try:
        yield site
    finally:
        site.server.stop()
        store.dispose()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(java_script_enabled=False)
    page = context.new_page()
    page.set_default_timeout(15_000)
    problems: list[str] = []
    # A Content-Security-Policy violation (or any other error) shows up on the console.
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
    yield page
    context.close()
    assert problems == []


def test_browser_preferences_page_changes_mode_then_unsubscribes(site: Site, page: Page) -> None:
    page.goto(site.url(site.alice))
    assert page.title() == "Your subscription to Discuss"
    assert "Alice <Example>" in page.inner_text("main")  # shown as text, not markup
    assert page.is_checked("input[name=choice][value=regular]")

    page.check("input[name=choice][value=digest-html]")
    page.get_by_role("button", name="Save my choice").click()
    page.wait_for_load_state()
    assert page.inner_text("#outcome") == "Saved"
    member = site.member(site.discuss, "alice@example.net")
    assert member is not None and member.mode is Mode.DIGEST_HTML

    page.goto(site.url(site.alice))
    assert page.is_checked("input[name=choice][value=digest-html]")
    page.get_by_role("button", name="Unsubscribe from Discuss").click()
    page.wait_for_load_state()
    assert page.inner_text("#outcome") == "You are unsubscribed"
    assert site.member(site.discuss, "alice@example.net") is None
    assert site.member(site.discuss, "bob@example.net") is not None


def test_browser_per_post_button_switches_delivery(site: Site, page: Page) -> None:
    page.goto(site.url(site.bob, "r"))
    page.get_by_role("button", name="Switch to per-post delivery").click()
    page.wait_for_load_state()
    assert page.inner_text("#outcome") == "Saved"
    # The form posted to the member's /u/ page, whose link leads back to the choices.
    assert page.url == site.url(site.bob)
    member = site.member(site.discuss, "bob@example.net")
    assert member is not None and member.mode is Mode.REGULAR
    page.get_by_role("link", name="Change something else").click()
    page.wait_for_load_state()
    assert page.is_checked("input[name=choice][value=regular]")
