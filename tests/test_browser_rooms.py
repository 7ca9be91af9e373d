"""The page's rooms that follow the person (issue 20), in Chromium: the sidebar across two
tabs, unread counts after being away, typing, and a mention highlighted."""

from __future__ import annotations

import re
import shutil

import pytest
from playwright.async_api import expect

from test_browser import (  # noqa: F401 (fixtures)
    ARTIFACTS,
    browser,
    message,
    messages,
    online_now,
    open_page,
    room_button,
    screenshot,
    send,
)

pytestmark = pytest.mark.browser


async def join(page, room: str) -> None:
    box = page.get_by_label("Join room")
    await box.fill(room)
    await box.press("Enter")
    await expect(page.get_by_role("heading", name=f"#{room}", exact=True)).to_be_visible()


async def test_the_sidebar_follows_joins_and_leaves_in_another_tab(start_chatd, open_page):
    url = await start_chatd()
    first = await online_now(await open_page(url, "tab 1"))
    second = await online_now(await open_page(url, "tab 2", context=first.context))  # same cookie
    await join(first, "side")
    await expect(room_button(second, "side")).to_be_visible()
    # Both tabs are in the room: they hear its messages, as unread while they show general.
    await room_button(first, "general").click()
    other = await online_now(await open_page(url, "someone else"))
    await join(other, "side")
    await send(other, "hello side")
    for page in (first, second):
        await expect(room_button(page, "side")).to_have_accessible_name(re.compile(r"side.*\b1 unread"))
    # Tab 1 shows side: it is read there, and tab 2's count follows.
    await room_button(first, "side").click()
    await expect(message(first, "hello side")).to_have_count(1)
    await expect(room_button(second, "side")).not_to_have_accessible_name(re.compile("unread"))
    await room_button(second, "side").click()
    await second.get_by_role("button", name="Leave room").click()
    await expect(room_button(first, "side")).to_have_count(0)
    await expect(first.get_by_role("heading", name="#general", exact=True)).to_be_visible()


async def test_unread_counts_and_mentions_wait_for_a_reader_who_was_away(start_chatd, open_page):
    url = await start_chatd()
    reader = await online_now(await open_page(url, "reader"))
    await reader.get_by_label("Username").fill("reader")
    await reader.get_by_label("Password").fill("correct horse")
    await reader.get_by_role("button", name="Register", exact=True).click()
    await expect(reader.get_by_test_id("me-name")).to_have_text("reader")
    await online_now(reader)
    for room in ("books", "cats", "dogs"):
        await join(reader, room)
    context = reader.context
    await reader.close()  # away

    writer = await online_now(await open_page(url, "writer"))
    for room, count in (("books", 3), ("cats", 12)):
        await join(writer, room)
        for i in range(count):
            await send(writer, f"{room} {i}")
    await send(writer, "@reader look at this")  # in cats

    back = await online_now(await open_page(url, "reader again", context=context))
    await expect(room_button(back, "books")).to_have_accessible_name(re.compile(r"books.*\b3 unread"))
    await expect(room_button(back, "cats")).to_have_accessible_name(re.compile(r"cats.*\b1 mention.*\b13 unread"))
    await expect(room_button(back, "dogs")).not_to_have_accessible_name(re.compile("unread"))
    await back.get_by_role("complementary").screenshot(path="/tmp/sidebar.png")
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copy("/tmp/sidebar.png", ARTIFACTS / "sidebar-unread.png")
    # Shown is read; the mention is highlighted.
    await room_button(back, "cats").click()
    await expect(room_button(back, "cats")).not_to_have_accessible_name(re.compile("unread|mention"))
    await expect(message(back, "@reader look at this")).to_have_class(re.compile(r"\bmentions-me\b"))
    await expect(message(back, "cats 0")).not_to_have_class(re.compile(r"\bmentions-me\b"))
    # The marker is the account's: a new tab finds cats read, books still unread.
    again = await online_now(await open_page(url, "reader, third tab", context=context))
    await expect(room_button(again, "books")).to_have_accessible_name(re.compile(r"books.*\b3 unread"))
    await expect(room_button(again, "cats")).not_to_have_accessible_name(re.compile("unread"))
    await screenshot(back, "rooms-mention-desktop")


async def test_who_is_typing_shows_under_the_messages(start_chatd, open_page):
    url = await start_chatd()
    alice = await online_now(await open_page(url, "alice"))
    bob = await online_now(await open_page(url, "bob"))
    bob_name = await bob.get_by_test_id("me-name").text_content()
    await bob.get_by_label("Message").press_sequentially("hel")
    typing = alice.locator("#typing")
    await expect(typing).to_have_text(f"{bob_name} is typing…")
    await expect(bob.locator("#typing")).to_have_text("")  # not to the typist
    await bob.get_by_label("Message").press("Enter")  # the message ends it
    await expect(message(alice, "hel")).to_have_count(1)
    await expect(typing).to_have_text("")
    await expect(messages(alice)).to_have_count(1)


# Stands in for the browser's Notification (headless Chromium shows none) and says the tab is
# hidden; what the page hands to it is recorded. The page itself is unchanged.
HIDDEN_TAB_WITH_NOTIFICATIONS = """
window.__notes = [];
Object.defineProperty(document, "hidden", { get: () => true });
window.Notification = class {
  static permission = "granted";
  static requestPermission() { return Promise.resolve("granted"); }
  constructor(title, options) { window.__notes.push({ title, body: options.body }); }
  addEventListener() {}
};
"""


async def test_a_mention_while_the_tab_is_hidden_raises_a_notification(start_chatd, open_page):
    url = await start_chatd()

    async def hidden(page):
        await page.add_init_script(HIDDEN_TAB_WITH_NOTIFICATIONS)

    reader = await online_now(await open_page(url, "reader", before_goto=hidden))
    await reader.get_by_label("Username").fill("nora")
    await reader.get_by_label("Password").fill("correct horse")
    await reader.get_by_role("button", name="Register", exact=True).click()
    await expect(reader.get_by_test_id("me-name")).to_have_text("nora")
    await online_now(reader)
    writer = await online_now(await open_page(url, "writer"))
    writer_name = await writer.get_by_test_id("me-name").text_content()
    await send(writer, "no mention here")
    await send(writer, "hey @Nora, <b>look</b>")
    await expect(message(reader, "hey @Nora, <b>look</b>")).to_have_class(re.compile(r"\bmentions-me\b"))
    notes = await reader.evaluate("window.__notes")
    assert notes == [{"title": f"{writer_name} mentioned you in #general", "body": "hey @Nora, <b>look</b>"}]
    # Hidden, so the room is not marked read: it counts as unread, with its mention.
    await expect(room_button(reader, "general")).to_have_accessible_name(re.compile(r"general.*\b1 mention.*\b2 unread"))
