// Everything the page draws. User text (names, messages, room names) only ever
// goes into the DOM through textContent, never as HTML.

const byId = (id) => document.getElementById(id);

export const el = Object.fromEntries(
  [
    "status", "status-line", "me-name", "me-kind", "auth-form", "auth-error", "signed-in", "account-name",
    "logout", "username", "password", "room-list", "join-form", "join-room", "online-heading",
    "online-list", "room-title", "leave", "log", "older", "messages", "notice", "send-form", "message",
    "announcer", "menu-toggle", "menu-unread", "sidebar", "typing", "notify",
  ].map((id) => [id.replace(/-(\w)/g, (_, c) => c.toUpperCase()), byId(id)]),
);

/** A new element with optional class and text (as text). */
function make(tag, className = "", text = null) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== null) node.textContent = text;
  return node;
}

// -- identity and connection ------------------------------------------------

const STATES = { Connecting: "connecting", Online: "online", Reconnecting: "reconnecting", "Session ended": "ended" };

export function showStatus(text) {
  el.status.textContent = text;
  el.statusLine.dataset.state = STATES[text];
}

export function showIdentity(me) {
  el.meName.textContent = me.name;
  el.meKind.textContent = me.account ? "account" : "guest";
  el.meKind.classList.toggle("is-account", Boolean(me.account));
  el.authForm.hidden = Boolean(me.account);
  el.signedIn.hidden = !me.account;
  el.accountName.textContent = me.account ?? "";
}

export const isMine = (message, me) =>
  me !== null && (me.account ? message.account === me.account : message.account === null && message.name === me.name);

// -- notices ------------------------------------------------------------------

let noticeTimer = null;

export function showNotice(text, seconds = 6) {
  clearTimeout(noticeTimer);
  el.notice.textContent = text;
  el.notice.hidden = false;
  noticeTimer = setTimeout(() => (el.notice.hidden = true), Math.max(seconds, 2) * 1000);
}

export function announce(text) {
  el.announcer.textContent = text;
}

// -- rooms --------------------------------------------------------------------

export function renderRooms(rooms, onSelect) {
  const items = rooms.all.map((room) => {
    const button = make("button", "room-button");
    button.type = "button";
    button.dataset.room = room.name;
    if (room.name === rooms.current) button.setAttribute("aria-current", "true");
    const hash = make("span", "hash", "#");
    hash.setAttribute("aria-hidden", "true"); // read "side", not "number sign side"
    button.append(hash, make("span", "room-name", room.name));
    if (room.mentions) {
      const badge = make("span", "badge mention", `@${room.mentions}`);
      badge.append(make("span", "visually-hidden", room.mentions === 1 ? " mention" : " mentions"));
      button.append(badge);
    }
    if (room.unread) {
      const badge = make("span", "badge", room.unread >= 1000 ? "999+" : String(room.unread));
      badge.append(make("span", "visually-hidden", " unread"));
      button.append(badge);
    }
    button.addEventListener("click", () => onSelect(room.name));
    const item = make("li");
    item.append(button);
    return item;
  });
  // Rebuilding the list must not throw a keyboard user's focus away.
  const focused = el.roomList.contains(document.activeElement) ? document.activeElement.dataset.room : null;
  el.roomList.replaceChildren(...items);
  if (focused) el.roomList.querySelector(`[data-room="${CSS.escape(focused)}"]`)?.focus();

  const unread = rooms.totalUnread;
  el.menuUnread.hidden = unread === 0;
  el.menuUnread.replaceChildren(String(unread), make("span", "visually-hidden", " unread"));
  document.title = `${unread ? `(${unread}) ` : ""}${rooms.current ? `#${rooms.current} · ` : ""}chatd`;
}

// A room of thousands shows its first few hundred members and how many more there are:
// drawing every one would cost more than it tells.
export const ONLINE_SHOWN = 200;

export function renderOnline(room, me) {
  const online = room?.online;
  // The server's count: the list it sends stops at the first 500.
  const count = Math.max(room?.onlineCount ?? 0, online?.size ?? 0);
  el.onlineHeading.textContent = room ? `Online in #${room.name} (${count})` : "Online";
  const items = (online?.first(ONLINE_SHOWN) ?? []).map((member) => memberItem(member, online, me));
  if (count > items.length) items.push(make("li", "member more", `and ${count - items.length} more`));
  el.onlineList.replaceChildren(...items);
}

/** Same-named members (guest names repeat) get a short tag from their id; every entry has it as a tooltip. */
function memberItem(member, online, me) {
  const item = make("li", "member");
  item.dataset.id = member.id;
  const tag = `#${member.id.slice(0, 4)}`;
  item.title = `${member.name} ${tag}`;
  item.append(make("span", `avatar c${colour(member.name)}`, member.name.charAt(0).toUpperCase()));
  item.append(make("span", "member-name", member.name));
  if (online.nameIsShared(member.name)) item.append(make("span", "member-tag", tag));
  if (me?.id ? member.id === me.id : member.name === me?.name && member.account === me?.account) {
    item.append(make("span", "tag", "you"));
  } else if (member.account) item.append(make("span", "tag is-account", "account"));
  return item;
}

// -- messages -----------------------------------------------------------------

const timeOnly = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit" });
const dayAndTime = new Intl.DateTimeFormat(undefined, { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit" });
const fullDate = new Intl.DateTimeFormat(undefined, { dateStyle: "full", timeStyle: "medium" });

function colour(name) {
  let hash = 0;
  for (const char of name) hash = (hash * 31 + char.codePointAt(0)) >>> 0;
  return hash % 8;
}

// One <li> per message object, made once; rebuilt when "mine" may have changed.
let nodes = new WeakMap();

function messageNode(message, me) {
  let item = nodes.get(message);
  if (item) return item;
  const date = new Date(message.ts * 1000);
  const time = make("time", "", (sameDay(date, new Date()) ? timeOnly : dayAndTime).format(date));
  time.dateTime = date.toISOString();
  time.title = fullDate.format(date);
  const author = make("span", `author c${colour(message.name)}`, message.name);
  if (message.account) author.classList.add("is-account");
  const meta = make("p", "meta");
  meta.append(author, " ", time);
  if (message.edited) meta.append(" ", make("span", "edited", "(edited)"));
  item = make("li", isMine(message, me) ? "message mine" : "message");
  const account = me?.account?.toLowerCase();
  if (account && (message.mentions ?? []).some((name) => name.toLowerCase() === account)) {
    item.classList.add("mentions-me"); // highlighted: it names the reader
  }
  item.dataset.id = message.id;
  item.append(meta, make("p", "text", message.msg));
  if (isMine(message, me)) item.append(messageActions(["edit", "delete"]));
  // Moderators delete anyone's message in a public room; the page cannot tell who moderates,
  // so an account sees Delete and the server answers `forbidden` to the others (js/moderation.js).
  else if (me?.account && !message.room.startsWith("@")) item.append(messageActions(["delete"]));
  nodes.set(message, item);
  return item;
}

const ACTION_LABELS = { edit: "Edit", delete: "Delete" };

/** Edit and Delete for one's own messages, Delete for a moderator (public/js/messages.js handles the clicks). */
function messageActions(which) {
  const actions = make("span", "actions");
  for (const action of which) {
    const button = make("button", "quiet", ACTION_LABELS[action]);
    button.type = "button";
    button.dataset.action = action;
    actions.append(button);
  }
  return actions;
}

/** An edited message of the shown room: its new node in place of the old one's. */
export function replaceMessage(room, old, message, me) {
  nodes.get(old)?.replaceWith(messageNode(message, me));
  markGroup(room, message, me);
}

/** A deleted message of the shown room: its node goes, and the next one may start a group now. */
export function removeMessage(room, old, next, me) {
  nodes.get(old)?.remove();
  if (next) markGroup(room, next, me);
}

const sameDay = (a, b) => a.toDateString() === b.toDateString();

// Consecutive messages of one author within a few minutes form a group: only the first
// shows the name and time (the others keep them for screen readers, visually hidden).
const GROUP_SECONDS = 5 * 60;

const continues = (previous, message) =>
  previous !== null &&
  previous.name === message.name &&
  previous.account === message.account &&
  message.ts - previous.ts < GROUP_SECONDS &&
  sameDay(new Date(previous.ts * 1000), new Date(message.ts * 1000));

function markGroup(room, message, me) {
  messageNode(message, me).classList.toggle("continued", continues(room.before(message), message));
}

export function forgetMessageNodes() {
  nodes = new WeakMap();
}

/** Show a room: its title, all its messages (scrolled to the newest), its online list. */
export function renderRoom(room, me) {
  // A direct room (`@alice+bob`) is shown by its name; a public one as #name.
  const shown = room && (room.name.startsWith("@") ? room.name : `#${room.name}`);
  el.roomTitle.textContent = room ? shown : "No room";
  el.leave.hidden = !room;
  el.message.placeholder = room ? `Message ${shown}` : "Join a room to chat";
  el.messages.classList.toggle("no-room", !room);
  el.messages.replaceChildren(
    ...(room
      ? room.messages.map((m, i) => {
          const node = messageNode(m, me);
          node.classList.toggle("continued", continues(room.messages[i - 1] ?? null, m));
          return node;
        })
      : []),
  );
  showOlderButton(room, false);
  el.log.scrollTop = el.log.scrollHeight;
  renderOnline(room, me);
}

/**
 * Put newly merged messages of the shown room in place. Older ones (scroll-back)
 * keep the reader's view still; newer ones follow a reader who is at the bottom.
 */
export function insertMessages(room, added, me, older = false) {
  const { log } = el;
  const fromBottom = log.scrollHeight - log.scrollTop;
  const atBottom = fromBottom - log.clientHeight < 48;
  // Highest id first, so that each message's successor is already in place.
  for (const message of [...added].sort((a, b) => b.id - a.id)) {
    const next = room.after(message);
    el.messages.insertBefore(messageNode(message, me), next ? messageNode(next, me) : null);
  }
  for (const message of added) {
    markGroup(room, message, me);
    const next = room.after(message);
    if (next) markGroup(room, next, me);
  }
  // Scroll last, once every height above is final.
  if (older) log.scrollTop = log.scrollHeight - fromBottom; // scroll-back: the view stays put
  else if (atBottom) log.scrollTop = log.scrollHeight;
}

export function showOlderButton(room, loading) {
  // The button sits above the messages: showing or hiding it must not move what the reader sees.
  const fromBottom = el.log.scrollHeight - el.log.scrollTop;
  el.older.hidden = !room?.hasOlder || room.firstId === null; // nothing shown yet: nothing to go back from
  el.older.disabled = loading;
  el.older.textContent = loading ? "Loading older messages…" : "Load older messages";
  el.log.scrollTop = el.log.scrollHeight - fromBottom;
}

// -- the mobile menu ----------------------------------------------------------

export function setMenuOpen(open) {
  el.menuToggle.setAttribute("aria-expanded", String(open));
  document.body.classList.toggle("menu-open", open);
}
