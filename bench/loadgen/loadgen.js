// A load generator that speaks Engine.IO v4 / Socket.IO v5 itself over WebSocket.
//
//   node loadgen.js SCENARIO --url http://127.0.0.1:PORT --pid SERVER_PID [options]
//
// The same client for every server: it gets its cookie from a real `GET /`,
// opens `/socket.io/?EIO=4&transport=websocket` with that cookie, answers
// pings, and reads frames as text without decoding more JSON than it needs.
// Written for Node's `ws` because one core must parse ~70k+ frames per second
// and stay far from saturated while the server (on the other core) is.
// Prints one JSON object on stdout; a phase that runs out of time reports
// {"error": "did not finish", ...} instead of hanging.
"use strict";

const http = require("http");
const fs = require("fs");
const { performance } = require("perf_hooks");
const WebSocket = require("ws");

// -- options ------------------------------------------------------------------

function parseArgs(argv) {
  const opts = {
    scenario: argv[0], url: "http://127.0.0.1:8080", pid: 0, sockets: 100, concurrency: 50,
    cookies: "fresh", deflate: false, seconds: 5, warmup: 1, window: 0, senders: 1, rate: 15,
    refuse: "tampered", timeout: 60, settle: 3, prefill: 0, "server-cpu": -1,
  };
  for (let i = 1; i < argv.length; i++) {
    const key = argv[i].replace(/^--/, "");
    if (key === "deflate") { opts.deflate = true; continue; }
    if (key === "client-ids") { opts.clientIds = true; continue; }
    const value = argv[++i];
    opts[key] = typeof opts[key] === "number" ? Number(value) : value;
  }
  return opts;
}

const opts = parseArgs(process.argv.slice(2));
const base = new URL(opts.url);
const wsUrl = `ws://${base.host}/socket.io/?EIO=4&transport=websocket`;
const agent = new http.Agent({ keepAlive: true, maxSockets: 64 });

function now() { return performance.now(); }
function sleep(ms) { return new Promise((r) => setTimeout(r, ms)); }

// -- the server process, from /proc -------------------------------------------

const TICKS = 100; // USER_HZ on Linux
function serverCpuSeconds() {
  const [user, system] = serverCpuSplit();
  return user + system;
}
// The server's user and system CPU seconds (system: the kernel's side of its sockets).
function serverCpuSplit() {
  if (!opts.pid) return [0, 0];
  const stat = fs.readFileSync(`/proc/${opts.pid}/stat`, "utf8");
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  return [Number(fields[11]) / TICKS, Number(fields[12]) / TICKS];
}
// Time the hypervisor took from the server's core (steal, from /proc/stat): on a shared
// host it comes and goes, and a tenth with much of it is slower for reasons not chatd's.
function stolenSeconds() {
  const cpu = opts["server-cpu"];
  if (cpu < 0) return 0;
  const line = fs.readFileSync("/proc/stat", "utf8").split("\n").find((l) => l.startsWith(`cpu${cpu} `));
  return line ? Number(line.trim().split(/\s+/)[8]) / TICKS : 0;
}
// The load generator's own CPU (bench/presence.py shows how busy each core was).
function clientCpuSeconds() {
  const used = process.cpuUsage();
  return (used.user + used.system) / 1e6;
}
function serverRssBytes() {
  if (!opts.pid) return 0;
  const m = /VmRSS:\s+(\d+) kB/.exec(fs.readFileSync(`/proc/${opts.pid}/status`, "utf8"));
  return m ? Number(m[1]) * 1024 : 0;
}

// -- HTTP: a real GET / for a cookie -------------------------------------------

function getCookie() {
  return new Promise((resolve, reject) => {
    const req = http.get({ host: base.hostname, port: base.port, path: "/", agent }, (res) => {
      res.resume();
      res.on("end", () => {
        const pairs = (res.headers["set-cookie"] || []).map((c) => c.split(";")[0]);
        if (res.statusCode !== 200 || !pairs.length) reject(new Error(`GET / gave ${res.statusCode}, no cookie`));
        else resolve(pairs.join("; "));
      });
    });
    req.on("error", reject);
  });
}

// One character of the cookie's value changed: it no longer decrypts / verifies.
function tamper(cookie) {
  const eq = cookie.indexOf("=");
  const at = eq + 1 + Math.floor((cookie.length - eq - 1) / 2);
  const c = cookie[at];
  return cookie.slice(0, at) + (c === "A" ? "B" : "A") + cookie.slice(at + 1);
}

// -- one Socket.IO client over a raw websocket ----------------------------------

let skimErrors = 0; // frame headers `Client.skim` could not read: it lost its place

class Client {
  constructor(cookie) {
    this.cookie = cookie;
    this.onChat = null; // (text, receivedAt) for `new chat` frames
    this.acks = new Map(); // ack id -> callback
    this.nextAck = 0;
  }

  // Resolves with "connected" (CONNECT and welcome seen) or "refused" (CONNECT_ERROR).
  open() {
    return new Promise((resolve, reject) => {
      const headers = this.cookie ? { Cookie: this.cookie } : {};
      const ws = (this.ws = new WebSocket(wsUrl, {
        headers, perMessageDeflate: opts.deflate, skipUTF8Validation: true, agent: undefined,
      }));
      let connected = false, welcomed = false, done = false;
      const finish = (value, error) => {
        if (done) return;
        done = true;
        error ? reject(error) : resolve(value);
      };
      ws.on("message", (data) => {
        const t = now();
        // Look at the first bytes before decoding: most frames (presence, a snapshot
        // of thousands) are dropped unread.
        const c0 = data[0];
        if (c0 === 50 /* 2: ping */) { ws.send("3"); return; }
        if (c0 === 48 /* 0: open */) { ws.send("40"); return; }
        if (c0 !== 52 /* 4: message */) return;
        const type = data[1];
        if (type === 50 /* 2: event */) {
          const head = data.toString("latin1", 0, 13);
          if (head === '42["new chat"') { if (this.onChat) this.onChat(data.toString(), t); }
          else if (head.startsWith('42["welcome"')) { welcomed = true; if (connected) finish("connected"); }
          return;
        }
        const s = data.toString();
        if (type === 51 /* 3: ack */) {
          const bracket = s.indexOf("[");
          const id = Number(s.slice(2, bracket));
          const cb = this.acks.get(id);
          if (cb) { this.acks.delete(id); cb(s.slice(bracket), t); }
        } else if (type === 48 /* 0: connect */) {
          connected = true; if (welcomed) finish("connected");
        } else if (type === 52 /* 4: connect_error */) {
          if (s.indexOf("unauthorized") < 0) finish(null, new Error("connect_error without unauthorized: " + s));
          else finish("refused");
        }
      });
      ws.on("error", (e) => finish(null, e));
      ws.on("close", () => finish(null, new Error("closed before connecting")));
    });
  }

  sendChat(msg, onAck, clientId) {
    const id = this.nextAck++;
    this.acks.set(id, onAck);
    const payload = clientId === undefined ? { msg } : { msg, client_id: clientId };
    this.ws.send(`42${id}["send chat",${JSON.stringify(payload)}]`);
  }

  // From now on read this socket's frames without `ws`: skip each payload unread and
  // answer Engine.IO pings, nothing else. For the crowd of bench/presence.py, whose one
  // client core stands in for thousands of machines: read through `ws` (a stream per
  // socket, a Buffer per frame), each presence batch at 5,000 sockets kept that core
  // busy long enough for the handshake pipeline to run dry. Only when `ws` holds no part
  // of a frame; returns whether it switched.
  skim() {
    const ws = this.ws, socket = ws._socket, receiver = ws._receiver;
    if (!socket || receiver._bufferedBytes !== 0 || receiver._state !== 0 /* GET_INFO */) return false;
    socket.removeAllListeners("data");
    const head = [];        // the bytes of a frame header read so far
    let skip = 0;           // payload bytes left to pass over
    let ping = false;       // the payload is one byte: an Engine.IO ping if it is "2"
    socket.on("data", (chunk) => {
      let i = 0;
      while (i < chunk.length) {
        if (skip > 0) {
          if (ping && chunk[i] === 50 /* "2" */) ws.send("3");
          ping = false;
          const n = Math.min(skip, chunk.length - i);
          skip -= n; i += n;
          continue;
        }
        head.push(chunk[i++]);
        if (head.length < 2) continue;
        const len7 = head[1] & 0x7f, size = len7 === 126 ? 4 : len7 === 127 ? 10 : 2;
        if (head.length < size) continue;
        let length = len7;
        if (len7 === 126) length = head[2] * 256 + head[3];
        else if (len7 === 127) length = head.slice(2).reduce((a, b) => a * 256 + b, 0);
        const opcode = head[0] & 0x0f;
        // chatd's frames are whole (FIN) text, close, ping or pong frames: anything else
        // means this reader lost its place.
        if (!(head[0] & 0x80) || ![1, 8, 9, 10].includes(opcode)) skimErrors++;
        if (opcode === 9) ws.pong();
        ping = opcode === 1 && length === 1;
        skip = length;
        head.length = 0;
      }
    });
    socket.resume(); // in case `ws` had paused it for its own backpressure
    return true;
  }

  close() { try { this.ws.terminate(); } catch (e) { /* already gone */ } }
}

// -- helpers --------------------------------------------------------------------

async function withDeadline(promise, seconds, what) {
  let timer;
  const deadline = new Promise((_, reject) => {
    timer = setTimeout(() => reject(Object.assign(new Error("did not finish"), { what })), seconds * 1000);
  });
  try { return await Promise.race([promise, deadline]); } finally { clearTimeout(timer); }
}

// Open `count` clients, `concurrency` at a time; each with a fresh cookie from GET /
// ("fresh") or all with one cookie ("shared").
async function connectMany(count, concurrency, cookies) {
  const shared = cookies === "shared" ? await getCookie() : null;
  const clients = [];
  let next = 0;
  async function worker() {
    while (next < count) {
      next++;
      const c = new Client(shared || (await getCookie()));
      const result = await c.open();
      if (result !== "connected") throw new Error("refused: " + result);
      clients.push(c);
    }
  }
  await Promise.all(Array.from({ length: Math.min(concurrency, count) }, worker));
  return clients;
}

function percentile(sorted, p) {
  if (!sorted.length) return null;
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))];
}

function latencySummary(latencies) {
  const sorted = Float64Array.from(latencies).sort();
  return { p50_ms: percentile(sorted, 50), p99_ms: percentile(sorted, 99) };
}

// Messages carry "<seq> <sent at>" so recipients can count and time them cheaply.
function chatMessages(clients, onDelivered) {
  for (const c of clients) {
    c.onChat = (s, t) => {
      const at = s.indexOf('"msg":"') + 7;
      const text = s.slice(at, s.indexOf('"', at));
      const space = text.indexOf(" ");
      onDelivered(Number(text.slice(0, space)), t - Number(text.slice(space + 1)));
    };
  }
}

// -- scenarios ------------------------------------------------------------------

const scenarios = {
  // GET / + websocket + CONNECT + welcome, everyone staying connected.
  async connect() {
    if (opts.cookies === "shared") await getCookie(); // warm the page path as "fresh" does
    const t0 = now(), cpu0 = serverCpuSeconds();
    const clients = await withDeadline(connectMany(opts.sockets, opts.concurrency, opts.cookies), opts.timeout, "connect");
    const elapsed = (now() - t0) / 1000, cpu = serverCpuSeconds() - cpu0;
    clients.forEach((c) => c.close());
    return { handshakes_per_s: opts.sockets / elapsed, server_cpu_ms_each: (1000 * cpu) / opts.sockets };
  },

  // A websocket with no cookie or a tampered one: CONNECT_ERROR `unauthorized`, then close.
  async refuse() {
    const cookie = opts.refuse === "none" ? null : tamper(await getCookie());
    let done = 0, stop = false, failure = null;
    async function worker() {
      while (!stop) {
        const c = new Client(cookie);
        try {
          const result = await c.open();
          if (result !== "refused") throw new Error("not refused: " + result);
        } catch (e) {
          failure = failure || e;
          stop = true;
        } finally {
          c.close();
        }
        if (!stop) done++;
      }
    }
    const run = async () => {
      const workers = Array.from({ length: opts.concurrency }, worker);
      await sleep(opts.warmup * 1000);
      done = 0;
      const t0 = now(), cpu0 = serverCpuSeconds();
      await sleep(opts.seconds * 1000);
      const n = done, elapsed = (now() - t0) / 1000, cpu = serverCpuSeconds() - cpu0;
      stop = true;
      await Promise.all(workers);
      if (failure) throw failure;
      return { refusals_per_s: n / elapsed, server_cpu_ms_each: (1000 * cpu) / n };
    };
    return withDeadline(run(), opts.timeout + opts.seconds + opts.warmup, "refuse");
  },

  // Closed loop: `senders` clients keep `window` messages in flight in total; a message
  // is done when every socket got it. Deliveries per second, loss, latency.
  async fanout() {
    const clients = await withDeadline(connectMany(opts.sockets, opts.concurrency, opts.cookies), opts.timeout, "connect");
    const n = clients.length;
    const window = opts.window || Math.max(8, Math.ceil(8000 / n)); // enough to keep either server busy
    const senders = clients.slice(0, Math.max(1, opts.senders));
    const pending = new Map(); // seq -> deliveries still expected
    let seq = 0, measuring = false, stop = false;
    let delivered = 0, deliveredTotal = 0, expectedTotal = 0;
    const latencies = [];
    let release = null;
    chatMessages(clients, (id, latency) => {
      deliveredTotal++;
      const left = pending.get(id);
      if (left === undefined) return;
      if (id >= 0 && measuring) { delivered++; latencies.push(latency); }
      if (left <= 1) { pending.delete(id); if (release) release(); } else pending.set(id, left - 1);
    });
    function sendOne(i) {
      const id = seq++;
      pending.set(id, n);
      expectedTotal += n;
      senders[i % senders.length].sendChat(`${id} ${now()}`, (ack) => {
        if (ack.indexOf('"ok":true') < 0) throw new Error("send chat failed: " + ack);
      });
    }
    const run = async () => {
      let i = 0;
      while (!stop) {
        while (pending.size < window && !stop) sendOne(i++);
        await new Promise((r) => (release = r));
      }
    };
    const loop = run();
    await sleep(opts.warmup * 1000);
    const t0 = now(), cpu0 = serverCpuSeconds(), own0 = process.cpuUsage();
    measuring = true;
    await sleep(opts.seconds * 1000);
    measuring = false;
    const elapsed = (now() - t0) / 1000, cpu = serverCpuSeconds() - cpu0, own = process.cpuUsage(own0);
    stop = true;
    if (release) release();
    await loop;
    // Drain: what is still in flight must arrive too, or it is lost.
    const drainUntil = now() + 10000;
    while (pending.size && now() < drainUntil) await sleep(50);
    const lost = expectedTotal - deliveredTotal;
    clients.forEach((c) => c.close());
    return {
      deliveries_per_s: delivered / elapsed, loss: lost, ...latencySummary(latencies),
      server_cpu_percent: (100 * cpu) / elapsed, window,
      // This process's own share of its core while measuring: well below 100 or it is the limit.
      loadgen_window_cpu_percent: (own.user + own.system) / 1e4 / elapsed,
    };
  },

  // Open loop: `rate` messages per second in total, from `senders` clients in turn.
  async rate() {
    const clients = await withDeadline(connectMany(opts.sockets, opts.concurrency, opts.cookies), opts.timeout, "connect");
    const n = clients.length;
    const senders = clients.slice(0, Math.max(1, opts.senders));
    let seq = 0, delivered = 0;
    const latencies = [];
    // The first `warmup` seconds' messages are sent and must arrive, but are not timed:
    // the figure is the steady state, not the first messages after 1,000 handshakes.
    const warmupCount = Math.round(opts.rate * opts.warmup);
    chatMessages(clients, (id, latency) => { delivered++; if (id >= warmupCount) latencies.push(latency); });
    const total = warmupCount + Math.round(opts.rate * opts.seconds);
    let t0 = now(), cpu0 = serverCpuSeconds();
    const start = t0;
    for (let k = 0; k < total; k++) {
      if (k === warmupCount) { t0 = now(); cpu0 = serverCpuSeconds(); }
      const due = start + (k * 1000) / opts.rate;
      const wait = due - now();
      if (wait > 0) await sleep(wait);
      senders[k % senders.length].sendChat(`${seq++} ${now()}`, () => {});
    }
    const elapsed = (now() - t0) / 1000, cpu = serverCpuSeconds() - cpu0;
    const drainUntil = now() + 10000;
    while (delivered < total * n && now() < drainUntil) await sleep(50);
    clients.forEach((c) => c.close());
    return { ...latencySummary(latencies), loss: total * n - delivered, server_cpu_percent: (100 * cpu) / elapsed };
  },

  // One room filling up (bench/presence.py): new guests, each GET / + websocket + CONNECT
  // + welcome, `concurrency` at a time, all staying. Handshakes per second and the
  // server's CPU per handshake for every tenth of `sockets`; then half the room dropped
  // at once (no close frame) and the server's CPU for that. First, `prefill` guests
  // come and go in waves of 200 (the room never holds more than that): the first tenth
  // is then timed on a warm server and a warm client, as every later one is.
  //
  // Every tenth is timed with `concurrency` handshakes in flight all along. The clock
  // starts once the first `concurrency` have finished (before that the pipeline is
  // filling: the server has begun every handshake in flight and finished none, so a
  // tenth timed from the first launch carries about half of `concurrency` handshakes
  // of extra work), and `concurrency` more guests than the last mark are started (else
  // the last tenth ends with the pipeline draining, the server waiting on the last
  // round trips: 50-56 % busy in it with 200 in flight). So each tenth is `sockets` / 10
  // handshakes, start to finish, in a steady state, and the room holds `concurrency`
  // more sockets than its label at each mark (`from` and `to` say how many).
  async fill() {
    for (let done = 0; done < opts.prefill; done += 200) {
      const wave = await withDeadline(connectMany(Math.min(200, opts.prefill - done), opts.concurrency, "fresh"),
                                      opts.timeout, "prefill");
      wave.forEach((c) => c.close());
      await sleep(200);
    }
    if (opts.prefill) await sleep(3000); // the leaves go out; the room is empty again
    const tenth = Math.floor(opts.sockets / 10);
    const offset = opts.concurrency, launches = opts.sockets + 2 * opts.concurrency;
    const marks = [];
    const clients = [];
    let next = 0, skimmed = 0;
    async function worker() {
      while (next < launches) {
        next++;
        const c = new Client(await getCookie());
        if ((await c.open()) !== "connected") throw new Error("refused");
        if (c.skim()) skimmed++;
        clients.push(c);
        const n = clients.length - offset;
        if (n >= 0 && n % tenth === 0 && n <= opts.sockets) marks.push([now(), ...serverCpuSplit(), clientCpuSeconds(), stolenSeconds()]);
      }
    }
    await withDeadline(Promise.all(Array.from({ length: opts.concurrency }, worker)), opts.timeout, "fill");
    const tenths = [];
    for (let i = 1; i < marks.length; i++) {
      const [t0, u0, s0, k0, x0] = marks[i - 1], [t1, u1, s1, k1, x1] = marks[i];
      const c0 = u0 + s0, c1 = u1 + s1;
      tenths.push({ from: offset + (i - 1) * tenth, to: offset + i * tenth, handshakes_per_s: tenth / ((t1 - t0) / 1000),
                    server_cpu_ms_each: (1000 * (c1 - c0)) / tenth, server_system_ms_each: (1000 * (s1 - s0)) / tenth,
                    server_busy: (c1 - c0) / ((t1 - t0) / 1000), client_busy: (k1 - k0) / ((t1 - t0) / 1000),
                    server_core_stolen: (x1 - x0) / ((t1 - t0) / 1000) });
    }
    await sleep(2000); // the last presence batches go out
    const half = Math.floor(clients.length / 2);
    const cpu0 = serverCpuSeconds();
    for (const c of clients.slice(0, half)) c.ws._socket.destroy(); // gone at once, as when a network goes
    await sleep(3000);
    const dropCpu = serverCpuSeconds() - cpu0;
    clients.forEach((c) => c.close());
    return { tenths, dropped: half, drop_server_cpu_s: dropCpu, skimmed, skim_errors: skimErrors };
  },

  // `sockets` guests connected and skimmed (as in `fill`), held until stdin closes: the
  // room of bench/fanout.py, which writes to them from inside the server. Prints a
  // {"ready": n} line once all are in.
  async hold() {
    const clients = await withDeadline(connectMany(opts.sockets, opts.concurrency, "fresh"), opts.timeout, "connect");
    let skimmed = 0;
    for (const c of clients) if (c.skim()) skimmed++;
    process.stdout.write(JSON.stringify({ ready: clients.length, skimmed }) + "\n");
    await new Promise((resolve) => { process.stdin.on("end", resolve); process.stdin.resume(); });
    clients.forEach((c) => c.close());
    return { held: clients.length, skimmed, skim_errors: skimErrors };
  },

  // Resident memory added per connected, idle socket.
  async memory() {
    const warm = await connectMany(20, 10, opts.cookies); // first-use costs out of the way
    warm.forEach((c) => c.close());
    await sleep(opts.settle * 1000);
    const before = serverRssBytes();
    const clients = await withDeadline(connectMany(opts.sockets, opts.concurrency, opts.cookies), opts.timeout, "connect");
    await sleep(opts.settle * 1000);
    const after = serverRssBytes();
    clients.forEach((c) => c.close());
    return { bytes_per_socket: (after - before) / clients.length, rss_before: before, rss_after: after };
  },

  // Stored messages per second: `sockets` clients, each with one message in flight.
  async durable() {
    const clients = await withDeadline(connectMany(opts.sockets, opts.concurrency, opts.cookies), opts.timeout, "connect");
    let acked = 0, measuring = false, stop = false;
    let seq = 0;
    const loops = clients.map(async (c) => {
      while (!stop) {
        const n = seq++;  // --client-ids: every send carries its own, as the page's outbox does
        await new Promise((resolve) => c.sendChat(`${n} ${now()}`, (ack) => {
          if (ack.indexOf('"ok":true') < 0) throw new Error("send chat failed: " + ack);
          if (measuring) acked++;
          resolve();
        }, opts.clientIds ? `bench-${n}` : undefined));
      }
    });
    await sleep(opts.warmup * 1000);
    measuring = true;
    const t0 = now();
    await sleep(opts.seconds * 1000);
    measuring = false;
    const elapsed = (now() - t0) / 1000;
    stop = true;
    await withDeadline(Promise.all(loops), 10, "drain");
    clients.forEach((c) => c.close());
    return { stored_per_s: acked / elapsed };
  },
};

process.on("unhandledRejection", (e) => {
  process.stdout.write(JSON.stringify({ error: String((e && e.message) || e) }) + "\n");
  process.exit(0);
});

async function main() {
  const scenario = scenarios[opts.scenario];
  if (!scenario) throw new Error(`unknown scenario ${opts.scenario}; one of ${Object.keys(scenarios)}`);
  let result;
  const cpu0 = process.cpuUsage(), t0 = now();
  try {
    result = await scenario();
    const used = process.cpuUsage(cpu0);
    result.loadgen_cpu_percent = (100 * (used.user + used.system)) / 1000 / (now() - t0);
  } catch (e) {
    result = { error: e.message === "did not finish" ? "did not finish" : String(e.message || e), phase: e.what };
  }
  process.stdout.write(JSON.stringify(result) + "\n");
  process.exit(0);
}

main();
