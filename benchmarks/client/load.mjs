// Load agent for benchmarks/run.py: raw TCP WebSocket client + raw RESP
// publisher, no dependencies, as little work per received frame as possible
// (so the client is never the bottleneck: it parses frame headers and looks
// for the publish timestamp, nothing else).
//
// It reads one JSON command per line on stdin and answers one JSON line on
// stdout, so the orchestrator can sample the server's CPU and memory exactly
// around each step.  Every answer carries the client's own CPU time for the
// step (cpu_ms) and its wall time (wall_ms): cpu_ms / wall_ms is the client's
// load on its core.
//
// Commands:
//   {"cmd":"open","n":1000,"channels":10,"conc":200}   open n sockets, each subscribes exec-(i % channels)
//   {"cmd":"burst","events":1000,"channels":10,"pad":200,"rate":0}   publish, wait for every delivery
//   {"cmd":"ignore","events":100000,"pad":200}          events for users nobody subscribed to, then a sentinel
//   {"cmd":"drop","spread":1000}                        RST every socket, reconnect + resubscribe within spread ms
//   {"cmd":"closeall"}                                   RST every socket
//   {"cmd":"quit"}
import net from 'node:net';
import readline from 'node:readline';

const args = Object.fromEntries(process.argv.slice(2).reduce((a, v, i, arr) =>
  (v.startsWith('--') ? a.concat([[v.slice(2), arr[i + 1]]]) : a), []));
const HOST = '127.0.0.1';
const PORT = +args.port;
const REDIS = +args.redis;
const USER = args.user ?? '3e53486c-cf57-477e-ba2a-cb02dc828e1a';
const PATH = args.path ?? '/ws';
const RETRY_MS = 1000; // the AutoGPT frontend reconnects 1 s after a failure
// publish-to-delivery latency is timed on `channels` sockets in every
// SAMPLE_EVERY (10% with 10 channels: every channel, spread over the whole
// pool); the others only count frames, so the client spends little per frame
const SAMPLE_EVERY = +(args.sample ?? 100);
const OPEN_TIMEOUT_MS = +(args["open-timeout"] ?? 10000);

const now = () => performance.now();
const T_MARK = Buffer.from('"t":');
const OK_MARK = Buffer.from('"success":true');
const KEY = 'dGhlIHNhbXBsZSBub25jZQ==';
const REQUEST = Buffer.from(`GET ${PATH}?token=bench HTTP/1.1\r\nHost: ${HOST}:${PORT}\r\nUpgrade: websocket\r\n` +
  `Connection: Upgrade\r\nSec-WebSocket-Key: ${KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n`);

// a masked client text frame; mask key 0 leaves the payload as is
function clientFrame(opcode, payload) {
  const body = Buffer.isBuffer(payload) ? payload : Buffer.from(payload);
  const n = body.length;
  let head;
  if (n < 126) head = Buffer.from([0x80 | opcode, 0x80 | n, 0, 0, 0, 0]);
  else { head = Buffer.alloc(8); head[0] = 0x80 | opcode; head[1] = 0x80 | 126; head.writeUInt16BE(n, 2); }
  return Buffer.concat([head, body]);
}
const subscribeFrame = (ch) => clientFrame(1, JSON.stringify(
  { method: 'subscribe_graph_execution', data: { graph_exec_id: `exec-${ch}` } }));

// -- delivery accounting -------------------------------------------------------
let received = 0, otherFrames = 0, serverCloses = 0;
let lat = new Float64Array(1 << 20), latN = 0;
let onProgress = null; // called after each chunk while a step waits
function recordLatency(v) {
  if (latN === lat.length) { const bigger = new Float64Array(lat.length * 2); bigger.set(lat); lat = bigger; }
  lat[latN++] = v;
}

// -- sockets -------------------------------------------------------------------
const pool = new Set();

class Conn {
  constructor(ch, sample) { this.ch = ch; this.sample = sample; this.sock = null; this.rest = null; this.upgraded = false; this.acked = false;
    this.onAck = null; this.onFail = null; }

  open() {
    return new Promise((resolve) => {
      this.acked = false; this.upgraded = false; this.rest = null;
      // no subscribe ack within OPEN_TIMEOUT_MS: give up on this attempt
      const timer = setTimeout(() => { if (this.sock === sock && !this.acked) { this.fail(); this.reset(); } }, OPEN_TIMEOUT_MS);
      this.onAck = () => { clearTimeout(timer); resolve(true); };
      this.onFail = () => { clearTimeout(timer); resolve(false); };
      const sock = net.connect({ host: HOST, port: PORT, noDelay: true });
      this.sock = sock;
      sock.on('connect', () => sock.write(REQUEST));
      sock.on('data', (chunk) => this.data(chunk));
      sock.on('error', () => {});
      sock.on('close', () => { if (this.sock === sock) { this.sock = null; if (!this.acked) this.fail(); } });
    });
  }

  fail() { const f = this.onFail; this.onFail = this.onAck = null; if (f) f(); }

  data(chunk) {
    let buf = this.rest ? Buffer.concat([this.rest, chunk]) : chunk;
    this.rest = null;
    let off = 0;
    if (!this.upgraded) {
      const end = buf.indexOf('\r\n\r\n');
      if (end < 0) { this.rest = buf; return; }
      if (buf.toString('latin1', 9, 12) !== '101') { this.sock.destroy(); return; }
      this.upgraded = true;
      this.sock.write(subscribeFrame(this.ch));
      off = end + 4;
    }
    const len = buf.length;
    while (len - off >= 2) {
      const b0 = buf[off], b1 = buf[off + 1];
      let n = b1 & 0x7f, hdr = 2;
      if (n === 126) { if (len - off < 4) break; n = buf.readUInt16BE(off + 2); hdr = 4; }
      else if (n === 127) { if (len - off < 10) break; n = Number(buf.readBigUInt64BE(off + 2)); hdr = 10; }
      if (b1 & 0x80) hdr += 4;
      const start = off + hdr, end = start + n;
      if (end > len) break;
      const op = b0 & 0x0f;
      if (op === 1) {
        if (this.acked) {
          // subscribed: every text frame from here on is a pushed event (the
          // scenarios publish node events only, so no catch-up frame comes)
          received++;
          if (this.sample) {
            const t = buf.indexOf(T_MARK, start);
            if (t >= 0 && t < end) recordLatency(now() - parseFloat(buf.toString('latin1', t + 4, Math.min(end, t + 30))));
          }
        } else {
          const ok = buf.indexOf(OK_MARK, start);
          if (ok >= 0 && ok < end && !this.acked) {
            this.acked = true;
            const a = this.onAck; this.onAck = this.onFail = null; if (a) a();
          } else otherFrames++;
        }
      } else if (op === 9) {
        this.sock.write(clientFrame(10, buf.subarray(start, end)));
      } else if (op === 8) {
        serverCloses++;
        this.sock.end();
      }
      off = end;
    }
    if (off < len) this.rest = buf.subarray(off);
    if (onProgress) onProgress();
  }

  reset() {
    const sock = this.sock;
    this.sock = null; this.acked = false; this.onAck = this.onFail = null;
    if (sock) sock.resetAndDestroy();
  }
}

// open with retries (1 s later, as the frontend does); resolves true once subscribed
async function openWithRetry(conn, stats, attempts = 5) {
  for (let attempt = 0; attempt < attempts; attempt++) {
    if (await conn.open()) return true;
    if (attempt === attempts - 1) break;
    stats.retries++;
    await new Promise((r) => setTimeout(r, RETRY_MS));
  }
  stats.failed++;
  return false;
}

async function openMany(n, channels, conc, attempts) {
  const stats = { retries: 0, failed: 0, acked: 0 };
  let next = 0;
  const worker = async () => {
    while (next < n) {
      const i = next++;
      const conn = new Conn(i % channels, i % SAMPLE_EVERY < channels);
      pool.add(conn);
      if (await openWithRetry(conn, stats, attempts)) stats.acked++;
    }
  };
  await Promise.all(Array.from({ length: Math.min(conc, n) }, worker));
  return stats;
}

// -- redis publisher (raw RESP, pipelined) -------------------------------------
let redis = null, pendingReplies = 0, replyWaiters = [];
function redisConnect() {
  return new Promise((resolve, reject) => {
    redis = net.connect({ host: HOST, port: REDIS, noDelay: true }, () => resolve());
    redis.on('error', reject);
    redis.on('data', (chunk) => {
      let lines = 0;
      for (let i = chunk.indexOf(10); i >= 0; i = chunk.indexOf(10, i + 1)) lines++;
      pendingReplies -= lines;
      if (pendingReplies <= 0 && replyWaiters.length) { const w = replyWaiters; replyWaiters = []; w.forEach((f) => f()); }
    });
  });
}
function publish(channel, payload) {
  const c = Buffer.byteLength(channel), p = Buffer.byteLength(payload);
  pendingReplies++;
  return redis.write(`*3\r\n$7\r\nPUBLISH\r\n$${c}\r\n${channel}\r\n$${p}\r\n${payload}\r\n`);
}
const redisDrained = () => (pendingReplies <= 0 ? Promise.resolve() : new Promise((r) => replyWaiters.push(r)));

function nodeEvent(user, exec, j, t, filler) {
  return JSON.stringify({ payload: { event_type: 'node_execution_update', user_id: user, graph_id: 'g1', graph_version: 1,
    graph_exec_id: exec, node_exec_id: `ne-${j}`, node_id: 'n1', block_id: 'b1', status: 'RUNNING',
    input_data: { t, pad: filler }, output_data: {}, add_time: '2026-11-23T00:00:00Z' } });
}

function subscribersPerChannel() {
  const count = new Map();
  for (const c of pool) if (c.acked) count.set(c.ch, (count.get(c.ch) ?? 0) + 1);
  return count;
}

function waitFor(pred, timeoutMs) {
  return new Promise((resolve) => {
    const deadline = now() + timeoutMs;
    const check = () => {
      if (pred()) { onProgress = null; clearInterval(timer); resolve(true); return true; }
      if (now() > deadline) { onProgress = null; clearInterval(timer); resolve(false); return true; }
      return false;
    };
    const timer = setInterval(check, 50);
    onProgress = () => { if (pred()) check(); };
    check();
  });
}

function quantiles() {
  const a = lat.subarray(0, latN).sort();
  const q = (p) => (a.length ? +a[Math.min(a.length - 1, Math.floor(p * a.length))].toFixed(2) : null);
  return { p50_ms: q(0.5), p99_ms: q(0.99), max_ms: a.length ? +a[a.length - 1].toFixed(2) : null };
}

const yieldNow = () => new Promise((r) => setImmediate(r));

// burst (rate 0) or steady rate (events/s)
async function burst({ events, channels, pad = 200, rate = 0, timeout = 120 }) {
  const subs = subscribersPerChannel();
  let expected = 0;
  for (let j = 0; j < events; j++) expected += subs.get(j % channels) ?? 0;
  received = 0; latN = 0;
  const filler = 'x'.repeat(pad);
  const t0 = now();
  let j = 0;
  if (rate > 0) {
    while (j < events) {
      const due = Math.min(events, Math.floor((now() - t0) * rate / 1000) + 1);
      for (; j < due; j++) publish(`execution_event/${USER}/g1/exec-${j % channels}`, nodeEvent(USER, `exec-${j % channels}`, j, now(), filler));
      await new Promise((r) => setTimeout(r, 1));
    }
  } else {
    for (; j < events; j++) {
      publish(`execution_event/${USER}/g1/exec-${j % channels}`, nodeEvent(USER, `exec-${j % channels}`, j, now(), filler));
      if (j % 200 === 199) await yieldNow();
    }
  }
  const tPub = now();
  const done = await waitFor(() => received >= expected, timeout * 1000);
  const tEnd = now();
  return { expected, received, complete: done, publish_s: +((tPub - t0) / 1000).toFixed(3),
    deliver_s: +((tEnd - t0) / 1000).toFixed(3), msgs_per_s: Math.round(received / ((tEnd - t0) / 1000)),
    ...quantiles() };
}

// events nobody here subscribed to, then one sentinel on a subscribed channel:
// the server handles its bus stream in order, so the sentinel's arrival means
// every ignored event before it has been handled
async function ignore({ events, pad = 200, timeout = 300 }) {
  const subs = subscribersPerChannel();
  const ch = [...subs.keys()][0];
  if (ch === undefined) throw new Error('ignore needs one subscribed socket');
  const filler = 'x'.repeat(pad);
  // every command is built before the clock starts, then written as fast as
  // Redis takes it: the server sees the stream at Redis's pace, not at the
  // pace this client can build JSON (which would leave it idle between
  // small reads and charge it the reactor's per-wakeup cost)
  const parts = [];
  for (let j = 0; j < events; j++) {
    const u = `user-${j % 997}`;
    const channel = `execution_event/${u}/g1/exec-${j}`, payload = nodeEvent(u, `exec-${j}`, j, 0, filler);
    parts.push(`*3\r\n$7\r\nPUBLISH\r\n$${Buffer.byteLength(channel)}\r\n${channel}\r\n$${Buffer.byteLength(payload)}\r\n${payload}\r\n`);
  }
  const chunks = [];
  for (let i = 0; i < parts.length; i += 2000) chunks.push(Buffer.from(parts.slice(i, i + 2000).join('')));
  received = 0; latN = 0;
  const t0 = now();
  for (const chunk of chunks) {
    pendingReplies += 2000;
    if (!redis.write(chunk)) await new Promise((r) => redis.once('drain', r));
  }
  pendingReplies -= chunks.length * 2000 - events;
  publish(`execution_event/${USER}/g1/exec-${ch}`, nodeEvent(USER, `exec-${ch}`, -1, now(), filler));
  const tPub = now();
  const done = await waitFor(() => received >= 1, timeout * 1000);
  await redisDrained();
  return { events, complete: done, publish_s: +((tPub - t0) / 1000).toFixed(3), handled_s: +((now() - t0) / 1000).toFixed(3) };
}

// RST every socket, then reconnect each at a random moment within `spread` ms
async function drop({ spread = 1000, timeout = 60 }) {
  const conns = [...pool];
  const stats = { retries: 0, failed: 0, acked: 0 };
  const t0 = now();
  for (const c of conns) c.reset();
  let last = 0;
  await Promise.all(conns.map((c) => new Promise((resolve) => {
    setTimeout(async () => {
      if (await openWithRetry(c, stats)) { stats.acked++; last = Math.max(last, now()); }
      resolve();
    }, Math.random() * spread);
  })));
  return { sockets: conns.length, ...stats, all_back_s: +((last - t0) / 1000).toFixed(3) };
}

function closeAll() {
  const n = pool.size;
  for (const c of pool) c.reset();
  pool.clear();
  return { closed: n };
}

// -- command loop ----------------------------------------------------------------
async function handle(cmd) {
  switch (cmd.cmd) {
    case 'open': {
      const t = now();
      const s = await openMany(cmd.n, cmd.channels ?? 10, cmd.conc ?? 200, cmd.attempts ?? 5);
      return { ...s, secs: +((now() - t) / 1000).toFixed(3), pool: pool.size };
    }
    case 'burst': return burst(cmd);
    case 'ignore': return ignore(cmd);
    case 'drop': return drop(cmd);
    case 'closeall': return closeAll();
    case 'ping': return { pool: pool.size, acked: [...pool].filter((c) => c.acked).length, server_closes: serverCloses, other_frames: otherFrames };
    case 'quit': closeAll(); process.stdout.write(JSON.stringify({ ok: true }) + '\n'); process.exit(0);
    default: throw new Error(`unknown command ${cmd.cmd}`);
  }
}

await redisConnect();
const rl = readline.createInterface({ input: process.stdin });
process.stdout.write(JSON.stringify({ ready: true }) + '\n');
for await (const line of rl) {
  if (!line.trim()) continue;
  const cmd = JSON.parse(line);
  const c0 = process.cpuUsage(), w0 = now();
  let out;
  try { out = await handle(cmd); } catch (e) { out = { error: String(e) }; }
  const c = process.cpuUsage(c0);
  out.cpu_ms = Math.round((c.user + c.system) / 1000);
  out.wall_ms = Math.round(now() - w0);
  process.stdout.write(JSON.stringify(out) + '\n');
}
