// One Socket.IO connection for one session. A new session (log in, log out, a
// session ended elsewhere) gets a new Connection: its handshake must carry the
// new cookie, and whatever still arrives on the old socket must not touch the page.

const ACK_TIMEOUT_MS = 8000;

export class ChatError extends Error {
  constructor(code, message, retryAfter = null) {
    super(message);
    this.code = code;
    this.retryAfter = retryAfter;
  }
}

export class Connection {
  /**
   * handlers: welcome(w), chat(message), edited(message), deleted({room, id, rev}), presence(p), error(ChatError),
   * dropped() — the transport went, socket.io-client is reconnecting by itself;
   * ended(reason) — the server ended this socket for good (session_ended, or a refused handshake).
   */
  constructor(handlers) {
    this.closed = false;
    this.socket = globalThis.io({
      forceNew: true, // never reuse a cached Manager: a new handshake sends the current cookie
      transports: ["websocket", "polling"],
      tryAllTransports: true,
      reconnectionDelay: 500,
      reconnectionDelayMax: 3000,
    });
    const on = (event, handler) =>
      this.socket.on(event, (...args) => {
        if (!this.closed) handler(...args);
      });
    on("welcome", handlers.welcome);
    on("new chat", handlers.chat);
    on("chat edited", handlers.edited);
    on("chat deleted", handlers.deleted);
    on("presence", handlers.presence);
    on("chat_error", (e) => handlers.error(new ChatError(e.error, e.message, e.retry_after)));
    on("session_ended", ({ reason }) => {
      this.closed = true; // the disconnect that follows is part of this ending
      handlers.ended(reason);
    });
    // "io server disconnect" and a refused handshake leave the socket inactive: no automatic retry.
    on("disconnect", () => (this.socket.active ? handlers.dropped() : handlers.ended("disconnected")));
    on("connect_error", (error) => {
      if (!this.socket.active) handlers.ended(error.data?.reason ?? error.message);
    });
    // Back online (the laptop woke up, the network returned): try now, not when the backoff says.
    this.onOnline = () => this.retryNow();
    globalThis.addEventListener("online", this.onOnline);
  }

  /** Listen to another server event (only while this connection is the page's). */
  on(event, handler) {
    this.socket.on(event, (...args) => {
      if (!this.closed) handler(...args);
    });
  }

  /** While socket.io-client waits to reconnect, reconnect at once (and start its backoff afresh). */
  retryNow() {
    if (this.closed || this.socket.connected || !this.socket.active) return;
    // Not connected, so this fires no "disconnect": it only cancels the pending attempt.
    this.socket.disconnect();
    this.socket.connect();
  }

  get connected() {
    return !this.closed && this.socket.connected;
  }

  /** Emit with an ack; resolves with a successful answer, rejects with a ChatError. */
  request(event, payload) {
    return new Promise((resolve, reject) => {
      if (!this.connected) {
        reject(new ChatError("offline", "Not connected; try again when the page is back online."));
        return;
      }
      this.socket.timeout(ACK_TIMEOUT_MS).emit(event, payload, (error, answer) => {
        if (this.closed) return; // a replaced connection: nobody is waiting for it any more
        if (error) reject(new ChatError("no_answer", "The server did not answer; try again."));
        else if (answer?.ok) resolve(answer);
        else reject(new ChatError(answer?.error, answer?.message ?? "The server refused that.", answer?.retry_after));
      });
    });
  }

  close() {
    this.closed = true;
    globalThis.removeEventListener("online", this.onOnline);
    this.socket.disconnect();
  }
}
