// The Node stack chatd is measured against: express + express-session + socket.io,
// speaking the part of chatd's protocol that the benchmark uses.
//
//   node server.js PORT
//
// - GET / : the same page file chatd serves, with a session cookie naming a guest.
// - Socket.IO: the handshake runs express-session on the Engine.IO request (the
//   seeds' `io.engine.use` pattern); no valid session: connect_error
//   {message: "unauthorized", data: {reason}}.
// - On connect: joins `general`, gets `welcome` with the last 50 messages and the
//   online list (one member per session, sorted by name, kept sorted as members
//   come and go); room changes go out as `presence` {room, joins, leaves},
//   gathered for up to 1 s.
// - `send chat` {msg, room?}: validated (1-2000 characters after trimming, a joined
//   room), acked {ok, id}, broadcast as `new chat` to the room.
// Messages live in memory only: it does less work than chatd, which stores every
// message durably before acking it.
"use strict";

const http = require("http");
const path = require("path");
const crypto = require("crypto");
const express = require("express");
const session = require("express-session");
const { Server } = require("socket.io");

const PORT = Number(process.argv[2] || 3000);
const PAGE = path.resolve(__dirname, "..", "..", "public", "index.html");
const TTL_MS = 7 * 24 * 3600 * 1000;
const HISTORY = 50;

const sessionMiddleware = session({
  secret: crypto.randomBytes(32).toString("hex"),
  resave: false,
  saveUninitialized: false,
  cookie: { httpOnly: true, sameSite: "lax", maxAge: TTL_MS },
});

function ensureGuest(req) {
  if (!req.session.name) {
    req.session.name = `guest-${String(crypto.randomInt(10000)).padStart(4, "0")}`;
    req.session.memberId = crypto.randomBytes(12).toString("base64url");
    req.session.expiresAt = Math.floor((Date.now() + TTL_MS) / 1000);
  }
}

const app = express();
app.use(sessionMiddleware);
app.get("/", (req, res) => {
  ensureGuest(req);
  res.set("Cache-Control", "no-cache");
  res.sendFile(PAGE);
});

const server = http.createServer(app);
const io = new Server(server);
io.engine.use(sessionMiddleware);

io.use((socket, next) => {
  const s = socket.request.session;
  if (s && s.name) return next();
  const err = new Error("unauthorized");
  err.data = { reason: socket.request.headers.cookie ? "invalid_session" : "no_session" };
  next(err);
});

// -- rooms: history and presence --------------------------------------------------

const history = new Map(); // room -> last messages
const nextId = new Map(); // room -> next message id
const online = new Map(); // room -> {sessions: Map(session id -> {member, sockets}), members: [], keys: []}
const changes = new Map(); // room -> {joins: Map, leaves: Map}

function member(s) {
  return { id: s.memberId, name: s.name, account: null };
}

function noteChange(room, kind, m) {
  let c = changes.get(room);
  if (!c) {
    c = { joins: new Map(), leaves: new Map() };
    changes.set(room, c);
    setTimeout(() => {
      changes.delete(room);
      io.to(room).emit("presence", { room, joins: [...c.joins.values()], leaves: [...c.leaves.values()] });
    }, 1000);
  }
  (kind === "join" ? c.leaves : c.joins).delete(m.id);
  (kind === "join" ? c.joins : c.leaves).set(m.id, m);
}

// Each room's online list is kept sorted as members come and go (binary insertion on
// join, binary search and splice on leave), never re-sorted per connection: by name
// without regard to case, then by id. `keys` holds each member's lower-cased name,
// index for index. Intl.Collator().compare is what String.prototype.localeCompare
// uses, made once instead of per comparison.
const collator = new Intl.Collator();

function compare(keyA, a, keyB, b) {
  return collator.compare(keyA, keyB) || (a.id < b.id ? -1 : a.id > b.id ? 1 : 0);
}

// The first index whose member sorts after (key, m): where m goes, or just past it.
function upperBound(list, key, m) {
  let lo = 0;
  let hi = list.members.length;
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    if (compare(list.keys[mid], list.members[mid], key, m) <= 0) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

function enter(room, sid, s) {
  let list = online.get(room);
  if (!list) online.set(room, (list = { sessions: new Map(), members: [], keys: [] }));
  const entry = list.sessions.get(sid);
  if (entry) entry.sockets++;
  else {
    const m = member(s);
    const key = m.name.toLowerCase();
    list.sessions.set(sid, { member: m, sockets: 1 });
    const at = upperBound(list, key, m);
    list.members.splice(at, 0, m);
    list.keys.splice(at, 0, key);
    noteChange(room, "join", member(s));
  }
}

function exit(room, sid) {
  const list = online.get(room);
  const entry = list && list.sessions.get(sid);
  if (!entry) return;
  if (--entry.sockets === 0) {
    list.sessions.delete(sid);
    const m = entry.member;
    const at = upperBound(list, m.name.toLowerCase(), m) - 1; // ids are unique: m itself
    if (list.members[at] === m) {
      list.members.splice(at, 1);
      list.keys.splice(at, 1);
    }
    noteChange(room, "leave", m);
  }
}

// Read-only: socket.emit encodes its payload at once, so the list itself can go out.
function onlineList(room) {
  const list = online.get(room);
  return list ? list.members : [];
}

io.on("connection", (socket) => {
  const s = socket.request.session;
  const sid = socket.request.sessionID;
  const room = "general";
  socket.join(room);
  enter(room, sid, s);
  socket.emit("welcome", {
    ...member(s), expires_at: s.expiresAt, room, history: history.get(room) || [], online: onlineList(room),
  });

  socket.on("send chat", (payload, ack) => {
    const reply = typeof ack === "function" ? ack : () => {};
    if (!payload || typeof payload !== "object" || typeof payload.msg !== "string") {
      return reply({ ok: false, error: "invalid_request", message: "Send {msg}." });
    }
    const msg = payload.msg.trim();
    const target = payload.room == null ? "general" : payload.room;
    if (msg.length < 1 || msg.length > 2000) return reply({ ok: false, error: "invalid_message", message: "1-2000 characters." });
    if (!socket.rooms.has(target)) return reply({ ok: false, error: "not_in_room", message: "Join it first." });
    const id = (nextId.get(target) || 1);
    nextId.set(target, id + 1);
    const message = { id, room: target, name: s.name, account: null, msg, ts: Date.now() / 1000 };
    let list = history.get(target);
    if (!list) history.set(target, (list = []));
    list.push(message);
    if (list.length > HISTORY) list.shift();
    io.to(target).emit("new chat", message);
    reply({ ok: true, id });
  });

  socket.on("disconnect", () => exit(room, sid));
});

server.listen(PORT, "127.0.0.1", () => console.log(`node peer: serving on http://127.0.0.1:${PORT}/`));
process.on("SIGTERM", () => process.exit(0));
