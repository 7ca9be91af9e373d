"""The page's directory, direct messages and moderators' menu (issue 22), in Chromium.
Screenshots: /tmp/directory.png and /tmp/modmenu.png (and test-artifacts/)."""

from __future__ import annotations

import re

import pytest
from playwright.async_api import expect

from test_browser import browser, open_page  # noqa: F401 (fixtures)
from test_browser import login_form, message, my_name, online, online_now, room_button, screenshot, send
from test_browser_rooms import join

pytestmark = pytest.mark.browser


async def account(open_page, url: str, name: str):
    page = await online_now(await open_page(url, name))
    await login_form(page, name, "correct horse", "Register")
    await expect(my_name(page)).to_have_text(name)
    return await online_now(page)


def member(page, name: str):
    return online(page).filter(has=page.get_by_text(name, exact=True))


def heading(page, text: str):
    return page.get_by_role("heading", name=text, exact=True)


async def set_topic(page, topic: str) -> None:
    await page.get_by_role("button", name="Edit topic").click()
    await page.get_by_label("Topic").fill(topic)
    await page.get_by_role("button", name="Save topic").click()
    await expect(page.get_by_test_id("room-topic")).to_have_text(topic)


async def test_the_directory_lists_rooms_with_counts_and_topics_and_joins_one(start_chatd, open_page):
    url = await start_chatd()
    owner = await account(open_page, url, "owner")
    await join(owner, "books")
    await set_topic(owner, "Novels, <b>poems</b> & more")
    await join(owner, "cats")
    reader = await online_now(await open_page(url, "reader"))

    await reader.get_by_role("button", name="Browse rooms").click()
    listed = reader.get_by_test_id("directory-list").get_by_role("listitem")
    await expect(listed).to_have_count(3)  # general, books, cats
    books = listed.filter(has=reader.get_by_text("#books", exact=True))
    await expect(books).to_contain_text("1 members · 1 online")
    await expect(books).to_contain_text("Novels, <b>poems</b> & more")  # as text, never HTML
    await reader.get_by_label("Search rooms").fill("BOO")
    await expect(listed).to_have_count(1)
    await reader.screenshot(path="/tmp/directory.png")
    await screenshot(reader, "directory")
    await reader.get_by_role("button", name="Join #books").click()
    await expect(heading(reader, "#books")).to_be_visible()
    await expect(reader.get_by_test_id("room-topic")).to_have_text("Novels, <b>poems</b> & more")
    # A new topic reaches the room at once.
    await room_button(owner, "books").click()
    await set_topic(owner, "Only poems")
    await expect(reader.get_by_test_id("room-topic")).to_have_text("Only poems")


async def test_a_direct_message_between_two_browsers(start_chatd, open_page):
    url = await start_chatd()
    alice = await account(open_page, url, "alice")
    bob = await account(open_page, url, "bob")
    await expect(member(alice, "bob")).to_have_count(1)

    await member(alice, "bob").click()
    await alice.get_by_role("menuitem", name="Message privately").click()
    await expect(heading(alice, "@alice+bob")).to_be_visible()
    await send(alice, "just between us")
    direct = bob.get_by_role("complementary").get_by_role("button", name=re.compile(r"^@alice\+bob"))
    await expect(direct).to_have_count(1)
    await direct.click()
    await expect(message(bob, "just between us")).to_have_count(1)
    await send(bob, "indeed")
    await expect(message(alice, "indeed")).to_have_count(1)


async def test_a_ban_seen_from_both_sides(start_chatd, open_page):
    url = await start_chatd()
    mod = await account(open_page, url, "moddy")
    await join(mod, "den")  # its owner
    guest = await online_now(await open_page(url, "guest"))
    await join(guest, "den")
    guest_name = (await my_name(guest).text_content()).strip()
    await expect(member(mod, guest_name)).to_have_count(1)
    # A moderator deletes anyone's message in its room; it goes from every page.
    await send(guest, "buy cheap pills")
    await message(mod, "buy cheap pills").get_by_role("button", name="Delete").click()
    for page in (mod, guest):
        await expect(message(page, "buy cheap pills")).to_have_count(0)

    await member(mod, guest_name).click()
    menu = mod.get_by_role("menu")
    for action in ("Mute for 10 min", "Mute for 1 hour", "Mute for 1 day", "Kick", "Ban"):
        await expect(menu.get_by_role("menuitem", name=action)).to_be_visible()
    await mod.screenshot(path="/tmp/modmenu.png")
    await screenshot(mod, "modmenu")
    await menu.get_by_role("menuitem", name="Ban").click()

    await expect(guest.get_by_role("alert").filter(has_text="banned you from #den")).to_be_visible()
    await expect(room_button(guest, "den")).to_have_count(0)
    await expect(member(mod, guest_name)).to_have_count(0)
    # Joining again is refused, and says why.
    box = guest.get_by_label("Join room")
    await box.fill("den")
    await box.press("Enter")
    await expect(guest.get_by_role("alert").filter(has_text="banned")).to_be_visible()
    await expect(room_button(guest, "den")).to_have_count(0)
