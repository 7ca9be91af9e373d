// The room directory, topics, direct rooms and moderators' actions (issue 22).
//
// The page cannot know who moderates a room (SPEC gives no event for it): an account sees
// the actions, and the server answers `forbidden` when it has no right; the notice says so.
// User text (room names, topics, member names) only ever goes into the DOM as text.

const byId = (id) => document.getElementById(id);

const el = {
  browse: byId("browse"),
  directory: byId("directory"),
  directoryForm: byId("directory-form"),
  directoryQuery: byId("directory-query"),
  directoryList: byId("directory-list"),
  directoryClose: byId("directory-close"),
  topic: byId("room-topic"),
  editTopic: byId("edit-topic"),
  topicForm: byId("topic-form"),
  topicInput: byId("topic-input"),
  topicCancel: byId("topic-cancel"),
  onlineList: byId("online-list"),
  memberMenu: byId("member-menu"),
};

const MUTES = [
  ["Mute for 10 min", 600],
  ["Mute for 1 hour", 3600],
  ["Mute for 1 day", 86400],
];

const REMOVED = { kicked: "A moderator removed you from", banned: "A moderator banned you from" };

function make(tag, className = "", text = null) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== null) node.textContent = text;
  return node;
}

/** `@alice+bob` between this account and another. */
export function directRoom(mine, theirs) {
  return "@" + [mine.toLowerCase(), theirs.toLowerCase()].sort().join("+");
}

/**
 * Wire the directory, the topic line and the member menu to the page.
 * `page`: {request(event, payload), me(), current() (the shown room's name), member(id),
 *          open(room) (join it if need be and show it), notice(text), error(error)}
 */
export function installModeration(page) {
  const topics = new Map(); // room -> topic, from `join` acks, the directory and `room updated`

  function renderTopic() {
    const room = page.current();
    const topic = room ? topics.get(room) ?? "" : "";
    el.topic.textContent = topic;
    el.topic.hidden = !topic;
    el.editTopic.hidden = !room || room.startsWith("@") || !page.me()?.account;
    el.topicForm.hidden = true;
  }

  function setTopic(room, topic) {
    topics.set(room, topic);
    if (room === page.current()) renderTopic();
  }

  /** The topic of a room this page did not join itself (welcome carries none). */
  async function learnTopic(room) {
    if (room.startsWith("@") || topics.has(room)) return;
    const { rooms } = await page.request("rooms", { query: room, limit: 100 });
    setTopic(room, rooms.find((r) => r.room === room)?.topic ?? "");
  }

  // -- the directory ---------------------------------------------------------

  async function listRooms() {
    try {
      const { rooms } = await page.request("rooms", { query: el.directoryQuery.value.trim().toLowerCase() });
      el.directoryList.replaceChildren(...rooms.map(directoryItem));
      if (!rooms.length) el.directoryList.append(make("li", "directory-empty", "No rooms found."));
      for (const room of rooms) setTopic(room.room, room.topic);
    } catch (error) {
      page.error(error);
    }
  }

  function directoryItem(room) {
    const item = make("li", "directory-room");
    const about = make("div", "directory-about");
    about.append(make("strong", "directory-name", `#${room.room}`));
    about.append(make("span", "directory-counts", `${room.members} members · ${room.online} online`));
    if (room.topic) about.append(make("span", "directory-topic", room.topic));
    const join = make("button", "primary", "Join");
    join.type = "button";
    join.setAttribute("aria-label", `Join #${room.room}`);
    join.addEventListener("click", async () => {
      el.directory.close();
      await page.open(room.room);
    });
    item.append(about, join);
    return item;
  }

  el.browse.addEventListener("click", () => {
    el.directory.showModal();
    el.directoryQuery.focus();
    listRooms();
  });
  el.directoryForm.addEventListener("submit", (event) => {
    event.preventDefault();
    listRooms();
  });
  el.directoryQuery.addEventListener("input", listRooms);
  el.directoryClose.addEventListener("click", () => el.directory.close());

  // -- the topic ---------------------------------------------------------------

  el.editTopic.addEventListener("click", () => {
    el.topicInput.value = topics.get(page.current()) ?? "";
    el.topicForm.hidden = false;
    el.topicInput.focus();
  });
  el.topicCancel.addEventListener("click", () => (el.topicForm.hidden = true));
  el.topicForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    const room = page.current();
    const topic = el.topicInput.value;
    try {
      await page.request("topic", { room, topic });
      setTopic(room, topic.trim());
      el.topicForm.hidden = true;
    } catch (error) {
      page.error(error);
    }
  });

  // -- the member menu: message privately, and moderators' actions ------------------

  function closeMenu() {
    el.memberMenu.hidden = true;
    el.memberMenu.replaceChildren();
  }

  function menuItem(label, action) {
    const button = make("button", "menu-item", label);
    button.type = "button";
    button.setAttribute("role", "menuitem");
    button.addEventListener("click", async () => {
      closeMenu();
      try {
        await action();
      } catch (error) {
        page.error(error);
      }
    });
    return button;
  }

  function openMenu(member, anchor) {
    const me = page.me();
    const room = page.current();
    if (!me?.account || !room || member.id === me.id) return;
    const target = member.account ? { username: member.account } : { member: member.id };
    const act = (event, extra, done) => async () => {
      await page.request(event, { room, ...target, ...extra });
      page.notice(done);
    };
    const items = [];
    if (member.account && member.account.toLowerCase() !== me.account.toLowerCase()) {
      items.push(menuItem("Message privately", () => page.open(directRoom(me.account, member.account))));
    }
    if (!room.startsWith("@")) {
      for (const [label, seconds] of MUTES) items.push(menuItem(label, act("mute", { seconds }, `${member.name} is muted.`)));
      items.push(menuItem("Kick", act("kick", {}, `${member.name} was kicked.`)));
      items.push(menuItem("Ban", act("ban", { on: true }, `${member.name} is banned.`)));
    }
    if (!items.length) return;
    el.memberMenu.replaceChildren(make("p", "menu-title", member.name), ...items);
    el.memberMenu.setAttribute("aria-label", `Actions for ${member.name}`);
    const box = anchor.getBoundingClientRect();
    el.memberMenu.style.top = `${Math.round(box.bottom + window.scrollY)}px`;
    el.memberMenu.style.left = `${Math.round(box.left + window.scrollX)}px`;
    el.memberMenu.hidden = false;
    el.memberMenu.querySelector("button")?.focus();
  }

  el.onlineList.addEventListener("click", (event) => {
    const item = event.target.closest("li.member[data-id]");
    const member = item && page.member(item.dataset.id);
    if (member) openMenu(member, item);
  });
  document.addEventListener("click", (event) => {
    if (!el.memberMenu.hidden && !el.memberMenu.contains(event.target) && !el.onlineList.contains(event.target)) {
      closeMenu();
    }
  });
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && !el.memberMenu.hidden) closeMenu();
  });

  return {
    renderTopic,
    setTopic,
    learnTopic,
    /** `room updated`: the room's topic changed. */
    updated: ({ room, topic }) => setTopic(room, topic),
    /** `left` with a moderator's reason: say so. */
    removed: ({ room, reason }) => REMOVED[reason] && page.notice(`${REMOVED[reason]} #${room}.`),
  };
}
