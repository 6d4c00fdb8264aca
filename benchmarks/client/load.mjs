// Load agent for benchmarks/run.py and benchmarks/curve.py: raw TCP
// WebSocket client + raw RESP publisher, no dependencies, as little work per
// received frame as possible (so the client is never the bottleneck: it
// parses frame headers and looks for the publish timestamp, nothing else;
// compressed frames are inflated, because a browser has to).
//
// It reads one JSON command per line on stdin and answers one JSON line on
// stdout, so the orchestrator can sample the server's CPU and memory exactly
// around each step.  Every answer carries the client's own CPU time for the
// step (cpu_ms) and its wall time (wall_ms): cpu_ms / wall_ms is the client's
// load on its core.
//
// Options: --port P (the server), --redis P (classic bus: PUBLISH there) or
// --cluster P1,P2,.. (sharded bus: SPUBLISH to the owner of each channel's
// slot), --sources K (bind the sockets to 127.0.0.1 .. 127.0.0.K in turn:
// each source address has its own ~28k ephemeral ports), --sample PCT.
//
// Commands:
//   {"cmd":"open","n":1000,"channels":10,"conc":200,"deflate":false,"prefix":"exec-"}
//       open n sockets, each subscribes to <prefix><i % channels>; with
//       deflate, the upgrade offers permessage-deflate exactly as Chromium
//       does, and every compressed frame is inflated
//   {"cmd":"burst","events":1000,"channels":10,"rate":0,"event":"pad","size":200,"group":1,"verify":false}
//       publish (rate 0: at once; else events/s), wait for every delivery;
//       event j goes to execution floor(j / group) % channels.
//       event "pad": today's small node event (a `size`-byte pad);
//       "autogpt": an AutoGPT-like node event with `size` bytes of text;
//       "graph": a graph event of the run (RUNNING, COMPLETED in turn).
//       verify: every delivery is parsed as JSON and compared with what was
//       published (slow: for checks, never for timing)
//   {"cmd":"ignore","events":100000,"pad":200}          events for users nobody subscribed to, then a sentinel
//   {"cmd":"drop","spread":1000}                        RST every socket, reconnect + resubscribe within spread ms
//   {"cmd":"closeall"}                                   RST every socket
//   {"cmd":"ping"}                                       counters
//   {"cmd":"quit"}
import net from 'node:net';
import { monitorEventLoopDelay, PerformanceObserver } from 'node:perf_hooks';
import readline from 'node:readline';
import zlib from 'node:zlib';

const args = Object.fromEntries(process.argv.slice(2).reduce((a, v, i, arr) =>
  (v.startsWith('--') ? a.concat([[v.slice(2), arr[i + 1]]]) : a), []));
const HOST = '127.0.0.1';
const PORT = +args.port;
const REDIS = args.redis ? +args.redis : 0;
const CLUSTER = args.cluster ? args.cluster.split(',').map(Number) : [];
const USER = args.user ?? '3e53486c-cf57-477e-ba2a-cb02dc828e1a';
const PATH = args.path ?? '/ws';
const SOURCES = Array.from({ length: +(args.sources ?? 1) }, (_, i) => `127.0.0.${i + 1}`);
const RETRY_MS = 1000; // the AutoGPT frontend reconnects 1 s after a failure
// publish-to-delivery latency is timed on SAMPLE_PCT% of the sockets of
// every channel (socket i is on channel i % channels; it samples when
// floor(i / channels) % (100 / SAMPLE_PCT) == 0); the others only count frames
const SAMPLE_EVERY = Math.round(100 / +(args.sample ?? 10));
const OPEN_TIMEOUT_MS = +(args['open-timeout'] ?? 10000);
// --inflate-cache 1: where the server keeps no compression context, a frame
// byte for byte equal to one of the last few inflates to the same payload,
// so it is not inflated again.  Exact, but not what a browser does: off by
// default, for checking whether inflating is what limits a burst.
const INFLATE_CACHE = args['inflate-cache'] === '1';

const now = () => performance.now();
const T_MARK = Buffer.from('"t":');
const OK_MARK = Buffer.from('"success":true');
const KEY = 'dGhlIHNhbXBsZSBub25jZQ==';
// Chromium's offer, byte for byte (every Chrome/Edge/Opera upgrade carries it)
const CHROMIUM_OFFER = 'permessage-deflate; client_max_window_bits';
const request = (deflate) => Buffer.from(`GET ${PATH}?token=bench HTTP/1.1\r\nHost: ${HOST}:${PORT}\r\nUpgrade: websocket\r\n` +
  `Connection: Upgrade\r\nSec-WebSocket-Key: ${KEY}\r\nSec-WebSocket-Version: 13\r\n` +
  (deflate ? `Sec-WebSocket-Extensions: ${CHROMIUM_OFFER}\r\n` : '') + '\r\n');
const REQUEST = request(false), REQUEST_DEFLATE = request(true);

// a masked client frame; mask key 0 leaves the payload as is
function clientFrame(opcode, payload, rsv1 = false) {
  const body = Buffer.isBuffer(payload) ? payload : Buffer.from(payload);
  const n = body.length, b0 = 0x80 | (rsv1 ? 0x40 : 0) | opcode;
  let head;
  if (n < 126) head = Buffer.from([b0, 0x80 | n, 0, 0, 0, 0]);
  else { head = Buffer.alloc(8); head[0] = b0; head[1] = 0x80 | 126; head.writeUInt16BE(n, 2); }
  return Buffer.concat([head, body]);
}
const EMPTY_PONG = clientFrame(10, Buffer.alloc(0));
const subscribeMessage = (execId) => JSON.stringify({ method: 'subscribe_graph_execution', data: { graph_exec_id: execId } });

// -- permessage-deflate (RFC 7692) ---------------------------------------------
// Node has no public synchronous API for a zlib stream that lives across
// messages (inflateRawSync starts afresh; the stream API is asynchronous, on
// the thread pool).  The engine's own handle does it synchronously: this is
// what zlib.inflateRawSync runs, minus the close at the end.  Output goes to
// one scratch buffer, read before the next frame is inflated.
const { Z_SYNC_FLUSH } = zlib.constants;
const TAIL = Buffer.from([0x00, 0x00, 0xff, 0xff]);
let scratch = Buffer.allocUnsafe(1 << 20);

function newInflater(windowBits) {
  const z = zlib.createInflateRaw({ windowBits, chunkSize: 64 }); // its own output buffer goes unused
  z.on('error', () => {}); // a bad stream destroys the engine: seen as z.destroyed
  return z;
}

// the payload inflated (a view of `scratch`), or null when it does not inflate
function inflate(z, data) {
  if (z.destroyed) return null;
  const input = Buffer.concat([data, TAIL]);
  const handle = z._handle, state = z._writeState;
  let inOff = 0, inLeft = input.length, outOff = 0;
  for (;;) {
    handle.writeSync(Z_SYNC_FLUSH, input, inOff, inLeft, scratch, outOff, scratch.length - outOff);
    if (z.destroyed) return null;
    const outLeft = state[0], inAfter = state[1];
    outOff = scratch.length - outLeft; inOff += inLeft - inAfter; inLeft = inAfter;
    if (outLeft !== 0) return scratch.subarray(0, outOff);
    const bigger = Buffer.allocUnsafe(scratch.length * 2);
    scratch.copy(bigger, 0, 0, outOff);
    scratch = bigger;
  }
}

// what the server agreed, from its Sec-WebSocket-Extensions answer
function parseAgreed(head) {
  const line = head.split('\r\n').find((l) => l.toLowerCase().startsWith('sec-websocket-extensions:'));
  if (!line) return null;
  const value = line.slice(line.indexOf(':') + 1).trim();
  const [name, ...params] = value.split(';').map((s) => s.trim());
  if (name !== 'permessage-deflate') return { value, unknown: true };
  const agreed = { value, serverNoContext: false, clientNoContext: false, serverBits: 15, clientBits: 15 };
  for (const p of params) {
    const [k, v] = p.split('=').map((s) => s.trim());
    if (k === 'server_no_context_takeover') agreed.serverNoContext = true;
    else if (k === 'client_no_context_takeover') agreed.clientNoContext = true;
    else if (k === 'server_max_window_bits') agreed.serverBits = +v || 15;
    else if (k === 'client_max_window_bits') agreed.clientBits = +v || 15;
  }
  // zlib takes 9..15 (a window of 8 bits is read with 9: a bigger window
  // inflates whatever a smaller one compressed)
  agreed.serverBits = Math.min(15, Math.max(9, agreed.serverBits));
  agreed.clientBits = Math.min(15, Math.max(9, agreed.clientBits));
  return agreed;
}

// one inflater shared by every socket whose server keeps no context (reset
// before each message), per window size
const sharedInflaters = new Map();
function sharedInflater(bits) {
  let z = sharedInflaters.get(bits);
  if (!z || z.destroyed) { z = newInflater(bits); sharedInflaters.set(bits, z); }
  z.reset();
  return z;
}

// --inflate-cache: the last 32 frames inflated without context, and what they gave
const cache = [];
function cachedInflate(bits, data) {
  for (const entry of cache) if (entry.bits === bits && entry.data.equals(data)) return entry.payload;
  const payload = inflate(sharedInflater(bits), data);
  if (payload === null) return null;
  cache.unshift({ bits, data: Buffer.from(data), payload: Buffer.from(payload) });
  if (cache.length > 32) cache.pop();
  return cache[0].payload;
}

// a client message compressed as RFC 7692 says (sync flush, tail removed).
// Each is compressed on its own: valid with or without client context
// takeover, and a client sends only a subscribe per socket here.
function deflateMessage(text, bits) {
  const out = zlib.deflateRawSync(Buffer.from(text), { windowBits: bits, finishFlush: Z_SYNC_FLUSH });
  return out.subarray(0, out.length - 4);
}

// -- delivery accounting -------------------------------------------------------
let received = 0, otherFrames = 0, serverCloses = 0, inflateErrors = 0, wireBytes = 0, payloadBytes = 0;
let lat = new Float64Array(1 << 20), latN = 0;
let onProgress = null; // called after each chunk while a step waits
const extensions = new Map(); // the server's Sec-WebSocket-Extensions answers, counted
let verifying = null; // node_exec_id -> canonical JSON of the published event, while a burst verifies
const verify = { checked: 0, mismatched: 0, first: null };
function recordLatency(v) {
  if (latN === lat.length) { const bigger = new Float64Array(lat.length * 2); bigger.set(lat); lat = bigger; }
  lat[latN++] = v;
}
const FIVE_KEYS = 'method,data,success,channel,error';
// JSON with every object's keys sorted and null-valued keys left out: the
// event as published and as delivered compare equal whatever order a server
// writes the keys in, and whether it adds the optional keys its model has
// (the peers re-model events with pydantic; ours forwards the producer's bytes)
const sorted = (v) => (Array.isArray(v) ? v.map(sorted) : v && typeof v === 'object'
  ? Object.fromEntries(Object.keys(v).sort().filter((k) => v[k] !== null).map((k) => [k, sorted(v[k])])) : v);
const canonical = (v) => JSON.stringify(sorted(v));
function check(conn, payload) {
  let ok = false;
  try {
    const m = JSON.parse(payload.toString('utf8'));
    const want = verifying.get(m.data?.node_exec_id);
    ok = Object.keys(m).join(',') === FIVE_KEYS && m.method === 'node_execution_event' && m.success === null &&
      m.error === null && m.channel === `${USER}|graph_exec#${conn.execId}` && want !== undefined &&
      m.data.graph_exec_id === conn.execId && canonical(m.data) === want;
  } catch (e) { ok = false; }
  verify.checked++;
  if (!ok) { verify.mismatched++; if (!verify.first) verify.first = payload.toString('utf8').slice(0, 300); }
}

// -- sockets -------------------------------------------------------------------
const pool = new Set();
let opened = 0;

class Conn {
  constructor(execId, sample, deflate) {
    this.execId = execId; this.sample = sample; this.deflate = deflate; this.source = SOURCES[opened++ % SOURCES.length];
    this.sock = null; this.rest = null; this.upgraded = false; this.acked = false; this.onAck = null; this.onFail = null;
    this.agreed = null; this.inflater = null; this.frag = null; this.fragRsv1 = false; this.fragOp = 0;
  }

  open() {
    return new Promise((resolve) => {
      this.acked = false; this.upgraded = false; this.rest = null; this.agreed = null; this.inflater = null; this.frag = null;
      // no subscribe ack within OPEN_TIMEOUT_MS: give up on this attempt
      const timer = setTimeout(() => { if (this.sock === sock && !this.acked) { this.fail(); this.reset(); } }, OPEN_TIMEOUT_MS);
      this.onAck = () => { clearTimeout(timer); resolve(true); };
      this.onFail = () => { clearTimeout(timer); resolve(false); };
      const options = { host: HOST, port: PORT, noDelay: true };
      if (SOURCES.length > 1) options.localAddress = this.source;
      const sock = net.connect(options);
      this.sock = sock;
      sock.on('connect', () => sock.write(this.deflate ? REQUEST_DEFLATE : REQUEST));
      sock.on('data', (chunk) => this.data(chunk));
      sock.on('error', () => {});
      sock.on('close', () => { if (this.sock === sock) { this.sock = null; if (!this.acked) this.fail(); } });
    });
  }

  fail() { const f = this.onFail; this.onFail = this.onAck = null; if (f) f(); }

  upgrade(buf) {
    const end = buf.indexOf('\r\n\r\n');
    if (end < 0) return -1;
    if (buf.toString('latin1', 9, 12) !== '101') { this.sock.destroy(); return -2; }
    this.upgraded = true;
    const head = buf.toString('latin1', 0, end);
    this.agreed = this.deflate ? parseAgreed(head) : null;
    const value = this.agreed ? this.agreed.value : '(none)';
    extensions.set(value, (extensions.get(value) ?? 0) + 1);
    let message = subscribeMessage(this.execId);
    if (this.agreed && !this.agreed.unknown) {
      if (!this.agreed.serverNoContext) this.inflater = newInflater(this.agreed.serverBits);
      this.sock.write(clientFrame(1, deflateMessage(message, this.agreed.clientBits), true));
    } else this.sock.write(clientFrame(1, message));
    return end + 4;
  }

  data(chunk) {
    let buf = this.rest ? Buffer.concat([this.rest, chunk]) : chunk;
    this.rest = null;
    let off = 0;
    if (!this.upgraded) {
      off = this.upgrade(buf);
      if (off === -1) { this.rest = buf; return; }
      if (off === -2) return;
    }
    wireBytes += chunk.length;
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
      if (op === 1 || op === 2 || op === 0) {
        let payload = buf.subarray(start, end), rsv1 = (b0 & 0x40) !== 0;
        if (!(b0 & 0x80)) { // a fragment: keep it until the last one
          if (op !== 0) { this.frag = [payload]; this.fragRsv1 = rsv1; this.fragOp = op; } else if (this.frag) this.frag.push(payload);
          off = end;
          continue;
        }
        if (op === 0 && this.frag) { this.frag.push(payload); payload = Buffer.concat(this.frag); rsv1 = this.fragRsv1; this.frag = null; }
        if (rsv1) {
          const agreed = this.agreed;
          payload = !agreed || agreed.unknown ? null : this.inflater ? inflate(this.inflater, payload)
            : INFLATE_CACHE ? cachedInflate(agreed.serverBits, payload) : inflate(sharedInflater(agreed.serverBits), payload);
          if (payload === null) { inflateErrors++; off = end; continue; }
        }
        this.message(payload);
      } else if (op === 9) { // a browser answers at once; an empty ping (ours, every 20 s) with one shared frame
        this.sock.write(end === start ? EMPTY_PONG : clientFrame(10, buf.subarray(start, end)));
      } else if (op === 8) {
        serverCloses++;
        this.sock.end();
      }
      off = end;
    }
    if (off < len) this.rest = buf.subarray(off);
    if (onProgress) onProgress();
  }

  message(payload) {
    if (this.acked) {
      // subscribed: every text frame from here on is a pushed event (the
      // scenarios publish node events only, so no catch-up frame comes)
      received++;
      payloadBytes += payload.length;
      if (this.sample) {
        const t = payload.indexOf(T_MARK);
        if (t >= 0) recordLatency(now() - parseFloat(payload.toString('latin1', t + 4, Math.min(payload.length, t + 30))));
      }
      if (verifying) check(this, payload);
    } else if (payload.indexOf(OK_MARK) >= 0) {
      this.acked = true;
      const a = this.onAck; this.onAck = this.onFail = null; if (a) a();
    } else otherFrames++;
  }

  reset() {
    const sock = this.sock;
    this.sock = null; this.acked = false; this.onAck = this.onFail = null; this.inflater = null;
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

async function openMany({ n, channels = 10, conc = 200, attempts = 5, deflate = false, prefix = 'exec-' }) {
  const stats = { retries: 0, failed: 0, acked: 0 };
  let next = 0;
  const worker = async () => {
    while (next < n) {
      const i = next++;
      const conn = new Conn(`${prefix}${i % channels}`, Math.floor(i / channels) % SAMPLE_EVERY === 0, deflate);
      pool.add(conn);
      if (await openWithRetry(conn, stats, attempts)) stats.acked++;
    }
  };
  await Promise.all(Array.from({ length: Math.min(conc, n) }, worker));
  return stats;
}

// -- redis publishers (raw RESP, pipelined) --------------------------------------
// One connection per Redis node.  Replies are integers or errors, one line
// each, in order: a FIFO of what was sent lets a MOVED be followed (the
// command goes again to the node named, and the slot is remembered there).
const nodes = new Map(); // port -> Node
let pendingReplies = 0, replyWaiters = [], publishErrors = 0, movedFollowed = 0;

class Node {
  constructor(port) { this.port = port; this.sent = []; this.head = 0; this.partial = null; this.sock = null; }
  connect() {
    return new Promise((resolve, reject) => {
      this.sock = net.connect({ host: HOST, port: this.port, noDelay: true }, () => resolve(this));
      this.sock.on('error', reject);
      this.sock.on('data', (chunk) => this.replies(chunk));
    });
  }
  send(command, channel, payload) {
    pendingReplies++;
    this.sent.push(CLUSTER.length ? [command, channel, payload] : null);
    return this.sock.write(`*3\r\n$${command.length}\r\n${command}\r\n$${Buffer.byteLength(channel)}\r\n${channel}\r\n` +
      `$${Buffer.byteLength(payload)}\r\n${payload}\r\n`);
  }
  replies(chunk) {
    const buf = this.partial ? Buffer.concat([this.partial, chunk]) : chunk;
    this.partial = null;
    let at = 0;
    for (let i = buf.indexOf(10); i >= 0; i = buf.indexOf(10, at)) {
      if (buf[at] === 45 /* - */) {
        const cmd = this.sent[this.head], moved = buf.toString('latin1', at, i - 1).match(/^-MOVED (\d+) (.*):(\d+)$/);
        if (moved && cmd) { movedFollowed++; slotOwner[+moved[1]] = +moved[3]; node(+moved[3]).then((n) => n.send(...cmd)); }
        else publishErrors++;
      }
      this.head++;
      pendingReplies--;
      at = i + 1;
    }
    if (at < buf.length) this.partial = buf.subarray(at);
    if (this.head > 4096) { this.sent = this.sent.slice(this.head); this.head = 0; }
    if (pendingReplies <= 0 && replyWaiters.length) { const w = replyWaiters; replyWaiters = []; w.forEach((f) => f()); }
  }
}
async function node(port) {
  let n = nodes.get(port);
  if (!n) { n = new Node(port); nodes.set(port, n); await n.connect(); }
  return n;
}

// the cluster's slot map (CLUSTER SLOTS, asked once of the first node)
const slotOwner = new Int32Array(16384).fill(-1);
async function loadSlots() {
  const reply = await new Promise((resolve, reject) => {
    const sock = net.connect({ host: HOST, port: CLUSTER[0] }, () => sock.write('*2\r\n$7\r\nCLUSTER\r\n$5\r\nSLOTS\r\n'));
    let data = '';
    sock.on('data', (c) => { data += c.toString('latin1'); if (/\r\n$/.test(data) && parseResp(data) !== undefined) { sock.end(); resolve(parseResp(data)); } });
    sock.on('error', reject);
  });
  for (const [from, to, [, port]] of reply) for (let s = from; s <= to; s++) slotOwner[s] = port;
}
// a whole RESP reply, or undefined while incomplete (setup use only)
function parseResp(text) {
  let at = 0;
  const one = () => {
    const eol = text.indexOf('\r\n', at);
    if (eol < 0) throw 0;
    const type = text[at], line = text.slice(at + 1, eol);
    at = eol + 2;
    if (type === '*') return Array.from({ length: +line }, one);
    if (type === '$') { const s = text.slice(at, at + +line); if (at + +line + 2 > text.length) throw 0; at += +line + 2; return s; }
    if (type === ':') return +line;
    return line;
  };
  try { return one(); } catch (e) { return undefined; }
}

// CRC16 (XMODEM) of the hash tag: Redis Cluster's key slot
const CRC = new Uint16Array(256).map((_, i) => {
  let c = i << 8;
  for (let k = 0; k < 8; k++) c = c & 0x8000 ? (c << 1) ^ 0x1021 : c << 1;
  return c & 0xffff;
});
function keySlot(key) {
  const open = key.indexOf('{'), close = open >= 0 ? key.indexOf('}', open + 1) : -1;
  const tag = close > open + 1 ? key.slice(open + 1, close) : key;
  let crc = 0;
  for (const b of Buffer.from(tag)) crc = ((crc << 8) & 0xffff) ^ CRC[((crc >> 8) ^ b) & 0xff];
  return crc % 16384;
}

let classic = null; // the classic bus's one connection
const redisDrained = () => (pendingReplies <= 0 ? Promise.resolve() : new Promise((r) => replyWaiters.push(r)));

// how today's executors publish an execution event: PUBLISH on the classic
// channel, or SPUBLISH to the execution's and the graph's sharded channels
function publishEvent(execId, graphId, payload) {
  if (!CLUSTER.length) return classic.send('PUBLISH', `execution_event/${USER}/${graphId}/${execId}`, payload);
  const tag = `{${USER}/${graphId}}`, owner = nodes.get(slotOwner[keySlot(tag)]);
  owner.send('SPUBLISH', `execution_event/${tag}/exec/${execId}`, payload);
  return owner.send('SPUBLISH', `execution_event/${tag}/all`, payload);
}
// the graph of an execution: the one channel `g1` on the classic bus (as
// before); on the cluster, exec-K belongs to graph-K (rows in the database)
const graphOf = (execId) => (CLUSTER.length ? `graph-${execId.slice(execId.lastIndexOf('-') + 1)}` : 'g1');

// -- events ----------------------------------------------------------------------
function nodeEvent(user, graph, exec, j, t, filler) {
  return JSON.stringify({ payload: { event_type: 'node_execution_update', user_id: user, graph_id: graph, graph_version: 1,
    graph_exec_id: exec, node_exec_id: `ne-${j}`, node_id: 'n1', block_id: 'b1', status: 'RUNNING',
    input_data: { t, pad: filler }, output_data: {}, add_time: '2026-11-23T00:00:00Z' } });
}

// AutoGPT-like: an LLM block's COMPLETED node event as AutoGPT's pydantic
// models write it (event_type last), its prompt and answer as text.  The
// text is word salad drawn so that it deflates like English prose (see
// RESULTS.md); each of 64 texts is different, so a socket's compression
// context never sees an event twice within its window.
const WORDS = ('the of and to a in is that for it as was with be by on not this are or from at which but have an they ' +
  'you were there been one all we their has would when if so no will what can out more other said up about into them ' +
  'some could time than only its then may like these over two first new people any after very also made our well way ' +
  'even back much where how most just must those through many before great model data agent block graph node input ' +
  'output result value user step task run execution workflow search summary report list item table text file page ' +
  'source customer market price product sales growth revenue quarter team project plan goal issue risk change update ' +
  'email message response request query answer question analysis review content article post title section chapter ' +
  'because however therefore although while since whether during without within between among against toward upon ' +
  'important different possible available several various specific recent current previous following additional ' +
  'provide include require consider describe explain identify ensure support improve create develop generate return ' +
  'increase reduce compare measure estimate analyze evaluate recommend suggest indicate determine establish maintain').split(' ');
function prng(seed) { let s = seed >>> 0 || 1; return () => ((s = (Math.imul(s, 1103515245) + 12345) >>> 0) / 4294967296); }
function prose(size, seed) {
  const rnd = prng(seed);
  const parts = [];
  let n = 0, sentence = 0;
  while (n < size) {
    let w = WORDS[Math.floor(rnd() * rnd() * rnd() * WORDS.length)]; // skewed towards the common words, as in prose
    if (sentence === 0) w = w[0].toUpperCase() + w.slice(1);
    if (rnd() < 0.01) w = `${Math.floor(rnd() * 10000)}`;
    sentence++;
    const end = sentence > 6 && rnd() < 0.12;
    const sep = end ? (rnd() < 0.15 ? '.\n\n' : '. ') : (rnd() < 0.08 ? ', ' : ' ');
    if (end) sentence = 0;
    parts.push(w, sep);
    n += w.length + sep.length;
  }
  return parts.join('').slice(0, size);
}
const texts = new Map(); // size -> 64 texts
function text(size, j) {
  let pool = texts.get(size);
  if (!pool) { pool = Array.from({ length: 64 }, (_, k) => prose(size, size * 131 + k + 1)); texts.set(size, pool); }
  return pool[j % 64];
}
const uuid = (n) => `${(0x10000000 + n * 2654435761 % 0xefffffff >>> 0).toString(16).padStart(8, '0')}-7f3c-4a1e-9b2d-${(n >>> 0).toString(16).padStart(12, '0')}`;
function autogptEvent(user, graph, exec, j, t, size) {
  const at = '2026-11-29T10:00:00.123456+00:00';
  const prompt = text(Math.max(64, Math.floor(size / 8)), j + 17);
  return JSON.stringify({ payload: { user_id: user, graph_id: graph, graph_version: 4, graph_exec_id: exec,
    node_exec_id: uuid(j), node_id: uuid(j % 7 + 1000), block_id: '1f292d4a-41a4-4977-9684-7c8d560b9f91',
    status: 'COMPLETED',
    input_data: { t, prompt, sys_prompt: '', expected_format: {}, model: 'gpt-4o', retry: 3, prompt_values: {},
      credentials: { id: uuid(42), provider: 'openai', type: 'api_key', title: null }, max_tokens: null },
    output_data: { response: [text(size, j)], prompt: [[{ role: 'user', content: prompt }]] },
    add_time: at, queue_time: at, start_time: at, end_time: at, event_type: 'node_execution_update' } });
}

// A graph event of a run (what catch-up keeps and the cluster store writes):
// RUNNING and COMPLETED in turn, with its inputs, stats and outputs.
function graphEvent(user, graph, exec, j, t, size) {
  const at = '2026-11-29T10:00:00.123456+00:00';
  const done = j % 2 === 1;
  return JSON.stringify({ payload: { id: exec, user_id: user, graph_id: graph, graph_version: 4,
    inputs: { t, topic: text(Math.max(64, Math.floor(size / 8)), j + 5) }, credential_inputs: null,
    nodes_input_masks: null, preset_id: null, status: done ? 'COMPLETED' : 'RUNNING', started_at: at,
    ended_at: done ? at : null, is_shared: false, share_token: null, is_dry_run: false,
    stats: done ? { cost: 120 + j, walltime: 12.5, cputime: 1.25, node_count: 4, node_error_count: 0 } : null,
    outputs: done ? { summary: [text(Math.floor(size / 2), j)] } : {}, event_type: 'graph_execution_update' } });
}

function subscribersPerExec() {
  const count = new Map();
  for (const c of pool) if (c.acked) count.set(c.execId, (count.get(c.execId) ?? 0) + 1);
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
  return { p50_ms: q(0.5), p99_ms: q(0.99), max_ms: a.length ? +a[a.length - 1].toFixed(2) : null, samples: a.length };
}

const loopDelay = monitorEventLoopDelay({ resolution: 2 });
loopDelay.enable();
let gcMaxMs = 0; // this client's longest garbage-collection pause in the burst
new PerformanceObserver((list) => { for (const e of list.getEntries()) gcMaxMs = Math.max(gcMaxMs, e.duration); })
  .observe({ entryTypes: ['gc'] });

const yieldNow = () => new Promise((r) => setImmediate(r));

// burst (rate 0) or steady rate (events/s)
async function burst({ events, channels, rate = 0, timeout = 120, event = 'pad', size = 200, pad, prefix = 'exec-', group = 1,
  verify: check = false }) {
  if (pad !== undefined) size = pad;
  // event j goes to execution floor(j / group) % channels: one after the
  // other (group 1), or `group` events in a row to each
  const execOf = (j) => `${prefix}${Math.floor(j / group) % channels}`;
  const subs = subscribersPerExec();
  let expected = 0;
  for (let j = 0; j < events; j++) expected += subs.get(execOf(j)) ?? 0;
  received = 0; latN = 0; wireBytes = 0; payloadBytes = 0;
  loopDelay.reset(); gcMaxMs = 0;
  const errors0 = inflateErrors, pubErrors0 = publishErrors;
  verifying = check ? new Map() : null;
  Object.assign(verify, { checked: 0, mismatched: 0, first: null });
  const filler = 'x'.repeat(size);
  const one = (j) => {
    const exec = execOf(j), graph = graphOf(exec);
    const payload = event === 'autogpt' ? autogptEvent(USER, graph, exec, j, now(), size)
      : event === 'graph' ? graphEvent(USER, graph, exec, j, now(), size) : nodeEvent(USER, graph, exec, j, now(), filler);
    if (verifying) { const e = JSON.parse(payload).payload; verifying.set(e.node_exec_id, canonical(e)); }
    publishEvent(exec, graph, payload);
  };
  const t0 = now();
  let j = 0;
  if (rate > 0) {
    while (j < events) {
      const due = Math.min(events, Math.floor((now() - t0) * rate / 1000) + 1);
      for (; j < due; j++) one(j);
      await new Promise((r) => setTimeout(r, 1));
    }
  } else {
    for (; j < events; j++) {
      one(j);
      if (j % 200 === 199) await yieldNow();
    }
  }
  const tPub = now();
  const done = await waitFor(() => received >= expected, timeout * 1000);
  const tEnd = now();
  await redisDrained();
  const out = { expected, received, complete: done, publish_s: +((tPub - t0) / 1000).toFixed(3),
    deliver_s: +((tEnd - t0) / 1000).toFixed(3), msgs_per_s: Math.round(received / ((tEnd - t0) / 1000)),
    wire_bytes: wireBytes, payload_bytes: payloadBytes, inflate_errors: inflateErrors - errors0,
    publish_errors: publishErrors - pubErrors0, ...quantiles(),
    // this client's own event-loop delay over the burst: how late it could have read a frame
    client_lag_p99_ms: +(loopDelay.percentile(99) / 1e6).toFixed(2), client_lag_max_ms: +(loopDelay.max / 1e6).toFixed(2),
    client_gc_max_ms: +gcMaxMs.toFixed(2) };
  if (verifying) { out.verified = verify.checked; out.mismatched = verify.mismatched; out.first_mismatch = verify.first; verifying = null; }
  return out;
}

// events nobody here subscribed to, then one sentinel on a subscribed channel:
// the server handles its bus stream in order, so the sentinel's arrival means
// every ignored event before it has been handled (classic bus only)
async function ignore({ events, pad = 200, timeout = 300 }) {
  const subs = subscribersPerExec();
  const exec = [...subs.keys()][0];
  if (exec === undefined) throw new Error('ignore needs one subscribed socket');
  const filler = 'x'.repeat(pad);
  // every command is built before the clock starts, then written as fast as
  // Redis takes it: the server sees the stream at Redis's pace, not at the
  // pace this client can build JSON (which would leave it idle between
  // small reads and charge it the reactor's per-wakeup cost)
  const parts = [];
  for (let j = 0; j < events; j++) {
    const u = `user-${j % 997}`;
    const channel = `execution_event/${u}/g1/exec-${j}`, payload = nodeEvent(u, 'g1', `exec-${j}`, j, 0, filler);
    parts.push(`*3\r\n$7\r\nPUBLISH\r\n$${Buffer.byteLength(channel)}\r\n${channel}\r\n$${Buffer.byteLength(payload)}\r\n${payload}\r\n`);
  }
  const chunks = [];
  for (let i = 0; i < parts.length; i += 2000) chunks.push([Buffer.from(parts.slice(i, i + 2000).join('')), Math.min(2000, events - i)]);
  received = 0; latN = 0;
  const t0 = now();
  for (const [chunk, count] of chunks) {
    pendingReplies += count;
    for (let k = 0; k < count; k++) classic.sent.push(null);
    if (!classic.sock.write(chunk)) await new Promise((r) => classic.sock.once('drain', r));
  }
  publishEvent(exec, 'g1', nodeEvent(USER, 'g1', exec, -1, now(), filler));
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
      extensions.clear();
      const s = await openMany(cmd);
      return { ...s, secs: +((now() - t) / 1000).toFixed(3), pool: pool.size, extensions: Object.fromEntries(extensions) };
    }
    case 'burst': return burst(cmd);
    case 'ignore': return ignore(cmd);
    case 'drop': return drop(cmd);
    case 'closeall': return closeAll();
    case 'ping': return { pool: pool.size, acked: [...pool].filter((c) => c.acked).length, server_closes: serverCloses,
      other_frames: otherFrames, inflate_errors: inflateErrors, publish_errors: publishErrors, moved_followed: movedFollowed };
    case 'quit': closeAll(); process.stdout.write(JSON.stringify({ ok: true }) + '\n'); process.exit(0);
    default: throw new Error(`unknown command ${cmd.cmd}`);
  }
}

if (CLUSTER.length) {
  await loadSlots();
  for (const port of CLUSTER) await node(port);
} else classic = await node(REDIS);
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
