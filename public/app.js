// The page's controller: it owns the connection and the rooms, and keeps the view in step.
//
// Two rules shape it:
// - The server keeps the session's rooms (welcome's `rooms`, then `joined`/`left`); history
//   only comes on request, so every `welcome` (first connect, reconnect, new session) asks
//   `join` for each room's snapshot and catches each up with `history` `since` the highest
//   revision it saw (new, edited and deleted messages; js/messages.js), then sends what
//   waits in the outbox. Read markers, mentions, typing and notifications are in js/follow.js.
// - When this page logs in, registers or logs out, the server ends the old socket's session
//   *before* the HTTP answer sets the new cookie. So the page ignores that ending and opens a
//   new connection only once the answer has arrived; an ending it did not ask for (another
//   tab, expiry) is shown, and the page reconnects with whatever session the cookie now holds.

import * as api from "./js/api.js";
import { Connection } from "./js/connection.js";
import { applyState, markRead, mentionsMe, Notifier, Typing } from "./js/follow.js";
import { Outbox, applyChanges, attachMessageActions, catchUpSince, removeMessage } from "./js/messages.js";
import { installModeration } from "./js/moderation.js";
import { HISTORY_PAGE, Rooms } from "./js/rooms.js";
import * as view from "./js/view.js";
import { el } from "./js/view.js";

const RECOVER_DELAY_MS = 1500;
const RECOVER_DELAY_MAX_MS = 30000;

const rooms = new Rooms();
// The directory, topics, direct rooms and moderators' actions (js/moderation.js).
const moderation = installModeration({
  request: (event, payload) => connection.request(event, payload),
  me: () => me,
  current: () => rooms.current,
  member: (id) => rooms.get(rooms.current)?.online.byId.get(id),
  open: (name) => openRoom(name).catch(showError),
  notice: (text) => view.showNotice(text),
  error: (error) => showError(error),
});
const typing = new Typing(el.typing);
const notifier = new Notifier(el.notify);
let me = null; // {name, account, id}: id (the public member id) once welcomed
let connection = null;
let ready = false; // welcomed, and every room joined again
let switching = 0; // log in / register / log out requests in flight
let endedWhileSwitching = false;
let recoverTimer = null;
let recoverDelay = RECOVER_DELAY_MS;
let loadingOlder = false;
// Rooms being joined: the `new chat`s that came before the join's answer. The server
// sends a joining socket every message after its history, and one may overtake the answer.
const joining = new Map();
const outbox = new Outbox({
  connection: () => connection,
  ready: () => ready && connection?.connected,
  showError: (error) => showError(error),
  putBack: (text) => {
    if (!el.message.value) el.message.value = text;
  },
});

// -- connection and session ---------------------------------------------------

function connect() {
  connection?.close();
  connection = new Connection({
    welcome: onWelcome,
    chat: onChat,
    edited: onEdited,
    deleted: onDeleted,
    presence: onPresence,
    error: showError,
    dropped: () => {
      ready = false;
      view.showStatus("Reconnecting");
      outbox.render();
    },
    ended: onEnded,
  });
  connection.on("joined", ({ room }) => enterRoom(connection, room).catch(showError));
  connection.on("left", (event) => {
    if (rooms.has(event.room)) dropRoom(event.room);
    moderation.removed(event);
  });
  connection.on("room updated", (event) => moderation.updated(event));
  connection.on("room state", onRoomState);
  connection.on("typing", (event) => typing.heard(event));
  ready = false;
  view.showStatus("Connecting");
}

async function onWelcome(welcome) {
  const current = connection;
  recoverDelay = RECOVER_DELAY_MS;
  setIdentity(welcome);
  rooms.sync(welcome.rooms.map((state) => state.room));
  showCurrent();
  await Promise.all(rooms.all.map((room) => resync(current, room, welcome)));
  if (current !== connection) return;
  for (const state of welcome.rooms) if (rooms.has(state.room)) applyState(rooms.get(state.room), state);
  ready = true;
  view.showStatus("Online");
  showCurrent();
  outbox.render(rooms.current);
  outbox.flush();
  maybeLoadOlder();
}

/** Get a room back after (re)connecting: general comes with `welcome`, the others' snapshots with `join`. */
async function resync(current, room, welcome) {
  try {
    const inWelcome = room.name === welcome.room;
    const answer = inWelcome ? welcome : await current.request("join", { room: room.name });
    room.onlineCount = answer.online_count ?? 0;
    if (inWelcome) moderation.learnTopic(room.name).catch(() => {});
    else moderation.setTopic(room.name, answer.topic ?? "");
    await catchUp(current, room, answer.history, answer.online);
  } catch (error) {
    if (error.code === "invalid_room" || error.code === "too_many_rooms") dropRoom(room.name); // e.g. a stale saved room
    showError(error);
  }
}

/**
 * Merge a (re)join's latest history, then, for a room the page held before, every change
 * since the highest revision it saw: new messages, edits and deletions.
 */
async function catchUp(current, room, history, online) {
  const since = room.maxRev;
  const held = room.lastId;
  if (held === null) room.hasOlder = history.length >= HISTORY_PAGE;
  room.online.reset(online);
  if (room.name === rooms.current) view.renderOnline(room, me);
  addMessages(room, history, held ?? Infinity);
  if (room.name === rooms.current) view.showOlderButton(room, loadingOlder);
  if (since === null) return;
  await catchUpSince(current, room, since, (changes) => applyChanges(room, changes, changeContext(room, held ?? 0)));
}

function changeContext(room, unreadAbove = 0) {
  return { me, shown: room.name === rooms.current, addNew: (r, fresh) => addMessages(r, fresh, unreadAbove) };
}

function onEnded(reason) {
  ready = false;
  if (switching) {
    endedWhileSwitching = true; // the answer to our own request reconnects
    return;
  }
  view.showStatus(reason === "unavailable" ? "Server unavailable" : "Session ended");
  view.showNotice(`${ENDINGS[reason] ?? "The server ended this session."} Reconnecting…`);
  scheduleRecovery();
}

const ENDINGS = {
  unavailable: "The server cannot reach its storage right now.",
  logout: "You were logged out in another tab.",
  login: "Someone logged in with this session in another tab.",
  expired: "Your session expired.",
};

function scheduleRecovery() {
  clearTimeout(recoverTimer);
  recoverTimer = setTimeout(recover, recoverDelay);
  recoverDelay = Math.min(recoverDelay * 2, RECOVER_DELAY_MAX_MS);
}

/**
 * Connect with the session the cookie holds now. GET /api/session first: it issues a guest
 * session when the cookie has none (or an ended one), so the handshake is never refused for that.
 */
async function recover() {
  const before = connection;
  let identity;
  try {
    identity = await api.getSession();
  } catch {
    scheduleRecovery(); // the server is unreachable: try again later
    return;
  }
  if (switching || connection !== before) return; // a log in or out got there first
  setIdentity(identity);
  connect();
}

/** Log in, register or log out; on success the old socket is gone and a new one carries the new cookie. */
async function switchSession(request) {
  switching += 1;
  let identity;
  try {
    identity = await request();
  } catch (error) {
    if (endedWhileSwitching && switching === 1) scheduleRecovery();
    throw error;
  } finally {
    switching -= 1;
    if (!switching) endedWhileSwitching = false;
  }
  clearTimeout(recoverTimer);
  setIdentity(identity);
  connect();
}

function setIdentity({ name, account, id = null }) {
  const changed = !me || me.name !== name || me.account !== account;
  me = { name, account, id: id ?? (changed ? null : me.id) };
  view.showIdentity(me);
  if (changed) {
    view.forgetMessageNodes(); // which messages are "mine" changed
    view.renderRoom(rooms.get(rooms.current), me);
  }
}

// -- events from the server ------------------------------------------------------

function onChat(message) {
  const room = rooms.get(message.room);
  if (!room) {
    joining.get(message.room)?.push(message);
    return;
  }
  addMessages(room, [message], 0);
  typing.sent(message, room.online);
  const mine = view.isMine(message, me);
  if (mine) outbox.heard(message);
  if (message.room === rooms.current && !mine) view.announce(`${message.name}: ${message.msg}`);
  if (!mine && mentionsMe(message, me)) {
    if (message.room !== rooms.current || document.hidden) {
      room.mentions += 1;
      view.renderRooms(rooms, selectRoom);
    }
    notifier.mentioned(message);
  }
  showCurrent(false);
}

/** Another tab (or device) moved the read marker we share, or sent a message. */
function onRoomState(state) {
  const room = rooms.get(state.room);
  if (!room) return;
  applyState(room, state);
  view.renderRooms(rooms, selectRoom);
}

/** The shown room is read as it is shown (in a visible tab); the sidebar follows. */
function showCurrent(render = true) {
  const changed = ready && markRead(connection, rooms.get(rooms.current), true);
  if (render || changed) view.renderRooms(rooms, selectRoom);
  if (render) view.renderRoom(rooms.get(rooms.current), me);
  if (render) moderation.renderTopic();
  typing.show(rooms.current);
}

function onEdited(message) {
  const room = rooms.get(message.room);
  if (room) applyChanges(room, [message], changeContext(room));
}

function onDeleted({ room: name, id, rev }) {
  const room = rooms.get(name);
  if (!room) return;
  // A deleted message no longer counts as unread (SPEC), nor as a mention.
  const held = room.find(id);
  if (held && room.unread > 0 && id > (room.readId ?? 0) && !view.isMine(held, me)) {
    room.unread -= 1;
    if (room.mentions > 0 && mentionsMe(held, me)) room.mentions -= 1;
    view.renderRooms(rooms, selectRoom);
  }
  removeMessage(room, id, rev, me, name === rooms.current);
}

function onPresence(change) {
  const room = rooms.get(change.room);
  if (!room) return; // not joined yet: the join's snapshot will be newer
  room.onlineCount = change.count ?? room.onlineCount;
  // While this socket is in a room, our session is in it: a leave of our own id can only be stale.
  room.online.apply(change, me?.id);
  if (change.room === rooms.current) view.renderOnline(room, me);
}

/** Merge new messages into a room; those with ids above `unreadAbove` count as unread when the room is not shown. */
function addMessages(room, messages, unreadAbove) {
  const added = room.merge(messages);
  if (room.name === rooms.current) {
    if (added.length) view.insertMessages(room, added, me);
    if (!document.hidden) return; // read as it arrives
  }
  const unread = added.filter((m) => m.id > unreadAbove && m.id > room.readId && !view.isMine(m, me)).length;
  if (unread) {
    room.unread += unread;
    view.renderRooms(rooms, selectRoom);
  }
}

function showError(error) {
  if (error.code === "rate_limited" && error.retryAfter != null) {
    const seconds = Math.max(0.1, Math.ceil(error.retryAfter * 10) / 10);
    view.showNotice(`${error.message} You can send again in ${seconds} s.`, seconds);
  } else {
    view.showNotice(error.message);
  }
}

// -- what the user does ---------------------------------------------------------

function selectRoom(name) {
  rooms.select(name);
  showCurrent();
  outbox.render(name);
  view.setMenuOpen(false);
  maybeLoadOlder();
}

function dropRoom(name) {
  rooms.remove(name);
  view.renderRooms(rooms, selectRoom);
  view.renderRoom(rooms.get(rooms.current), me);
}

async function loadOlder() {
  const room = rooms.get(rooms.current);
  if (!room?.hasOlder || room.firstId === null || loadingOlder || !ready) return;
  loadingOlder = true;
  view.showOlderButton(room, true);
  try {
    const query = { room: room.name, before: room.firstId, limit: HISTORY_PAGE };
    const { messages } = await connection.request("history", query);
    room.hasOlder = messages.length >= HISTORY_PAGE;
    const added = room.merge(messages);
    if (room.name === rooms.current) view.insertMessages(room, added, me, true);
  } catch (error) {
    showError(error);
  } finally {
    loadingOlder = false;
    if (room.name === rooms.current) view.showOlderButton(room, false);
  }
  maybeLoadOlder();
}

/** Infinite scroll: fetch older messages while the reader is near the top. */
function maybeLoadOlder() {
  if (el.log.scrollTop < 150) loadOlder();
}

el.log.addEventListener("scroll", maybeLoadOlder, { passive: true });
el.older.addEventListener("click", loadOlder);

el.sendForm.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = el.message.value;
  if (!text.trim() || !rooms.current) return;
  el.message.value = ""; // at once, so fast typists can go on; given back if the server refuses it
  outbox.send(rooms.current, text); // sent now, or when the connection is back: once either way
});

attachMessageActions({ connection: () => connection, room: () => rooms.get(rooms.current), showError });

/** Join a room (ours: the form; another tab's or device's: `joined`) and take its snapshot. */
async function enterRoom(current, name) {
  if (rooms.has(name) || joining.has(name)) return;
  joining.set(name, []);
  try {
    const answer = await current.request("join", { room: name });
    const room = rooms.add(answer.room);
    room.onlineCount = answer.online_count ?? 0;
    moderation.setTopic(answer.room, answer.topic ?? "");
    await catchUp(current, room, answer.history, answer.online);
    addMessages(room, joining.get(name), 0);
    applyState(room, answer);
    view.renderRooms(rooms, selectRoom);
  } finally {
    joining.delete(name);
  }
}

el.message.addEventListener("input", () => typing.typed(connection, rooms.current));
document.addEventListener("visibilitychange", () => showCurrent(false));

/** Join a room (if need be) and show it. */
async function openRoom(name) {
  await enterRoom(connection, name);
  if (rooms.has(name)) selectRoom(name);
  el.message.focus();
}

el.joinForm.addEventListener("submit", async (event) => {
  event.preventDefault();
  const name = el.joinRoom.value.trim().replace(/^#/, "").toLowerCase();
  if (!name) return;
  try {
    await openRoom(name);
    el.joinRoom.value = "";
  } catch (error) {
    showError(error);
  }
});

el.leave.addEventListener("click", async () => {
  const name = rooms.current;
  try {
    await connection.request("leave", { room: name });
    dropRoom(name);
  } catch (error) {
    showError(error);
  }
});

el.authForm.addEventListener("submit", async (event) => {
  event.preventDefault();
  const register = event.submitter?.value === "register";
  const username = el.username.value.trim();
  const password = el.password.value;
  el.authError.textContent = "";
  try {
    await switchSession(() => (register ? api.register(username, password) : api.logIn(username, password)));
    el.authForm.reset();
    el.logout.focus();
  } catch (error) {
    el.authError.textContent = error.message;
  }
});

el.logout.addEventListener("click", async () => {
  try {
    await switchSession(api.logOut);
    el.username.focus();
  } catch (error) {
    view.showNotice(error.message);
  }
});

el.menuToggle.addEventListener("click", () => view.setMenuOpen(el.menuToggle.getAttribute("aria-expanded") !== "true"));
document.addEventListener("keydown", (event) => {
  if (event.key === "Escape" && document.body.classList.contains("menu-open")) {
    view.setMenuOpen(false);
    el.menuToggle.focus();
  }
});

// -- start ----------------------------------------------------------------------

view.renderRooms(rooms, selectRoom);
view.renderRoom(rooms.get(rooms.current), me);
outbox.render(rooms.current);
recover();
