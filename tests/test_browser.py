"""The page in a real browser (issue 5): Debian's Chromium driven by Playwright.

Every page of every test is watched: a console error (a CSP violation is one), an
uncaught exception, a dialog, or any request or WebSocket to another origin fails
the test. Screenshots go to `test-artifacts/` on every run.

Chromium: /usr/bin/chromium (Playwright's own browser download is not used).
Missing or not starting: a failure under CI=true, elsewhere a loud skip.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from conftest import ROOT, Visitor, free_port

pytestmark = pytest.mark.browser

IN_CI = os.environ.get("CI", "").lower() == "true"

try:
    import playwright.async_api as playwright_api
    from playwright.async_api import Browser, BrowserContext, Page, expect
except ImportError:  # pragma: no cover - `make test` installs it
    if IN_CI:
        raise
    pytest.skip("BROWSER TESTS NOT RUN: the Python playwright package is not installed", allow_module_level=True)

# CHATD_CHROMIUM overrides the browser's path (e.g. to check the skip/fail behaviour).
CHROMIUM = Path(os.environ.get("CHATD_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking"]
ARTIFACTS = ROOT / "test-artifacts"
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 360, "height": 740}

# What Chromium itself logs as a console error when a server it talks to is down. Tolerated
# only while a test has the server down on purpose (the restart test); never otherwise.
NETWORK_DOWN = re.compile(
    r"ERR_INTERNET_DISCONNECTED|ERR_CONNECTION_REFUSED|ERR_CONNECTION_RESET|ERR_EMPTY_RESPONSE|WebSocket connection to"
)

expect.set_options(timeout=5000)

CSP_LISTENER = """
addEventListener("securitypolicyviolation", (e) =>
  console.error(`CSP violation: ${e.violatedDirective} blocked ${e.blockedURI || "inline"}`));
"""


def no_browser(reason: str):
    message = f"BROWSER TESTS NOT RUN: {reason}"
    if IN_CI:
        pytest.fail(message + " (CI=true: a missing browser is a failure)", pytrace=False)
    message += " — install Debian's chromium (`make browser` as root) to run them"
    warnings.warn(message, UserWarning, stacklevel=2)  # in pytest's warnings summary, not only behind -rs
    pytest.skip(message)


# -- the browser and the watched pages ----------------------------------------------


@pytest.fixture
async def browser():
    if not CHROMIUM.exists():
        no_browser(f"{CHROMIUM} is missing")
    async with playwright_api.async_playwright() as playwright:
        try:
            launched = await playwright.chromium.launch(
                executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
            )
        except Exception as exc:  # noqa: BLE001 - any launch failure means "no browser"
            no_browser(f"{CHROMIUM} did not start: {str(exc).splitlines()[0]}")
        try:
            yield launched
        finally:
            await launched.close()


@dataclass
class Watch:
    """Everything a page must never do, collected for all pages of one test."""

    problems: list[str] = field(default_factory=list)
    tolerated: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # shown (with -s), not failed
    server_down: bool = False  # the restart test says when
    # (status, path) of requests a step expects to fail: Chromium logs every non-2xx answer to
    # fetch() as a console error ("Failed to load resource: ... status of 401"), which the page
    # cannot prevent. Tolerated for exactly that status and path, only during that step.
    expected_failures: set[tuple[int, str]] = field(default_factory=set)

    def attach(self, page: Page, label: str, origin: str) -> None:
        def on_console(message) -> None:
            if message.type == "warning":
                self.warnings.append(f"{label}: {message.text}")
            if message.type != "error":
                return
            where = message.location.get("url") or ""
            text = f"{label}: console error: {message.text} ({where})"
            (self.tolerated if self.tolerable(message.text, where) else self.problems).append(text)

        def on_request(request) -> None:
            if not request.url.startswith(("data:", "blob:")) and origin_of(request.url) != origin:
                self.problems.append(f"{label}: request to another origin: {request.method} {request.url}")

        def on_websocket(ws) -> None:
            if origin_of(ws.url) != origin:
                self.problems.append(f"{label}: WebSocket to another origin: {ws.url}")

        def on_dialog(dialog) -> None:
            self.problems.append(f"{label}: a {dialog.type} dialog fired: {dialog.message!r}")
            asyncio.ensure_future(dialog.dismiss())

        page.on("console", on_console)
        page.on("pageerror", lambda error: self.problems.append(f"{label}: uncaught {error!r}"))
        page.on("request", on_request)
        page.on("websocket", on_websocket)
        page.on("dialog", on_dialog)

    def tolerable(self, text: str, url: str) -> bool:
        if self.server_down and NETWORK_DOWN.search(text):
            return True
        failed = re.fullmatch(r"Failed to load resource: the server responded with a status of (\d+) \(.*\)", text)
        return bool(failed) and (int(failed[1]), urlsplit(url).path) in self.expected_failures

    def check(self) -> None:
        if self.warnings:
            print("console warnings:", *self.warnings, sep="\n  ")
            self.warnings.clear()
        problems, self.problems = self.problems, []
        assert not problems, "the page misbehaved:\n" + "\n".join(problems)


def origin_of(url: str) -> str:
    parts = urlsplit(url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    return f"{scheme}://{parts.netloc}"


@pytest.fixture
async def open_page(browser: Browser):
    """`await open_page(url, label)` → a Page in a new context (its own cookies) at the chat page."""
    watch = Watch()
    contexts: list[BrowserContext] = []

    async def open_(
        url: str, label: str, *, viewport=DESKTOP, context: BrowserContext | None = None, before_goto=None
    ) -> Page:
        if context is None:
            phone = viewport == PHONE
            context = await browser.new_context(viewport=viewport, is_mobile=phone, has_touch=phone)
            contexts.append(context)
        page = await context.new_page()
        watch.attach(page, label, origin_of(url))
        # Chromium logs CSP violations itself; the event makes sure none goes unseen.
        await page.add_init_script(CSP_LISTENER)
        if before_goto is not None:
            await before_goto(page)
        response = await page.goto(url + "/")
        assert response is not None and response.ok
        return page

    open_.watch = watch
    try:
        yield open_
        watch.check()
    finally:
        for context in contexts:
            await context.close()


def screenshot(page: Page, name: str):
    ARTIFACTS.mkdir(exist_ok=True)
    return page.screenshot(path=str(ARTIFACTS / f"{name}.png"))


# -- what a user sees and does ---------------------------------------------------------


def status(page: Page):
    return page.get_by_role("status")


def my_name(page: Page):
    return page.get_by_test_id("me-name")


def messages(page: Page):
    """The items of the message log of the room on show."""
    return page.get_by_role("main").get_by_role("list").get_by_role("listitem")


def message(page: Page, text: str):
    return messages(page).filter(has=page.get_by_text(text, exact=True))


def online(page: Page):
    return page.get_by_role("region", name=re.compile("^Online")).get_by_role("listitem")


def room_button(page: Page, room: str):
    return page.get_by_role("complementary").get_by_role("button", name=re.compile(rf"^#?{room}\b"))


async def online_now(page: Page) -> Page:
    await expect(status(page)).to_have_text("Online")
    return page


async def send(page: Page, text: str) -> None:
    box = page.get_by_label("Message")
    await box.fill(text)
    await box.press("Enter")
    await expect(box).to_have_value("")


async def shown_texts(page: Page) -> list[str]:
    return await page.get_by_role("main").get_by_role("list").locator(".text").all_text_contents()


async def session_name(page: Page, base_url: str) -> str:
    """The name the server holds for this page's cookie, asked over HTTP with the same cookie jar."""
    response = await page.context.request.get(base_url + "/api/session")
    return (await response.json())["name"]


async def login_form(page: Page, username: str, password: str, button: str):
    await page.get_by_label("Username").fill(username)
    await page.get_by_label("Password").fill(password)
    await page.get_by_role("button", name=button, exact=True).click()


# -- acceptance 1: two guests chat ------------------------------------------------------


async def test_two_guests_see_their_own_names_and_each_others_messages(start_chatd, open_page):
    url = await start_chatd()

    async def slow_session(page: Page) -> None:
        async def delay(route):
            await asyncio.sleep(0.4)
            await route.continue_()

        await page.route("**/api/session", delay)

    alice = await open_page(url, "alice", before_goto=slow_session)
    await expect(status(alice)).to_have_text("Connecting")  # before the socket is up
    bob = await open_page(url, "bob")
    await online_now(alice)
    await online_now(bob)

    names = {}
    for label, page in (("alice", alice), ("bob", bob)):
        names[label] = await session_name(page, url)
        assert re.fullmatch(r"guest-\d{4}", names[label])
        await expect(my_name(page)).to_have_text(names[label])
    # The online list of general shows both, on both pages.
    for page in (alice, bob):
        await expect(online(page).filter(has_text=names["alice"])).to_have_count(1)
        await expect(online(page).filter(has_text=names["bob"])).to_have_count(1)

    # Keyboard only: the first Tab reaches the skip link, which leads to the message box; Enter sends.
    await alice.keyboard.press("Tab")
    skip = alice.get_by_role("link", name="Skip to message box")
    await expect(skip).to_be_focused()
    await expect(skip).to_be_in_viewport()
    await alice.keyboard.press("Enter")
    await expect(alice.get_by_label("Message")).to_be_focused()
    await alice.keyboard.type("hello from alice")
    started = time.monotonic()
    await alice.keyboard.press("Enter")
    seen = message(bob, "hello from alice")
    await expect(seen).to_be_visible(timeout=1000)
    print(f"alice → bob in {1000 * (time.monotonic() - started):.0f} ms")
    await expect(seen).to_contain_text(names["alice"])
    await expect(seen.locator("time")).to_have_count(1)  # with the local time
    await expect(message(alice, "hello from alice")).to_contain_text(names["alice"])

    await send(bob, "hi alice")
    await expect(message(alice, "hi alice")).to_contain_text(names["bob"], timeout=1000)
    await expect(message(bob, "hi alice")).to_have_count(1)
    # Announced to screen readers on the other page, not on the sender's own.
    await expect(alice.locator("[aria-live=polite]")).to_have_text(f"{names['bob']}: hi alice")
    await expect(bob.locator("[aria-live=polite]")).not_to_contain_text("hi alice")

    # The account form in a sane tab order.
    await alice.get_by_label("Username").focus()
    for label in ("Password", "Log in", "Register"):
        await alice.keyboard.press("Tab")
        focused = alice.get_by_label(label) if label == "Password" else alice.get_by_role("button", name=label)
        await expect(focused).to_be_focused()
    await screenshot(alice, "two-guests-desktop")


# -- acceptance 2: accounts through the forms ---------------------------------------------


async def test_register_log_out_log_in_follow_the_name(start_chatd, open_page):
    url = await start_chatd()
    alice = await online_now(await open_page(url, "alice"))
    bob = await online_now(await open_page(url, "bob"))
    guest_before = await my_name(alice).text_content()

    # Register: the shown name follows within a moment; the new socket carries the account.
    await login_form(alice, "Alice_1", "correct horse battery", "Register")
    await expect(my_name(alice)).to_have_text("Alice_1", timeout=1000)
    await online_now(alice)
    await send(alice, "now with an account")
    await expect(message(bob, "now with an account")).to_contain_text("Alice_1")
    await expect(online(bob).filter(has_text="Alice_1")).to_have_count(1)
    await expect(online(bob).filter(has_text=guest_before)).to_have_count(0)  # the old session's socket is gone
    await expect(my_name(alice)).to_have_text("Alice_1")  # not a brand-new guest (the ordering rule)
    assert await session_name(alice, url) == "Alice_1"

    # A second tab of the same session: when the first logs out, it shows the ending and recovers.
    tab = await online_now(await open_page(url, "alice tab 2", context=alice.context))
    await expect(my_name(tab)).to_have_text("Alice_1")
    await screenshot(alice, "account-desktop")

    await alice.bring_to_front()  # a background tab gets no animation frames: Playwright's clicks would stall
    await alice.get_by_role("button", name="Log out").click()
    await expect(my_name(alice)).to_have_text(re.compile(r"^guest-\d{4}$"), timeout=1000)
    guest_after = await my_name(alice).text_content()
    assert guest_after == await session_name(alice, url)
    await expect(status(tab)).to_have_text("Session ended")
    await expect(tab.get_by_role("alert").filter(has_text="logged out")).to_be_visible()
    await screenshot(tab, "session-ended-desktop")
    await expect(my_name(tab)).to_have_text(guest_after)  # the tab picked up the cookie's new session
    await online_now(tab)
    await online_now(alice)
    await send(alice, "a guest again")
    await expect(message(bob, "a guest again")).to_contain_text(guest_after)

    # A wrong password shows the server's own message.
    open_page.watch.expected_failures.add((401, "/api/login"))
    async with alice.expect_response("**/api/login") as answer:
        await login_form(alice, "alice_1", "not the password", "Log in")
    refusal = await (await answer.value).json()
    assert (await answer.value).status == 401
    await expect(alice.get_by_role("alert").filter(has_text=refusal["message"])).to_be_visible()
    open_page.watch.expected_failures.clear()
    await expect(my_name(alice)).to_have_text(guest_after)

    # Log in (any case of the username): the account's name again.
    await login_form(alice, "alice_1", "correct horse battery", "Log in")
    await expect(my_name(alice)).to_have_text("Alice_1", timeout=1000)
    await expect(alice.get_by_role("alert").filter(has_text=refusal["message"])).to_have_count(0)
    await online_now(alice)
    await send(alice, "back again")
    await expect(message(bob, "back again")).to_contain_text("Alice_1")
    await expect(my_name(alice)).to_have_text("Alice_1")


# -- acceptance 3: user text is text ----------------------------------------------------------


async def test_html_in_a_message_is_shown_as_text_under_the_csp(start_chatd, open_page):
    url = await start_chatd()
    alice = await online_now(await open_page(url, "alice"))
    bob = await online_now(await open_page(url, "bob"))

    page_response = await alice.context.request.get(url + "/")
    csp = page_response.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp

    evil = "<img src=x onerror=alert(1)>"
    requested: list[str] = []
    for page in (alice, bob):
        page.on("request", lambda request: requested.append(request.url))
    await send(alice, evil)
    for page in (alice, bob):
        await expect(message(page, evil)).to_have_count(1)
        await expect(page.get_by_role("main").locator("img")).to_have_count(0)
    await asyncio.sleep(0.3)  # room for an onerror to fire, were the text ever parsed as HTML
    assert not [u for u in requested if urlsplit(u).path == "/x"]
    open_page.watch.check()  # no dialog, no console error, no CSP violation

    # The watch is not blind: an inline script, as an injection would add, is refused and reported.
    await alice.evaluate(
        "document.body.append(Object.assign(document.createElement('script'), {textContent: 'alert(2)'}))"
    )
    for _ in range(50):
        if open_page.watch.problems:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.1)  # both reports: Chromium's own line and the event's
    caught, open_page.watch.problems = open_page.watch.problems, []
    assert any("Content Security Policy" in p or "CSP violation" in p for p in caught), caught


# -- acceptance 4: a server restart ---------------------------------------------------------


async def test_restart_reconnects_by_itself_with_the_same_identity_and_catches_up(chatd_process, open_page):
    server = chatd_process("--log-level", "warning", port=free_port())
    url = await asyncio.to_thread(server.start)
    page = await online_now(await open_page(url, "reader"))
    name = await my_name(page).text_content()
    await send(page, "before the restart")
    await expect(message(page, "before the restart")).to_have_count(1)

    open_page.watch.server_down = True
    started = time.monotonic()
    assert await asyncio.to_thread(server.stop) == 0
    stopped_in = time.monotonic() - started
    assert stopped_in < 5, f"SPEC: exit within 5 s of SIGTERM, took {stopped_in:.1f} s with a browser connected"
    await expect(status(page)).to_have_text("Reconnecting")
    await expect(online(page)).to_have_text([re.compile(name)])  # the last list known, not an empty one
    await screenshot(page, "reconnecting-desktop")
    # Keep the page away for a moment after the server is back, so that it misses what comes now.
    await page.context.set_offline(True)
    await asyncio.to_thread(server.start)
    other = Visitor(url)
    try:
        sock = await other.socket()
        missed = [f"missed {i}" for i in range(1, 8)]
        for text in missed:
            assert (await sock.call("send chat", {"msg": text}))["ok"]
        await expect(status(page)).to_have_text("Reconnecting")
        await page.context.set_offline(False)

        await online_now(page)
        open_page.watch.server_down = False
        await expect(my_name(page)).to_have_text(name)
        for text in missed:
            await expect(message(page, text)).to_have_count(1)
        texts = await shown_texts(page)
        assert texts == ["before the restart", *missed], texts

        await send(page, "after the restart")
        echoed = await sock.next("new chat")
        while echoed["msg"] != "after the restart":
            echoed = await sock.next("new chat")
        assert echoed["name"] == name
        await expect(message(page, "after the restart")).to_contain_text(name)
    finally:
        await other.close()
    print("tolerated while the server was down:", *open_page.watch.tolerated, sep="\n  ")


# -- acceptance 5: rooms, unread counts, the online list, scroll-back, the rate limit -------------


async def test_rooms_unread_counts_and_online_lists(start_chatd, open_page):
    url = await start_chatd()
    alice = await online_now(await open_page(url, "alice"))
    bob = await online_now(await open_page(url, "bob"))
    alice_name, bob_name = await my_name(alice).text_content(), await my_name(bob).text_content()

    # Alice joins #side by typing its name and Enter: it is shown, with only her online there.
    box = alice.get_by_label("Join room")
    await box.fill("side")
    await box.press("Enter")
    await expect(alice.get_by_role("heading", name="#side", exact=True)).to_be_visible()
    await expect(room_button(alice, "side")).to_have_attribute("aria-current", "true")
    await expect(online(alice)).to_have_text([re.compile(alice_name)])
    await expect(messages(alice)).to_have_count(0)
    await send(alice, "first in side")
    await expect(message(alice, "first in side")).to_have_count(1)

    # Bob joins with the Join button: he gets the room's history, and both online lists show both.
    await bob.get_by_label("Join room").fill("side")
    await bob.get_by_role("button", name="Join", exact=True).click()
    await expect(bob.get_by_role("heading", name="#side", exact=True)).to_be_visible()
    await expect(message(bob, "first in side")).to_have_count(1)
    both = sorted([alice_name, bob_name], key=str.lower)
    for page in (alice, bob):
        await expect(online(page)).to_have_text([re.compile(name) for name in both])

    # Choosing a room shows only that room's messages.
    await room_button(bob, "general").click()
    await expect(bob.get_by_role("heading", name="#general", exact=True)).to_be_visible()
    await expect(message(bob, "first in side")).to_have_count(0)

    # Unread counts: Alice (in #side) gets two in #general, Bob (in #general) one in #side.
    await send(bob, "general one")
    await send(bob, "general two")
    await expect(room_button(alice, "general")).to_have_accessible_name(re.compile(r"general.*\b2 unread"))
    await expect(message(alice, "general one")).to_have_count(0)
    await send(alice, "second in side")
    await expect(room_button(bob, "side")).to_have_accessible_name(re.compile(r"side.*\b1 unread"))
    await expect(room_button(alice, "side")).not_to_have_accessible_name(re.compile("unread"))
    await expect(alice).to_have_title(re.compile(r"^\(2\) "))

    await room_button(alice, "general").click()
    await expect(alice.get_by_role("heading", name="#general", exact=True)).to_be_visible()
    await expect(room_button(alice, "general")).not_to_have_accessible_name(re.compile("unread"))
    await expect(messages(alice)).to_have_count(2)
    for text in ("general one", "general two"):
        await expect(message(alice, text)).to_contain_text(bob_name)
    await expect(message(alice, "second in side")).to_have_count(0)
    await room_button(bob, "side").click()
    await expect(room_button(bob, "side")).not_to_have_accessible_name(re.compile("unread"))
    await expect(bob.get_by_role("main").locator(".text")).to_have_text(["first in side", "second in side"])
    await screenshot(alice, "rooms-desktop")

    # Bob leaves #side: Alice's list of #side loses him, Bob's page falls back to #general.
    await bob.get_by_role("button", name="Leave room").click()
    await expect(room_button(bob, "side")).to_have_count(0)
    await expect(bob.get_by_role("heading", name="#general", exact=True)).to_be_visible()
    await room_button(alice, "side").click()
    await expect(online(alice)).to_have_text([re.compile(alice_name)])
    # ... and when Bob's page closes, #general's list loses him too.
    await room_button(alice, "general").click()
    await expect(online(alice)).to_have_count(2)
    await bob.close()
    await expect(online(alice)).to_have_text([re.compile(alice_name)])


async def test_rate_limit_shows_a_notice_and_sending_works_after_it(start_chatd, open_page):
    url = await start_chatd()
    page = await online_now(await open_page(url, "fast typist"))
    box = page.get_by_label("Message")
    notice = page.get_by_role("alert").filter(has_text="too fast")
    for i in range(40):
        await box.fill(f"burst {i}")
        await box.press("Enter")
        if await notice.count():
            break
    await expect(notice).to_be_visible()
    await expect(notice).to_contain_text(re.compile(r"send again in [0-9.]+ s"))
    await screenshot(page, "rate-limited-desktop")
    await asyncio.sleep(1)
    await send(page, "after the pause")
    await expect(message(page, "after the pause")).to_have_count(1)


async def test_scrolling_up_loads_older_messages(start_chatd, open_page):
    url = await start_chatd()
    # 70 messages from four sessions (each has a burst of 20), before the page opens.
    writers = [Visitor(url) for _ in range(4)]
    try:
        sent = 0
        for writer in writers:
            sock = await writer.socket()
            for _ in range(min(20, 70 - sent)):
                sent += 1
                assert (await sock.call("send chat", {"msg": f"old {sent:02}"}))["ok"]
    finally:
        for writer in writers:
            await writer.close()

    page = await online_now(await open_page(url, "reader"))
    await expect(messages(page)).to_have_count(50)  # what welcome carries
    await expect(message(page, "old 70")).to_be_in_viewport()  # the newest, at the bottom
    await expect(message(page, "old 01")).to_have_count(0)

    await page.get_by_role("main").get_by_role("list").hover()
    for _ in range(10):
        await page.mouse.wheel(0, -3000)
        if await messages(page).count() == 70:
            break
        await asyncio.sleep(0.1)
    await expect(messages(page)).to_have_count(70)
    assert await shown_texts(page) == [f"old {i:02}" for i in range(1, 71)]
    await expect(page.get_by_role("button", name=re.compile("older messages"))).to_be_hidden()  # nothing further back


# -- acceptance 6: screenshots, and the page at 360 px -------------------------------------------


async def test_screenshots_and_a_phone_sized_page_that_never_scrolls_sideways(start_chatd, open_page):
    url = await start_chatd()
    desktop = await online_now(await open_page(url, "desktop"))
    phone = await online_now(await open_page(url, "phone", viewport=PHONE))

    long_word = "Supercalifragilistic" * 12  # 240 characters, no space
    await send(desktop, "Hello from a wide screen. <b>not bold</b>")
    await send(phone, long_word)
    await send(desktop, "And a reply that is long enough to wrap onto a second line on a phone, " * 2)
    for page in (desktop, phone):
        await expect(message(page, long_word)).to_have_count(1)

    viewport = await phone.evaluate("({w: innerWidth, h: innerHeight})")
    assert viewport == {"w": 360, "h": 740}
    for name, control in (("Message box", phone.get_by_label("Message")),
                          ("Send", phone.get_by_role("button", name="Send"))):
        await expect(control).to_be_visible()
        box = await control.bounding_box()
        assert box and box["x"] >= 0 and box["y"] >= 0, (name, box)
        assert box["x"] + box["width"] <= 360 and box["y"] + box["height"] <= 740, (name, box)
    widths = await phone.evaluate(
        "({scroll: document.documentElement.scrollWidth, client: document.documentElement.clientWidth,"
        " body: document.body.scrollWidth})"
    )
    assert widths["scroll"] <= widths["client"] and widths["body"] <= widths["client"], widths
    # Nor up and down: only the message log scrolls, the page itself stays put.
    assert await phone.evaluate("document.documentElement.scrollHeight <= innerHeight")

    await screenshot(desktop, "chat-1280x800")
    await screenshot(phone, "chat-360x740")

    # The sidebar is a menu on a phone: account, rooms and who is online, then back with Escape.
    menu = phone.get_by_role("button", name="Menu")
    await menu.click()
    await expect(menu).to_have_attribute("aria-expanded", "true")
    await expect(phone.get_by_label("Join room")).to_be_visible()
    await expect(phone.get_by_label("Username")).to_be_visible()
    await expect(online(phone)).to_have_count(2)
    await screenshot(phone, "menu-360x740")
    await phone.keyboard.press("Escape")
    await expect(phone.get_by_label("Join room")).to_be_hidden()
    await expect(menu).to_be_focused()

    # Joining a room from the menu closes it and shows that room.
    await menu.click()
    await phone.get_by_label("Join room").fill("phones")
    await phone.get_by_label("Join room").press("Enter")
    await expect(phone.get_by_role("heading", name="#phones", exact=True)).to_be_visible()
    await expect(phone.get_by_label("Join room")).to_be_hidden()
    await expect(phone.get_by_label("Message")).to_be_focused()
    await send(desktop, "unread for the phone")
    await expect(menu).to_have_accessible_name(re.compile(r"1 unread"))
    widths = await phone.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
    assert widths <= 0
    await screenshot(phone, "room-360x740")


# -- issue 10: the online list is a snapshot then changes --------------------------------


def forged_guest_cookie(secret_key: str, name: str) -> str:
    """A guest session of a chosen name, made as chatd makes one (guest names repeat by chance)."""
    import json
    import secrets

    from cryptography.fernet import Fernet

    session = {
        "sid": secrets.token_urlsafe(24),
        "name": name,
        "account": None,
        "exp": int(time.time()) + 3600,
        "mid": secrets.token_urlsafe(12),
    }
    return Fernet(secret_key).encrypt(json.dumps({"created": int(time.time()), "session": session}).encode()).decode()


async def test_online_list_one_entry_per_session_same_names_told_apart_and_a_leave(
    start_chatd, open_page, browser, secret_key
):
    url = await start_chatd()
    alice = await online_now(await open_page(url, "alice"))
    alice_tab = await online_now(await open_page(url, "alice tab 2", context=alice.context))
    alice_name = await my_name(alice).text_content()

    twins = []
    for label in ("twin 1", "twin 2"):

        async def with_cookie(page: Page) -> None:
            host = urlsplit(url).hostname
            cookie = forged_guest_cookie(secret_key, "guest-0042")
            await page.context.add_cookies([{"name": "chatd_session", "value": cookie, "domain": host, "path": "/"}])

        twins.append(await online_now(await open_page(url, label, before_goto=with_cookie)))

    for page in (alice, alice_tab, *twins):
        # Two tabs of one session are one entry; the two guest-0042 are two, told apart by a tag.
        await expect(online(page)).to_have_count(3)
        await expect(page.get_by_role("heading", name="Online in #general (3)")).to_be_visible()
        await expect(online(page).filter(has_text=alice_name)).to_have_count(1)
        same = online(page).filter(has_text="guest-0042")
        await expect(same).to_have_count(2)
        tags = await same.locator(".member-tag").all_text_contents()
        assert len(tags) == 2 and len(set(tags)) == 2 and all(re.fullmatch(r"#[\w-]{4}", t) for t in tags), tags
        await expect(online(page).filter(has_text=alice_name).locator(".member-tag")).to_have_count(0)
    await expect(online(twins[0]).filter(has_text="you")).to_have_count(1)
    await screenshot(twins[0], "online-twins-desktop")

    # A leave: one twin closes; everyone else's list loses exactly that entry, and the tag goes.
    gone_tag = await online(twins[1]).filter(has_text="you").locator(".member-tag").text_content()
    await twins[1].close()
    for page in (alice, alice_tab, twins[0]):
        await expect(online(page)).to_have_count(2)
        await expect(page.get_by_role("heading", name="Online in #general (2)")).to_be_visible()
        await expect(online(page).filter(has_text="guest-0042")).to_have_count(1)
        await expect(online(page).locator(".member-tag")).to_have_count(0)
        assert gone_tag not in (await online(page).evaluate_all("items => items.map(i => i.title)")).__str__()
    # Closing one of alice's two tabs changes nothing: her session is still there.
    await alice_tab.close()
    await asyncio.sleep(0.3)
    await expect(online(twins[0])).to_have_count(2)
    await expect(online(twins[0]).filter(has_text=alice_name)).to_have_count(1)


async def test_a_big_room_shows_its_count_and_the_first_200_members(start_chatd, open_page):
    import aiohttp

    from test_presence import connect_many

    url = await start_chatd()
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), cookie_jar=aiohttp.DummyCookieJar()
    ) as http:
        crowd = await connect_many(http, url, 250)
        try:
            page = await online_now(await open_page(url, "in a crowd"))
            await expect(page.get_by_role("heading", name="Online in #general (251)")).to_be_visible()
            await expect(online(page)).to_have_count(201)  # 200 members, then "and 51 more"
            await expect(online(page).last).to_have_text("and 51 more")
            await screenshot(page, "online-crowd-desktop")
            # 60 leave at once: one or two changes, and the list is whole again.
            await asyncio.gather(*(member.close() for member in crowd[:60]))
            await expect(page.get_by_role("heading", name="Online in #general (191)")).to_be_visible()
            await expect(online(page)).to_have_count(191)
            await expect(online(page).filter(has_text=re.compile("more$"))).to_have_count(0)
        finally:
            await asyncio.gather(*(member.close() for member in crowd), return_exceptions=True)


# -- issue 21: edit, delete, the outbox, catching up with `since` ---------------------------


async def test_edit_and_delete_ones_own_messages_everywhere_at_once(start_chatd, open_page):
    url = await start_chatd()
    alice = await online_now(await open_page(url, "alice"))
    bob = await online_now(await open_page(url, "bob"))
    await send(alice, "a typo heer")
    await send(alice, "regrettable")
    await send(bob, "bob's own")
    await expect(message(bob, "regrettable")).to_have_count(1)
    # Only one's own messages have the actions.
    await expect(message(bob, "a typo heer").get_by_role("button", name="Edit")).to_have_count(0)
    await expect(message(alice, "bob's own").get_by_role("button", name="Delete")).to_have_count(0)

    typo = message(alice, "a typo heer")
    await typo.hover()
    await typo.get_by_role("button", name="Edit").click()
    editor = alice.get_by_label(re.compile("^Edit message"))
    await expect(editor).to_be_focused()
    await expect(editor).to_have_value("a typo heer")
    await editor.fill("never mind")
    await editor.press("Escape")  # cancels: nothing changes
    await expect(editor).to_have_count(0)
    await expect(message(alice, "a typo heer")).to_have_count(1)

    await typo.hover()
    await typo.get_by_role("button", name="Edit").click()
    await editor.fill("a typo here")
    await editor.press("Enter")
    for page in (alice, bob):
        fixed = message(page, "a typo here")
        await expect(fixed).to_have_count(1)
        await expect(fixed).to_contain_text("(edited)")
        await expect(message(page, "a typo heer")).to_have_count(0)
    await screenshot(alice, "edited-desktop")

    gone = message(alice, "regrettable")
    await gone.hover()
    await gone.get_by_role("button", name="Delete").click()
    for page in (alice, bob):
        await expect(message(page, "regrettable")).to_have_count(0)
        assert await shown_texts(page) == ["a typo here", "bob's own"]
    # A new page never sees it either.
    carol = await online_now(await open_page(url, "carol"))
    await expect(message(carol, "a typo here")).to_contain_text("(edited)")
    assert await shown_texts(carol) == ["a typo here", "bob's own"]


async def test_a_message_whose_echo_comes_before_its_ack_is_shown_once(start_chatd, open_page):
    """The server sends `new chat` to the room, the sender's sockets too, before it answers
    `send chat`. Until the answer comes, the page shows the message once: delivered, not also
    pending. Here the answer is held back by the browser to make that wait as long as needed."""
    sends: set[str] = set()  # the ack id of the page's first `send chat`
    held: list[str] = []  # the server's answers to them, not yet given to the page
    to_page = []

    def route(ws):
        server = ws.connect_to_server()
        to_page.append(ws)

        def from_page(frame):
            if not sends and isinstance(frame, str) and (sent := re.match(r'42(\d+)\["send chat"', frame)):
                sends.add(sent[1])  # the first send's only
            server.send(frame)

        def from_server(frame):
            if isinstance(frame, str) and (ack := re.match(r"43(\d+)", frame)) and ack[1] in sends:
                held.append(frame)
            else:
                ws.send(frame)

        ws.on_message(from_page)
        server.on_message(from_server)

    url = await start_chatd()
    page = await online_now(
        await open_page(url, "echo", before_goto=lambda page: page.route_web_socket(re.compile("/socket[.]io/"), route))
    )
    await send(page, "echoed before its ack")
    for _ in range(100):
        if held:
            break
        await asyncio.sleep(0.05)
    assert held, "the answer to send chat was never seen"
    await expect(message(page, "echoed before its ack")).to_have_count(1)
    await expect(message(page, "echoed before its ack")).not_to_have_class(re.compile("pending"))
    await expect(page.locator(".outbox .message.pending")).to_have_count(0)

    for frame in held:
        to_page[-1].send(frame)
    await expect(message(page, "echoed before its ack")).to_have_count(1)
    await send(page, "and the next one")  # the outbox went on to the next message
    await expect(message(page, "and the next one")).to_have_count(1)
    assert await shown_texts(page) == ["echoed before its ack", "and the next one"]


async def test_a_message_typed_while_the_server_is_down_appears_once_after_it_is_back(chatd_process, open_page):
    """The outbox sends it with its client_id when the page is back; meanwhile another session
    edited and deleted messages, which the page catches up with through `history` `since`."""
    server = chatd_process("--log-level", "warning", port=free_port())
    url = await asyncio.to_thread(server.start)
    page = await online_now(await open_page(url, "writer"))
    other = Visitor(url)
    try:
        sock = await other.socket()
        edited = (await sock.call("send chat", {"msg": "to be edited"}))["id"]
        deleted = (await sock.call("send chat", {"msg": "to be deleted"}))["id"]
        await expect(message(page, "to be deleted")).to_have_count(1)
        await sock.close()

        open_page.watch.server_down = True
        assert await asyncio.to_thread(server.stop) == 0
        await expect(status(page)).to_have_text("Reconnecting")
        await send(page, "typed while the server was down")
        pending = page.locator(".outbox .message.pending")
        await expect(pending).to_have_count(1)
        await expect(pending).to_contain_text("typed while the server was down")
        await screenshot(page, "outbox-pending-desktop")
        # Keep the page away while the server is back and the other session changes things.
        await page.context.set_offline(True)
        await asyncio.to_thread(server.start)
        sock = await other.socket()
        assert (await sock.call("edit chat", {"room": "general", "id": edited, "msg": "edited meanwhile"}))["ok"]
        assert (await sock.call("delete chat", {"room": "general", "id": deleted}))["ok"]
        await page.context.set_offline(False)

        await online_now(page)
        open_page.watch.server_down = False
        await expect(message(page, "typed while the server was down")).to_have_count(1)
        await expect(pending).to_have_count(0)
        await expect(message(page, "edited meanwhile")).to_contain_text("(edited)")
        await expect(message(page, "to be deleted")).to_have_count(0)
        assert await shown_texts(page) == ["edited meanwhile", "typed while the server was down"]
        stored = (await sock.call("history", {"room": "general"}))["messages"]
        assert [m["msg"] for m in stored].count("typed while the server was down") == 1
    finally:
        await other.close()
