// Rooms that follow the person, on the page: read markers, mentions, typing and notifications.
// Kept apart from app.js (the controller), which calls these at the right moments.

const TYPING_SEND_MS = 2000; // SPEC relays at most one `typing` per session per room every 2 s
const TYPING_SHOWN_MS = 5000; // shown for about 5 s after the last one

/** Take a RoomState (welcome, join ack, `read` ack, `room state`) into a room of the page. */
export function applyState(room, state) {
  room.readId = Math.max(room.readId ?? 0, state.read_id ?? 0);
  room.unread = state.unread ?? 0;
  room.mentions = state.mentions ?? 0;
}

/** Whether a message names the reader's account (guests cannot be mentioned). */
export function mentionsMe(message, me) {
  const account = me?.account?.toLowerCase();
  return Boolean(account) && (message.mentions ?? []).some((name) => name.toLowerCase() === account);
}

const READ_EVERY_MS = 1000; // a busy room is marked read once a second, not once a message
const readTimers = new Map(); // room name -> pending `read`

/** Mark a room read up to its newest message, if it is the room on screen in a visible tab. */
export function markRead(connection, room, shown) {
  if (!room || !shown || document.hidden || !connection?.connected) return false;
  const changed = room.unread || room.mentions;
  room.unread = 0;
  room.mentions = 0;
  if (room.lastId !== null && room.lastId > (room.readId ?? 0) && !readTimers.has(room.name)) {
    const send = () => {
      readTimers.delete(room.name);
      const last = room.lastId;
      if (last === null || last <= (room.readId ?? 0) || !connection.connected) return;
      room.readId = last;
      connection.request("read", { room: room.name, id: last }).catch(() => {}); // the next view marks it again
    };
    // The first at once (other tabs follow quickly); then at most one a second, with the newest id.
    const idle = Date.now() - (room.readSentAt ?? 0) >= READ_EVERY_MS;
    readTimers.set(room.name, setTimeout(send, idle ? 0 : READ_EVERY_MS));
    room.readSentAt = Date.now();
  }
  return Boolean(changed);
}

/** "X is typing…" under the message list, per room; and our own typing, sent at most every 2 s. */
export class Typing {
  constructor(line) {
    this.line = line;
    this.byRoom = new Map(); // room -> Map(member id -> {name, until})
    this.lastSent = new Map(); // room -> time we last told the server
    this.timer = null;
    this.current = null;
  }

  /** The composer changed: tell the server, not more often than it relays. */
  typed(connection, room) {
    if (!room || !connection?.connected) return;
    const now = Date.now();
    if (now - (this.lastSent.get(room) ?? 0) < TYPING_SEND_MS) return;
    this.lastSent.set(room, now);
    connection.request("typing", { room }).catch(() => {});
  }

  /** Someone else is typing (`typing` from the server). */
  heard({ room, member }) {
    if (!this.byRoom.has(room)) this.byRoom.set(room, new Map());
    this.byRoom.get(room).set(member.id, { name: member.name, until: Date.now() + TYPING_SHOWN_MS });
    this.render();
  }

  /** Their message arrived: they are no longer typing it. */
  sent(message, online) {
    const typists = this.byRoom.get(message.room);
    if (!typists) return;
    for (const [id, typist] of typists) if (typist.name === message.name && online?.has(id) !== false) typists.delete(id);
    this.render();
  }

  show(room) {
    this.current = room;
    this.render();
  }

  render() {
    clearTimeout(this.timer);
    const now = Date.now();
    const typists = this.byRoom.get(this.current) ?? new Map();
    for (const [id, typist] of typists) if (typist.until <= now) typists.delete(id);
    const names = [...typists.values()].map((t) => t.name);
    this.line.textContent =
      names.length === 0 ? "" : names.length === 1 ? `${names[0]} is typing…`
        : names.length === 2 ? `${names[0]} and ${names[1]} are typing…` : "Several people are typing…";
    if (typists.size) {
      const next = Math.min(...[...typists.values()].map((t) => t.until)) - now;
      this.timer = setTimeout(() => this.render(), Math.max(50, next));
    }
  }
}

/** Browser notifications for mentions while the tab is hidden, once the person allows them. */
export class Notifier {
  constructor(button) {
    this.button = button;
    const supported = "Notification" in globalThis;
    button.hidden = !supported || Notification.permission !== "default";
    button.addEventListener("click", async () => {
      await Notification.requestPermission();
      button.hidden = Notification.permission !== "default";
    });
  }

  mentioned(message) {
    if (!document.hidden || !("Notification" in globalThis) || Notification.permission !== "granted") return;
    // The text goes into the notification as text; the browser never renders it as HTML.
    const note = new Notification(`${message.name} mentioned you in #${message.room}`, {
      body: message.msg.slice(0, 200),
      tag: `chatd-${message.room}-${message.id}`,
    });
    note.addEventListener("click", () => globalThis.focus());
  }
}
