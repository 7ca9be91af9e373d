// Messages people can fix, and sending exactly once.
//
// - Edit and delete one's own messages: the Edit / Delete buttons on a message (view.js draws
//   them on one's own); Enter saves an edit, Escape cancels it. What the server then sends
//   (`chat edited`, `chat deleted`) changes every page showing the room, this one included.
// - The outbox: every message typed is kept, with its `client_id`, until the server acks it.
//   A message typed while disconnected, or whose ack did not come, stays pending and is sent
//   again with the same `client_id` after reconnecting; the server stores it once.
// - Catching up: after a reconnect each room asks `history` `since` the highest revision the
//   page saw, and applies the new, edited and deleted messages instead of reloading.

import { ChatError } from "./connection.js";
import * as view from "./view.js";
import { el } from "./view.js";

const CATCH_UP_PAGE = 100; // the largest page `history` gives
const RESEND_AFTER_MS = 3000; // a send whose ack did not come is tried again this long after
const STORAGE_KEY = "chatd.outbox";

/** A client_id: 1–64 of A–Z a–z 0–9 _ - (SPEC). */
function newClientId() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return "p" + [...bytes].map((b) => b.toString(16).padStart(2, "0")).join("");
}

const retryable = (error) => error.code === "offline" || error.code === "no_answer";

export class Outbox {
  /** page: {connection(), ready(), showError(e), putBack(text)} */
  constructor(page) {
    this.page = page;
    // Per tab, as the rooms are: a reload keeps what had not been sent yet.
    this.items = JSON.parse(sessionStorage.getItem(STORAGE_KEY) || "[]");
    this.flushingOn = null; // the connection a flush is sending on
    this.sending = null; // the item whose `send chat` waits for its answer
    // Items whose `new chat` came back before the answer did: shown in the log already, so no
    // longer drawn as pending. Not saved with the items: after a reload they are sent again,
    // and the server answers a kept client_id without storing it twice.
    this.echoed = new WeakSet();
    this.timer = null;
    this.list = document.createElement("ol");
    this.list.className = "messages outbox";
    this.list.setAttribute("aria-label", "Waiting to be sent");
    el.messages.after(this.list);
  }

  /** Keep a typed message and send it when the connection allows. */
  send(room, msg) {
    this.items.push({ room, msg, clientId: newClientId() });
    this.#changed();
    this.flush();
  }

  /** Send what waits, oldest first, one at a time (so they keep their order). */
  async flush() {
    const current = this.page.connection();
    // One flush per connection. A replaced connection never answers (connection.js), so a
    // flush stuck on it must not hold up the new one.
    if (this.flushingOn === current) return;
    this.flushingOn = current;
    clearTimeout(this.timer);
    try {
      while (this.items.length && this.page.ready() && this.page.connection() === current) {
        const item = this.items[0];
        try {
          this.sending = item;
          await current.request("send chat", { room: item.room, msg: item.msg, client_id: item.clientId });
        } catch (error) {
          if (retryable(error)) {
            this.#later(RESEND_AFTER_MS); // and at the next reconnect, whichever comes first
            return;
          }
          if (error.code === "rate_limited") {
            this.#later(Math.max(100, (error.retryAfter ?? 1) * 1000));
            this.page.showError(error);
            return;
          }
          this.page.showError(error); // refused for good (e.g. not in that room any more): give the text back
          this.page.putBack(item.msg);
        } finally {
          this.sending = null;
        }
        if (this.items[0] === item) this.items.shift();
        this.#changed();
      }
    } finally {
      if (this.flushingOn === current) this.flushingOn = null;
    }
  }

  /**
   * One's own `new chat` arrived. The server sends it to the room before it answers `send chat`,
   * so for a moment the message is in the log and still in the outbox: if it is the one waiting
   * for its answer, stop drawing that one as pending.
   */
  heard(message) {
    const item = this.sending;
    if (!item || item.room !== message.room || item.msg.trim() !== message.msg) return;
    this.echoed.add(item);
    this.render();
  }

  #later(ms) {
    clearTimeout(this.timer);
    this.timer = setTimeout(() => this.flush(), ms);
  }

  #changed() {
    sessionStorage.setItem(STORAGE_KEY, JSON.stringify(this.items));
    this.render();
  }

  /** The shown room's pending messages, below its log. */
  render(roomName = this.shown) {
    this.shown = roomName;
    this.list.replaceChildren(
      ...this.items
        .filter((item) => item.room === roomName && !this.echoed.has(item))
        .map((item) => {
          const node = document.createElement("li");
          node.className = "message mine pending";
          const meta = document.createElement("p");
          meta.className = "meta";
          meta.textContent = this.page.ready() ? "Sending…" : "Waiting for the connection…";
          const text = document.createElement("p");
          text.className = "text";
          text.textContent = item.msg;
          node.append(meta, text);
          return node;
        }),
    );
    if (this.list.childElementCount) el.log.scrollTop = el.log.scrollHeight;
  }
}

/**
 * Apply a room's changes (a `since` page, or one live event) to the page's model and view.
 * Messages with an id the page holds replace it when newer; new ones above what it holds are
 * added (`addNew`); deletions remove what is held. Edits of messages older than the page has
 * loaded are left to scroll-back.
 */
export function applyChanges(room, changes, { me, shown, addNew }) {
  const fresh = [];
  for (const change of changes) {
    if (change.deleted) {
      removeMessage(room, change.id, change.rev, me, shown);
    } else if (room.find(change.id)) {
      const old = room.replace(change);
      if (old && shown) view.replaceMessage(room, old, change, me);
    } else if (room.firstId === null || change.id > room.firstId) {
      fresh.push(change); // newer than the first message loaded: it belongs in the log
    } else {
      room.sawRev(change.rev);
    }
  }
  if (fresh.length) addNew(room, fresh);
}

export function removeMessage(room, id, rev, me, shown) {
  const held = room.find(id);
  const next = held ? room.after(held) : null;
  const old = room.remove(id, rev);
  if (old && shown) view.removeMessage(room, old, next, me);
}

/** Ask `history` `since` the highest rev seen, page by page, and apply every change. */
export async function catchUpSince(connection, room, since, apply) {
  for (;;) {
    const { messages, rev } = await connection.request("history", { room: room.name, since, limit: CATCH_UP_PAGE });
    apply(messages);
    if (messages.length < CATCH_UP_PAGE) {
      room.sawRev(rev); // everything up to the room's revision is now applied
      return;
    }
    since = messages[messages.length - 1].rev;
  }
}

/**
 * The Edit and Delete buttons of the shown room's messages, and the inline editor.
 * page: {connection(), room(), showError(e)}
 */
export function attachMessageActions(page) {
  el.messages.addEventListener("click", async (event) => {
    const button = event.target.closest("button[data-action]");
    const item = button?.closest("li[data-id]");
    const room = page.room();
    if (!item || !room) return;
    const id = Number(item.dataset.id);
    if (button.dataset.action === "delete") {
      try {
        await page.connection().request("delete chat", { room: room.name, id });
      } catch (error) {
        page.showError(error);
      }
    } else {
      startEditing(page, room, item, id);
    }
  });
}

function startEditing(page, room, item, id) {
  const message = room.find(id);
  const text = item.querySelector(".text");
  if (!message || !text || item.querySelector(".editor")) return;
  const editor = document.createElement("input");
  editor.className = "editor";
  editor.maxLength = 2000;
  editor.value = message.msg;
  editor.setAttribute("aria-label", "Edit message (Enter saves, Escape cancels)");
  const stop = () => {
    editor.replaceWith(text);
    el.message.focus();
  };
  editor.addEventListener("keydown", async (event) => {
    if (event.key === "Escape") {
      event.preventDefault();
      event.stopPropagation();
      stop();
    } else if (event.key === "Enter") {
      event.preventDefault();
      if (editor.value.trim() === message.msg) return stop();
      try {
        // The `chat edited` that follows redraws the message, here and everywhere.
        await page.connection().request("edit chat", { room: room.name, id, msg: editor.value });
        if (editor.isConnected) stop();
      } catch (error) {
        page.showError(error instanceof ChatError ? error : new ChatError("error", String(error)));
      }
    }
  });
  text.replaceWith(editor);
  editor.focus();
  editor.select();
}
