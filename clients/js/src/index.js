// @tether/client: the JavaScript client of the tether WebSocket gateway.
//
// One file, no dependencies, for browsers and Node (pass the `ws` package's
// WebSocket constructor in Node 20). It turns the gateway's at-least-once,
// in-order delivery into "every event once, in order" for the application:
//
// - connects with a token (or an async getToken(), asked again before every
//   reconnect and once more after an authentication failure), the token in
//   `?token=` because browsers cannot set headers on a WebSocket;
// - reconnects with full-jitter exponential backoff (bounded base and cap),
//   soon after 1001 (server draining) and 1013 (too slow), never in a tight
//   loop;
// - keeps the highest seq per conversation, drops anything at or below it,
//   and reports a gap as an `error` event instead of hiding it;
// - coalesces acks (a timer, or every N events), at most one in flight per
//   conversation (an ack is in flight until the pong of the ping sent after
//   it: the server handles a connection's frames in order);
// - retries a send with the same client_msg_id across reconnects until the
//   server answers `sent` or a final error, so a retry never creates a
//   second event; the outbox is bounded.
//
// The wire protocol is the project's docs/PROTOCOL.md.

const SEND_FINAL = new Set([
  'not_found',
  'invalid_field',
  'payload_too_large',
  'unknown_type',
  'bad_frame',
  'forbidden',
  'unauthorized',
  'internal',
]);
const SEND_RETRY = new Set([
  'database_unavailable',
  'rate_limited',
  'not_synced',
  'draining',
  'too_many_connections',
]);

const DEFAULTS = {
  backoffBaseMs: 500,
  backoffCapMs: 30000,
  soonMs: 250,
  stableMs: 5000,
  connectTimeoutMs: 15000,
  heartbeatMs: 25000,
  heartbeatTimeoutMs: 10000,
  ackDelayMs: 1000,
  ackEvery: 64,
  outboxLimit: 1000,
  maxFrameBytes: 256 * 1024,
  httpRetries: 3,
};

/** An error of the gateway or of the client, with a machine-readable code. */
export class TetherError extends Error {
  constructor(code, message, details) {
    super(message || code);
    this.name = 'TetherError';
    this.code = code;
    if (details) {
      for (const [k, v] of Object.entries(details)) {
        if (v !== undefined) this[k] = v;
      }
    }
  }
}

/** A random RFC 4122 version 4 UUID (crypto.randomUUID where available). */
export function uuid() {
  const c = globalThis.crypto;
  if (c && typeof c.randomUUID === 'function') return c.randomUUID();
  // Insecure browser contexts (plain http on a LAN address) lack
  // randomUUID but have getRandomValues.
  const b = new Uint8Array(16);
  if (c && typeof c.getRandomValues === 'function') c.getRandomValues(b);
  else for (let i = 0; i < 16; i++) b[i] = Math.floor(Math.random() * 256);
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  const h = Array.from(b, (x) => x.toString(16).padStart(2, '0')).join('');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

/** The user id (`sub`) of a JWT, without verifying it; null if unreadable. */
export function tokenUser(token) {
  try {
    const part = String(token).split('.')[1];
    const b64 = part.replace(/-/g, '+').replace(/_/g, '/');
    const padded = b64 + '='.repeat((4 - (b64.length % 4)) % 4);
    const json =
      typeof atob === 'function'
        ? decodeURIComponent(
            Array.from(atob(padded), (ch) => '%' + ch.charCodeAt(0).toString(16).padStart(2, '0')).join(''),
          )
        : Buffer.from(padded, 'base64').toString('utf8');
    const sub = JSON.parse(json).sub;
    return typeof sub === 'string' ? sub : null;
  } catch {
    return null;
  }
}

function utf8Length(s) {
  if (typeof TextEncoder === 'function') return new TextEncoder().encode(s).length;
  return unescape(encodeURIComponent(s)).length;
}

/** Splits the configured address into the WebSocket URL and the HTTP base. */
function endpoints(url) {
  let base = url;
  if (!base) {
    if (globalThis.location && globalThis.location.origin) base = globalThis.location.origin;
    else throw new TypeError('TetherClient: `url` is required (e.g. "http://127.0.0.1:8080")');
  }
  const u = new URL(base, globalThis.location ? globalThis.location.href : undefined);
  u.search = '';
  u.hash = '';
  let path = u.pathname.replace(/\/+$/, '');
  if (path.endsWith('/v1/ws')) path = path.slice(0, -'/v1/ws'.length);
  const httpScheme = u.protocol === 'wss:' || u.protocol === 'https:' ? 'https:' : 'http:';
  const wsScheme = httpScheme === 'https:' ? 'wss:' : 'ws:';
  return {
    http: `${httpScheme}//${u.host}${path}`,
    ws: `${wsScheme}//${u.host}${path}/v1/ws`,
  };
}

const OPEN = 1;

/**
 * A connection to a tether gateway that survives reconnects.
 *
 *   const client = new TetherClient({ url, getToken });
 *   client.on('event', (e) => ...);
 *   client.connect();
 *   const { seq } = await client.send(conversationId, 'hello');
 */
export class TetherClient {
  constructor(options = {}) {
    const o = { ...DEFAULTS, ...options };
    if (!o.token && typeof o.getToken !== 'function') {
      throw new TypeError('TetherClient: give `token` or `getToken`');
    }
    const WS = o.WebSocket || globalThis.WebSocket;
    if (typeof WS !== 'function') {
      throw new TypeError(
        'TetherClient: no WebSocket constructor; pass one, e.g. `WebSocket` from the "ws" package in Node',
      );
    }
    this._o = o;
    this._WS = WS;
    this._fetch = o.fetch || (typeof globalThis.fetch === 'function' ? globalThis.fetch.bind(globalThis) : null);
    this._random = typeof o.random === 'function' ? o.random : Math.random;
    const ep = endpoints(o.url);
    this.httpUrl = ep.http;
    this.wsUrl = ep.ws;

    this._listeners = new Map();
    this._state = 'idle';
    this._stopped = true;
    this._gen = 0;
    this._ws = null;
    this._token = o.token || null;
    this._tokenPromise = null;
    this._attempt = 0;
    this._tries = 0;
    this._authFailures = 0;
    this._timers = new Set();
    this._reconnectTimer = null;

    // Per connection.
    this._opened = false;
    this._synced = false;
    this._openedAt = 0;
    this._syncedAt = 0;
    this._lastRecv = 0;
    this._pingWaiters = [];
    this._ackSent = new Map();
    this._ackInflight = new Set();
    this._ackTimer = null;
    this._heartbeat = null;
    this._handshakeError = '';

    // Across connections.
    this.user = o.token ? tokenUser(o.token) : null;
    this.worker = null;
    this._high = new Map();
    if (o.lastSeqs) {
      for (const [c, s] of Object.entries(o.lastSeqs)) this._high.set(Number(c), Number(s));
    }
    this._left = new Set();
    this._ackWant = new Map();
    this._eventsSinceAck = 0;
    this._outbox = new Map();
    this._outboxTimer = null;
  }

  // ----- events ---------------------------------------------------------

  /** Adds a listener; returns a function that removes it. */
  on(name, fn) {
    if (!this._listeners.has(name)) this._listeners.set(name, new Set());
    this._listeners.get(name).add(fn);
    return () => this.off(name, fn);
  }

  off(name, fn) {
    const set = this._listeners.get(name);
    if (set) set.delete(fn);
  }

  /** Resolves with the first emission of `name`. */
  once(name) {
    return new Promise((resolve) => {
      const off = this.on(name, (v) => {
        off();
        resolve(v);
      });
    });
  }

  _emit(name, value) {
    const set = this._listeners.get(name);
    if (!set || set.size === 0) return;
    for (const fn of [...set]) {
      try {
        fn(value);
      } catch (e) {
        // A throwing listener must not break delivery to the others.
        if (typeof console !== 'undefined') console.error(`tether: a "${name}" listener threw`, e);
      }
    }
  }

  _setState(state, extra) {
    this._state = state;
    this._emit('state', { state, ...extra });
  }

  /** connecting | open | synced | reconnecting | closed (idle before connect). */
  get state() {
    return this._state;
  }

  /** True between `synced` and the connection's end. */
  get synced() {
    return this._synced;
  }

  /** The highest seq seen in a conversation (undefined if none). */
  lastSeq(conversationId) {
    return this._high.get(Number(conversationId));
  }

  /** Every conversation's highest seq seen, e.g. to persist and pass back as `lastSeqs`. */
  lastSeqs() {
    return Object.fromEntries(this._high);
  }

  /** Sends waiting for `sent` (queued or in flight). */
  get pending() {
    return this._outbox.size;
  }

  /** Resolves at the next `synced` (at once if synced now). */
  whenSynced() {
    if (this._synced) return Promise.resolve();
    return new Promise((resolve, reject) => {
      const offS = this.on('synced', () => {
        offS();
        offC();
        resolve();
      });
      const offC = this.on('state', (s) => {
        if (s.state === 'closed') {
          offS();
          offC();
          reject(s.error || new TetherError('closed', 'the client was closed'));
        }
      });
    });
  }

  // ----- timers -----------------------------------------------------------

  _later(ms, fn) {
    const t = setTimeout(() => {
      this._timers.delete(t);
      fn();
    }, Math.max(0, ms));
    this._timers.add(t);
    return t;
  }

  _cancel(t) {
    if (t != null) {
      clearTimeout(t);
      this._timers.delete(t);
    }
    return null;
  }

  // ----- tokens -----------------------------------------------------------

  /** The token to use now; asks getToken() when `fresh` (or when none yet). */
  async _getToken(fresh) {
    if (typeof this._o.getToken !== 'function') return this._token;
    if (!fresh && this._token) return this._token;
    if (!this._tokenPromise) {
      this._tokenPromise = (async () => {
        try {
          const t = await this._o.getToken();
          if (typeof t !== 'string' || t === '') {
            throw new TetherError('token_error', 'getToken() did not return a token');
          }
          this._token = t;
          const u = tokenUser(t);
          if (u) this.user = u;
          return t;
        } finally {
          this._tokenPromise = null;
        }
      })();
    }
    return this._tokenPromise;
  }

  // ----- connection -----------------------------------------------------

  /** Starts connecting (and reconnecting until close()). Returns the client. */
  connect() {
    if (!this._stopped) return this;
    this._stopped = false;
    this._attempt = 0;
    this._authFailures = 0;
    this._open();
    return this;
  }

  /** Closes for good: flushes acks, rejects unsent sends with `closed`. */
  close() {
    const wasStopped = this._stopped;
    this._stopped = true;
    this._gen++;
    if (this._synced) this._flushAcks(true);
    const ws = this._ws;
    this._endConnection();
    if (ws) {
      try {
        ws.close(1000, 'client closed');
      } catch {
        // already closed
      }
    }
    for (const t of this._timers) clearTimeout(t);
    this._timers.clear();
    this._reconnectTimer = null;
    this._outboxTimer = null;
    this._failOutbox(new TetherError('closed', 'the client was closed before the server confirmed this send'));
    if (!wasStopped || this._state !== 'closed') this._setState('closed', {});
  }

  async _open() {
    const gen = ++this._gen;
    this._reconnectTimer = null;
    this._setState('connecting', { attempt: this._attempt });
    let token;
    try {
      // getToken() before every connection attempt (a static token only
      // serves the first).
      this._tries++;
      token = await this._getToken(this._tries > 1 || !this._token);
    } catch (e) {
      if (gen !== this._gen || this._stopped) return;
      this._emit(
        'error',
        e instanceof TetherError ? e : new TetherError('token_error', `getToken() failed: ${e && e.message}`, { cause: e }),
      );
      this._scheduleReconnect({ code: 0, reason: 'getToken failed' });
      return;
    }
    if (gen !== this._gen || this._stopped) return;
    let ws;
    try {
      ws = new this._WS(`${this.wsUrl}?token=${encodeURIComponent(token)}`);
    } catch (e) {
      this._emit('error', new TetherError('connect_failed', `could not open a WebSocket: ${e && e.message}`));
      this._scheduleReconnect({ code: 0, reason: 'constructor failed' });
      return;
    }
    this._ws = ws;
    this._opened = false;
    this._synced = false;
    this._handshakeError = '';
    this._ackSent = new Map();
    this._ackInflight = new Set();
    this._pingWaiters = [];
    this._connectTimer = this._later(this._o.connectTimeoutMs, () => {
      if (this._ws === ws && !this._opened) this._abort(ws, 4000, 'connect timeout');
    });
    ws.onopen = () => {
      if (this._ws !== ws) return;
      this._lastRecv = Date.now();
    };
    ws.onmessage = (m) => {
      if (this._ws !== ws) return;
      this._lastRecv = Date.now();
      let frame;
      try {
        frame = JSON.parse(typeof m.data === 'string' ? m.data : new TextDecoder().decode(m.data));
      } catch {
        this._emit('error', new TetherError('bad_frame', 'the server sent a frame that is not JSON'));
        return;
      }
      this._onFrame(ws, frame);
    };
    ws.onerror = (e) => {
      if (this._ws !== ws) return;
      this._handshakeError = String((e && (e.message || (e.error && e.error.message))) || '');
    };
    ws.onclose = (e) => {
      if (this._ws !== ws) return;
      this._onClose(e ? e.code : 1006, e ? e.reason : '');
    };
  }

  /** Gives up on a socket now (dead or stuck), without waiting for its close. */
  _abort(ws, code, reason) {
    try {
      if (typeof ws.terminate === 'function') ws.terminate();
      else ws.close();
    } catch {
      // ignore
    }
    if (this._ws === ws) this._onClose(code, reason);
  }

  /** Per-connection cleanup; puts in-flight sends back in the queue. */
  _endConnection() {
    const ws = this._ws;
    if (ws) {
      // No-ops rather than null: the `ws` package throws an 'error' event
      // that has no listener (closing a socket still connecting emits one).
      const nop = () => {};
      ws.onopen = ws.onmessage = ws.onerror = ws.onclose = nop;
    }
    this._ws = null;
    this._synced = false;
    this._connectTimer = this._cancel(this._connectTimer);
    this._ackTimer = this._cancel(this._ackTimer);
    if (this._heartbeat) {
      clearInterval(this._heartbeat);
      this._heartbeat = null;
    }
    this._heartbeatDeadline = this._cancel(this._heartbeatDeadline);
    this._pingWaiters = [];
    this._ackInflight = new Set();
    for (const entry of this._outbox.values()) entry.inflight = false;
  }

  async _onClose(code, reason) {
    const opened = this._opened;
    const lived = opened ? Date.now() - this._openedAt : 0;
    const syncedFor = this._syncedAt && this._synced ? Date.now() - this._syncedAt : 0;
    const handshakeError = this._handshakeError;
    if (code === 1009) this._failLargestInflight();
    this._endConnection();
    if (this._stopped) return;
    const gen = this._gen;

    // Authentication: a 1008, or a refused handshake that was a 401.
    let authFailed = code === 1008;
    if (!opened && !authFailed) {
      if (/\b401\b/.test(handshakeError)) authFailed = true;
      else if (code !== 4000) authFailed = await this._probeUnauthorized();
      if (gen !== this._gen || this._stopped) return;
    }
    if (authFailed) {
      this._authFailures++;
      if (typeof this._o.getToken !== 'function' || this._authFailures >= 2) {
        const err = new TetherError('unauthorized', 'the server refused the token', { closeCode: code });
        this._stopped = true;
        this._emit('error', err);
        this._failOutbox(err);
        this._setState('closed', { code, reason, error: err });
        return;
      }
      // Once more with a fresh token, soon.
      this._scheduleReconnect({ code, reason, delay: this._random() * this._o.soonMs });
      return;
    }

    let delay;
    if (opened && (code === 1001 || code === 1013) && lived >= 1000) {
      // Draining or too slow: the server wants us back elsewhere, now.
      delay = this._random() * this._o.soonMs;
      this._attempt = 0;
    } else {
      if (syncedFor >= this._o.stableMs) this._attempt = 0;
    }
    this._scheduleReconnect({ code, reason, delay });
  }

  /** After a failed handshake: does the server refuse our token (401)? */
  async _probeUnauthorized() {
    if (!this._fetch || !this._token) return false;
    try {
      const opts = { headers: { authorization: `Bearer ${this._token}` } };
      if (typeof AbortSignal !== 'undefined' && typeof AbortSignal.timeout === 'function') {
        opts.signal = AbortSignal.timeout(5000);
      }
      const r = await this._fetch(`${this.httpUrl}/v1/conversations?limit=1`, opts);
      return r.status === 401;
    } catch {
      return false;
    }
  }

  _backoff() {
    const exp = Math.min(this._o.backoffCapMs, this._o.backoffBaseMs * 2 ** Math.min(this._attempt, 30));
    this._attempt++;
    return this._random() * exp;
  }

  _scheduleReconnect({ code, reason, delay }) {
    if (this._stopped) return;
    const d = Math.round(delay === undefined ? this._backoff() : delay);
    this._setState('reconnecting', { delay: d, attempt: this._attempt, code, reason });
    this._reconnectTimer = this._cancel(this._reconnectTimer);
    this._reconnectTimer = this._later(d, () => {
      if (!this._stopped) this._open();
    });
  }

  _send(ws, frame) {
    if (!ws || ws.readyState !== OPEN) return false;
    try {
      ws.send(JSON.stringify(frame));
      return true;
    } catch {
      return false;
    }
  }

  /** Sends a ping; `then` runs at its pong (not at all if the connection ends). */
  _ping(then) {
    if (this._send(this._ws, { type: 'ping' })) {
      this._pingWaiters.push(then || null);
      return true;
    }
    return false;
  }

  _onFrame(ws, f) {
    switch (f.type) {
      case 'hello':
        this._opened = true;
        this._openedAt = Date.now();
        this._authFailures = 0;
        this._connectTimer = this._cancel(this._connectTimer);
        if (f.user) this.user = f.user;
        this.worker = f.worker || null;
        this._setState('open', { user: f.user, worker: f.worker });
        break;
      case 'event':
        this._onEvent(f);
        break;
      case 'synced':
        this._synced = true;
        this._syncedAt = Date.now();
        this._setState('synced', { worker: this.worker });
        this._emit('synced', { worker: this.worker });
        if (this._ws !== ws) return; // a listener closed us
        this._startHeartbeat(ws);
        this._flushOutbox();
        this._flushAcks(true);
        break;
      case 'sent':
        this._onSent(f);
        break;
      case 'error':
        this._onServerError(f);
        break;
      case 'pong': {
        const then = this._pingWaiters.shift();
        if (then) then();
        break;
      }
      default:
        // Newer servers may add frames; ignore what we do not know.
        break;
    }
  }

  _startHeartbeat(ws) {
    const every = this._o.heartbeatMs;
    if (!every) return;
    this._heartbeat = setInterval(() => {
      if (this._ws !== ws || this._heartbeatDeadline) return;
      if (Date.now() - this._lastRecv < every) return;
      const sentAt = Date.now();
      this._ping();
      this._heartbeatDeadline = this._later(this._o.heartbeatTimeoutMs, () => {
        this._heartbeatDeadline = null;
        if (this._ws === ws && this._lastRecv < sentAt) this._abort(ws, 4000, 'heartbeat timeout');
      });
    }, Math.max(250, Math.floor(every / 2)));
  }

  // ----- events and acks ------------------------------------------------

  _onEvent(f) {
    const c = f.conversation_id;
    const seq = f.seq;
    if (!Number.isInteger(c) || !Number.isInteger(seq)) {
      this._emit('error', new TetherError('bad_frame', 'an event without conversation_id/seq'));
      return;
    }
    const me = this.user;
    const joinsMe =
      (f.event === 'member.joined' && f.user === me) ||
      (f.event === 'conversation.created' && Array.isArray(f.members) && f.members.includes(me));
    const high = this._high.get(c);
    if (high !== undefined && seq <= high) {
      // A replay from a cursor below what we saw (the last connection ended
      // before the server stored our ack): tell this connection how far we are.
      if (!this._left.has(c) && (this._ackSent.get(c) || 0) < high) this._wantAck(c, high);
      return;
    }
    if (high !== undefined && seq > high + 1 && !(joinsMe && this._left.has(c))) {
      this._emit(
        'error',
        new TetherError('gap', `conversation ${c}: expected seq ${high + 1}, got ${seq}`, {
          conversationId: c,
          expected: high + 1,
          got: seq,
        }),
      );
    }
    this._high.set(c, seq);
    if (joinsMe) this._left.delete(c);
    const ev = { ...f };
    delete ev.type;
    this._emit('event', ev);
    if (f.event === 'member.left' && f.user === me) {
      // The server no longer knows us in this conversation: acks would be refused.
      this._left.add(c);
      this._ackWant.delete(c);
      return;
    }
    this._wantAck(c, seq);
  }

  _wantAck(c, seq) {
    if ((this._ackWant.get(c) || 0) < seq) this._ackWant.set(c, seq);
    this._eventsSinceAck++;
    if (!this._synced) return;
    if (this._eventsSinceAck >= this._o.ackEvery) this._flushAcks(true);
    else if (!this._ackTimer) {
      this._ackTimer = this._later(this._o.ackDelayMs, () => {
        this._ackTimer = null;
        this._flushAcks(true);
      });
    }
  }

  /** Sends one ack per conversation with something new, except where one is in flight. */
  _flushAcks() {
    const ws = this._ws;
    if (!this._synced || !ws) return;
    this._ackTimer = this._cancel(this._ackTimer);
    this._eventsSinceAck = 0;
    const batch = [];
    for (const [c, seq] of this._ackWant) {
      if (this._ackInflight.has(c)) continue;
      if (this._left.has(c) || seq <= (this._ackSent.get(c) || 0)) {
        this._ackWant.delete(c);
        continue;
      }
      if (!this._send(ws, { type: 'ack', conversation_id: c, seq })) return;
      this._ackWant.delete(c);
      this._ackSent.set(c, seq);
      this._ackInflight.add(c);
      batch.push(c);
    }
    if (batch.length === 0) return;
    this._ping(() => {
      if (this._ws !== ws) return;
      for (const c of batch) this._ackInflight.delete(c);
      if (this._ackWant.size > 0 && !this._ackTimer) {
        this._ackTimer = this._later(this._o.ackDelayMs, () => {
          this._ackTimer = null;
          this._flushAcks();
        });
      }
    });
  }

  // ----- sends ------------------------------------------------------------

  /**
   * Sends a message over the WebSocket. Resolves with
   * `{seq, duplicate, conversationId, clientMsgId}` once committed; retried
   * with the same client_msg_id across reconnects; rejects with a
   * TetherError on a final error, when the outbox is full, or on close().
   */
  send(conversationId, body, options = {}) {
    const c = Number(conversationId);
    if (!Number.isInteger(c) || c <= 0) {
      return Promise.reject(new TetherError('invalid_field', 'conversationId must be a positive integer'));
    }
    if (typeof body !== 'string') {
      return Promise.reject(new TetherError('invalid_field', 'body must be a string'));
    }
    if (this._stopped && this._state === 'closed') {
      return Promise.reject(new TetherError('closed', 'the client is closed'));
    }
    const id = options.clientMsgId || uuid();
    if (this._outbox.has(id)) {
      return Promise.reject(new TetherError('invalid_field', `a send with client_msg_id ${id} is already pending`));
    }
    const frame = { type: 'send', conversation_id: c, body, client_msg_id: id };
    const bytes = utf8Length(JSON.stringify(frame));
    if (bytes > this._o.maxFrameBytes) {
      return Promise.reject(
        new TetherError('payload_too_large', `the message frame is ${bytes} bytes; the limit is ${this._o.maxFrameBytes}`, {
          conversationId: c,
          clientMsgId: id,
        }),
      );
    }
    if (this._outbox.size >= this._o.outboxLimit) {
      return Promise.reject(
        new TetherError(
          'outbox_full',
          `outbox full: ${this._outbox.size} sends are waiting for the server (limit ${this._o.outboxLimit})`,
          { conversationId: c },
        ),
      );
    }
    return new Promise((resolve, reject) => {
      const entry = { id, frame, bytes, resolve, reject, inflight: false, notBefore: 0, attempts: 0 };
      this._outbox.set(id, entry);
      if (typeof options.onQueued === 'function') options.onQueued(id);
      this._transmit(entry);
    });
  }

  _transmit(entry) {
    if (!this._synced || entry.inflight || Date.now() < entry.notBefore) return;
    if (this._send(this._ws, entry.frame)) {
      entry.inflight = true;
      entry.attempts++;
    }
  }

  _flushOutbox() {
    this._outboxTimer = this._cancel(this._outboxTimer);
    if (!this._synced) return;
    let next = Infinity;
    const now = Date.now();
    for (const entry of this._outbox.values()) {
      if (entry.notBefore > now) next = Math.min(next, entry.notBefore);
      else this._transmit(entry);
    }
    if (next !== Infinity) this._outboxTimer = this._later(next - now, () => this._flushOutbox());
  }

  _onSent(f) {
    const entry = this._outbox.get(f.client_msg_id);
    if (!entry) return; // an answer to a retry already answered
    this._outbox.delete(entry.id);
    entry.resolve({
      seq: f.seq,
      duplicate: !!f.duplicate,
      conversationId: f.conversation_id,
      clientMsgId: entry.id,
    });
  }

  _onServerError(f) {
    const entry = f.client_msg_id ? this._outbox.get(f.client_msg_id) : undefined;
    if (!entry) {
      if (f.code === 'not_synced') {
        // Our frame reached a connection still replaying; it is sent again after synced.
        for (const e of this._outbox.values()) e.inflight = false;
        return;
      }
      this._emit(
        'error',
        new TetherError(f.code || 'error', f.message, { retryAfter: f.retry_after, clientMsgId: f.client_msg_id }),
      );
      return;
    }
    if (SEND_RETRY.has(f.code) || (!SEND_FINAL.has(f.code) && f.retry_after !== undefined)) {
      const secs = typeof f.retry_after === 'number' && f.retry_after > 0 ? f.retry_after : 1;
      entry.inflight = false;
      entry.notBefore = Date.now() + secs * 1000 + this._random() * 250;
      if (!this._outboxTimer) {
        this._outboxTimer = this._later(entry.notBefore - Date.now(), () => this._flushOutbox());
      }
      return;
    }
    this._outbox.delete(entry.id);
    entry.reject(
      new TetherError(f.code || 'error', f.message, {
        conversationId: entry.frame.conversation_id,
        clientMsgId: entry.id,
      }),
    );
  }

  /** After a 1009 the largest in-flight send is what the server refused. */
  _failLargestInflight() {
    let big = null;
    for (const e of this._outbox.values()) if (e.inflight && (!big || e.bytes > big.bytes)) big = e;
    if (!big) return;
    this._outbox.delete(big.id);
    big.reject(
      new TetherError('payload_too_large', 'the server closed the connection: frame too large (1009)', {
        conversationId: big.frame.conversation_id,
        clientMsgId: big.id,
      }),
    );
  }

  _failOutbox(err) {
    const entries = [...this._outbox.values()];
    this._outbox.clear();
    for (const e of entries) {
      e.reject(new TetherError(err.code, err.message, { conversationId: e.frame.conversation_id, clientMsgId: e.id }));
    }
  }

  // ----- REST -------------------------------------------------------------

  async _http(method, path, body, { retries = 0 } = {}) {
    if (!this._fetch) throw new TetherError('no_fetch', 'no fetch() available; pass `fetch` in the options');
    let refreshed = false;
    for (let attempt = 0; ; attempt++) {
      const token = await this._getToken(false);
      const headers = { authorization: `Bearer ${token}` };
      if (body !== undefined) headers['content-type'] = 'application/json';
      let r;
      try {
        r = await this._fetch(this.httpUrl + path, {
          method,
          headers,
          body: body === undefined ? undefined : JSON.stringify(body),
        });
      } catch (e) {
        if (attempt < retries) {
          await new Promise((res) => setTimeout(res, this._random() * 1000 * 2 ** attempt));
          continue;
        }
        throw new TetherError('network', `${method} ${path}: ${e && e.message}`, { cause: e });
      }
      const text = await r.text();
      let json = null;
      try {
        json = text ? JSON.parse(text) : null;
      } catch {
        json = null;
      }
      if (r.ok) return json;
      const code = (json && json.error) || `http_${r.status}`;
      if (r.status === 401 && !refreshed && typeof this._o.getToken === 'function') {
        refreshed = true;
        await this._getToken(true);
        attempt--;
        continue;
      }
      const retryAfter =
        (json && typeof json.retry_after === 'number' && json.retry_after) ||
        Number(r.headers && r.headers.get && r.headers.get('retry-after')) ||
        undefined;
      if ((r.status === 503 || r.status === 429) && attempt < retries) {
        await new Promise((res) => setTimeout(res, (retryAfter || 1) * 1000 + this._random() * 250));
        continue;
      }
      throw new TetherError(code, (json && json.message) || `${method} ${path}: HTTP ${r.status}`, {
        status: r.status,
        retryAfter,
      });
    }
  }

  /** POST /v1/conversations: `{id, title, members, seq}`. The caller is a member. */
  createConversation({ members = [], title = '' } = {}) {
    return this._http('POST', '/v1/conversations', { members, title });
  }

  /** POST /v1/conversations/{id}/members. */
  addMember(conversationId, user) {
    return this._http('POST', `/v1/conversations/${encodeURIComponent(conversationId)}/members`, { user });
  }

  /** DELETE /v1/conversations/{id}/members/{user}. */
  removeMember(conversationId, user) {
    return this._http(
      'DELETE',
      `/v1/conversations/${encodeURIComponent(conversationId)}/members/${encodeURIComponent(user)}`,
    );
  }

  /** GET /v1/conversations: `{conversations: [{id, title, last_seq, cursor, unread}], next}`. */
  listConversations({ after, limit } = {}) {
    const q = new URLSearchParams();
    if (after != null) q.set('after', String(after));
    if (limit != null) q.set('limit', String(limit));
    const qs = q.toString();
    return this._http('GET', `/v1/conversations${qs ? `?${qs}` : ''}`);
  }

  /**
   * GET /v1/conversations/{id}/events: newest first with `beforeSeq` (or
   * neither), oldest first with `afterSeq`. `{events, next_before_seq}` or
   * `{events, next_after_seq}` (null on the last page).
   */
  eventsPage(conversationId, { beforeSeq, afterSeq, limit } = {}) {
    const q = new URLSearchParams();
    if (beforeSeq != null) q.set('before_seq', String(beforeSeq));
    if (afterSeq != null) q.set('after_seq', String(afterSeq));
    if (limit != null) q.set('limit', String(limit));
    const qs = q.toString();
    return this._http('GET', `/v1/conversations/${encodeURIComponent(conversationId)}/events${qs ? `?${qs}` : ''}`);
  }

  /**
   * POST /v1/conversations/{id}/messages: the committed event. Retried (with
   * the same client_msg_id, so never twice) on 503, 429 and network errors.
   */
  sendMessage(conversationId, body, { clientMsgId, retries } = {}) {
    return this._http(
      'POST',
      `/v1/conversations/${encodeURIComponent(conversationId)}/messages`,
      { body, client_msg_id: clientMsgId || uuid() },
      { retries: retries === undefined ? this._o.httpRetries : retries },
    );
  }
}

export default TetherClient;
