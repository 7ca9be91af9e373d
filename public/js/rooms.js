// The page's model of its rooms: messages kept sorted by id without duplicates,
// the online list, unread counts and how far back history has been loaded.

import { OnlineList } from "./online.js";

export const HISTORY_PAGE = 50; // what welcome/join carry, and what we ask for when scrolling back

export class Room {
  constructor(name) {
    this.name = name;
    this.messages = []; // sorted by id
    this.ids = new Set();
    this.online = new OnlineList();
    this.onlineCount = 0; // how many are online in all (the list holds the first 500)
    this.unread = 0; // the server's count (RoomState), kept up by `new chat`s meanwhile
    this.mentions = 0;
    this.readId = 0; // the read marker, as far as this page knows
    this.hasOlder = true; // false once the start of the room's history is loaded
    this.maxRev = null; // the highest revision seen: where `history` `since` catches up from
  }

  get firstId() {
    return this.messages.length ? this.messages[0].id : null;
  }

  get lastId() {
    return this.messages.length ? this.messages[this.messages.length - 1].id : null;
  }

  /** Add messages in any order, skipping ids already held; returns the ones that were new. */
  merge(messages) {
    const added = [];
    for (const message of messages) {
      // A never-edited message's rev is when it was sent: every change before it has reached
      // this page (history stops there, live changes follow). An edited one may be newer than
      // live changes still on their way, so only the live stream and `since` count those.
      if (message.edited == null) this.sawRev(message.rev);
      if (this.ids.has(message.id)) continue;
      this.ids.add(message.id);
      this.messages.splice(this.#insertionIndex(message.id), 0, message);
      added.push(message);
    }
    return added;
  }

  sawRev(rev) {
    if (Number.isInteger(rev) && rev > (this.maxRev ?? 0)) this.maxRev = rev;
  }

  /** The held message with this id, or null. */
  find(id) {
    const message = this.messages[this.#insertionIndex(id)];
    return message?.id === id ? message : null;
  }

  /** Put an edited message in place of the one held with its id (if it is newer); the old one, or null. */
  replace(message) {
    this.sawRev(message.rev);
    const old = this.find(message.id);
    if (!old || old.rev >= message.rev) return null;
    this.messages[this.#insertionIndex(message.id)] = message;
    return old;
  }

  /** Drop a deleted message; the one that was held, or null. */
  remove(id, rev) {
    this.sawRev(rev);
    const old = this.find(id);
    if (!old) return null;
    this.messages.splice(this.#insertionIndex(id), 1);
    this.ids.delete(id);
    return old;
  }

  /** The message that follows `message` (by id), or null: where to insert it in the DOM. */
  after(message) {
    const index = this.#insertionIndex(message.id);
    return this.messages[index + 1] ?? null;
  }

  /** The message just before `message` (by id), or null. */
  before(message) {
    const index = this.#insertionIndex(message.id);
    return this.messages[index - 1] ?? null;
  }

  #insertionIndex(id) {
    let low = 0;
    let high = this.messages.length;
    while (low < high) {
      const mid = (low + high) >> 1;
      if (this.messages[mid].id < id) low = mid + 1;
      else high = mid;
    }
    return low;
  }
}

/** The session's rooms, as the server keeps them (welcome, `joined`, `left`), sorted by name. */
export class Rooms {
  static #storageKey = "chatd.room"; // the room this tab shows, across a reload

  constructor() {
    this.byName = new Map();
    this.current = null;
    this.wanted = sessionStorage.getItem(Rooms.#storageKey);
  }

  /** Become exactly the server's list of rooms; keeps what is held of those that stay. */
  sync(names) {
    for (const name of [...this.byName.keys()]) if (!names.includes(name)) this.remove(name);
    for (const name of names) this.add(name);
    if (!this.has(this.current)) {
      this.current = this.has(this.wanted) ? this.wanted : this.has("general") ? "general" : (names[0] ?? null);
    }
  }

  get(name) {
    return this.byName.get(name) ?? null;
  }

  has(name) {
    return this.byName.has(name);
  }

  get all() {
    return [...this.byName.values()];
  }

  get totalUnread() {
    return this.all.reduce((sum, room) => sum + room.unread, 0);
  }

  add(name) {
    if (!this.byName.has(name)) {
      this.byName.set(name, new Room(name));
      // Sorted by name, as the server lists them.
      this.byName = new Map([...this.byName].sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0)));
    }
    return this.byName.get(name);
  }

  remove(name) {
    const names = [...this.byName.keys()];
    const index = names.indexOf(name);
    this.byName.delete(name);
    if (this.current === name) {
      // Select the neighbour, as closing a tab does.
      const rest = names.filter((n) => n !== name);
      this.current = rest[Math.min(index, rest.length - 1)] ?? null;
    }
  }

  select(name) {
    this.current = name;
    this.wanted = name;
    sessionStorage.setItem(Rooms.#storageKey, name);
  }
}
