// @tether/client: the JavaScript client of the tether WebSocket gateway.
//
// One file, no dependencies, for browsers and Node (pass the `ws` package's
// WebSocket constructor in Node 20). It turns the gateway's at-least-once,
// in-order delivery into "every event once, in order" for the application:
//
// - connects with a token (or an async getToken(), asked again only when the
//   token is within `tokenRefreshMarginMs` of its exp, or after an
//   authentication failure), offered as a subprotocol
//   (`tether.v1, tether.token.<JWT>`), never in the URL;
// - reconnects with full-jitter exponential backoff (bounded base and cap),
//   soon after 1001 (server draining) and 1013 (too slow), never in a tight
//   loop;
// - keeps the highest seq per conversation, drops anything at or below it,
//   and reports a gap as an `error` event instead of hiding it;
// - acks what the application consumed: with autoAck (the default) an event
//   once every listener returned (or an async listener's promise settled),
//   in order per conversation; with autoAck:false only client.ack(); acks
//   are coalesced (a timer, or every N events), at most one in flight per
//   conversation, never above what the current connection delivered;
// - retries a send with the same client_msg_id across reconnects until the
//   server answers `sent` or a final error, so a retry never creates a
//   second event; the outbox is bounded;
// - with `transports: ['websocket', 'sse']`, falls back to Server-Sent
//   Events when WebSocket does not get through (a proxy): the same stream,
//   with sends and acks over HTTP (see SseSocket).
//
// The wire protocol is the project's docs/PROTOCOL.md; the SDK's own
// contract (states, events, defaults, codes, acks) is docs/SDK.md.

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

// The same values as the Rust client's (docs/SDK.md).
const DEFAULTS = {
  backoffBaseMs: 100,
  backoffCapMs: 5000,
  backoffFloorMs: 10,
  soonMs: 100,
  stableMs: 1000,
  connectTimeoutMs: 10000,
  heartbeatMs: 25000,
  heartbeatTimeoutMs: 10000,
  ackDelayMs: 1000,
  ackEvery: 64,
  outboxLimit: 1000,
  maxFrameBytes: 256 * 1024,
  httpRetries: 3,
  autoAck: true,
  tokenRefreshMarginMs: 30000,
  probeIntervalMs: 30000,
  transports: ['websocket'],
  sseAfterFailures: 3,
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
  const claims = tokenClaims(token);
  return claims && typeof claims.sub === 'string' ? claims.sub : null;
}

/** The claims of a JWT, without verifying it; null if unreadable. */
function tokenClaims(token) {
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
    const claims = JSON.parse(json);
    return claims && typeof claims === 'object' ? claims : null;
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
  if (!['http:', 'https:', 'ws:', 'wss:'].includes(u.protocol)) {
    throw new TypeError(`TetherClient: unsupported scheme ${u.protocol} in ${JSON.stringify(String(base))} (use http(s) or ws(s))`);
  }
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
    const transports = (o.transports || []).filter((t) => t === 'websocket' || t === 'sse');
    if (transports.length === 0) throw new TypeError("TetherClient: `transports` must name 'websocket' and/or 'sse'");
    const WS = o.WebSocket || globalThis.WebSocket;
    if (typeof WS !== 'function' && transports[0] === 'websocket') {
      throw new TypeError(
        'TetherClient: no WebSocket constructor; pass one, e.g. `WebSocket` from the "ws" package in Node',
      );
    }
    this._o = o;
    this._WS = WS;
    this._transports = transports;
    this._transport = transports[0];
    this._wsFailures = 0;
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
    // What the application consumed, per conversation (what acks say), and
    // the listeners' promises still running, chained per conversation.
    this._consumed = new Map();
    this._chains = new Map();
    // The highest seq the current connection delivered (an ack above it is refused).
    this._connHigh = new Map();
    this._lastProbe = 0;
    this._hooks = null;
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

  /** Calls the listeners of `name`; returns the promises they returned. */
  _emit(name, value) {
    const set = this._listeners.get(name);
    const pending = [];
    if (!set || set.size === 0) return pending;
    for (const fn of [...set]) {
      try {
        const r = fn(value);
        if (r && typeof r.then === 'function') pending.push(r);
      } catch (e) {
        // A throwing listener must not break delivery to the others.
        if (typeof console !== 'undefined') console.error(`tether: a "${name}" listener threw`, e);
      }
    }
    return pending;
  }

  _setState(state, extra) {
    this._state = state;
    this._emit('state', { state, ...extra });
  }

  /** connecting | open | synced | reconnecting | closed (idle before connect). */
  get state() {
    return this._state;
  }

  /** The transport in use: `websocket`, or `sse` after a fall-back (or when it is the only one). */
  get transport() {
    return this._transport;
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

  /** Whether the current token expires within tokenRefreshMarginMs (or has no exp). */
  _tokenExpiring() {
    const claims = this._token ? tokenClaims(this._token) : null;
    if (!claims || typeof claims.exp !== 'number') return true;
    return claims.exp * 1000 - Date.now() < this._o.tokenRefreshMarginMs;
  }

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
    this._installHooks();
    this._open();
    return this;
  }

  /** Connects now if waiting out a backoff (e.g. the network is back). */
  reconnectNow() {
    if (this._stopped || this._ws || this._state !== 'reconnecting') return;
    this._reconnectTimer = this._cancel(this._reconnectTimer);
    this._attempt = 0;
    this._open();
  }

  /** Browsers: coming back online, or the page becoming visible, reconnects at once. */
  _installHooks() {
    const g = globalThis;
    if (this._hooks || typeof g.addEventListener !== 'function') return;
    const wake = () => this.reconnectNow();
    const visible = () => {
      if (g.document && g.document.visibilityState === 'visible') wake();
    };
    g.addEventListener('online', wake);
    const doc = g.document && typeof g.document.addEventListener === 'function' ? g.document : null;
    if (doc) doc.addEventListener('visibilitychange', visible);
    this._hooks = () => {
      g.removeEventListener('online', wake);
      if (doc) doc.removeEventListener('visibilitychange', visible);
    };
  }

  /** Closes for good: flushes acks, rejects unsent sends with `closed`. */
  close() {
    const wasStopped = this._stopped;
    this._stopped = true;
    this._gen++;
    if (this._hooks) this._hooks();
    this._hooks = null;
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
      // The token is reused until shortly before its exp (or an
      // authentication failure): getToken() is not asked on every reconnect.
      this._tries++;
      token = await this._getToken(!this._token || this._authFailures > 0 || this._tokenExpiring());
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
      // The token as a subprotocol: never in a URL that proxies log.
      ws = this._transport === 'sse' ? new SseSocket(this, token) : new this._WS(this.wsUrl, ['tether.v1', `tether.token.${token}`]);
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
    this._connHigh = new Map();
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
      // Node's `ws` says the status ("Unexpected server response: 404");
      // browsers say nothing, so a rate-limited REST probe asks about 401.
      const m = /server response: (\d{3})/.exec(handshakeError);
      const status = m ? Number(m[1]) : 0;
      if (this._fallBack(status)) {
        this._scheduleReconnect({ code, reason, delay: this._random() * this._o.soonMs });
        return;
      }
      if (status >= 400 && status < 500 && status !== 401 && status !== 429) {
        this._fail(
          new TetherError('config', `the handshake was refused with HTTP ${status}; is ${this.wsUrl} the gateway's?`, {
            status,
          }),
          code,
          reason,
        );
        return;
      }
      if (status === 401) authFailed = true;
      else if (!status && code !== 4000) authFailed = await this._probeUnauthorized();
      if (gen !== this._gen || this._stopped) return;
      if (!authFailed) {
        this._emit(
          'error',
          new TetherError('connect_failed', `could not connect to ${this.wsUrl}: ${handshakeError || `closed with ${code}`}`, {
            cause: handshakeError || undefined,
            status: status || undefined,
            closeCode: code,
          }),
        );
      }
    }
    if (authFailed) {
      this._authFailures++;
      if (typeof this._o.getToken !== 'function' || this._authFailures >= 2) {
        this._fail(new TetherError('unauthorized', 'the server refused the token', { closeCode: code }), code, reason);
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

  /**
   * After a WebSocket that never opened: switches to SSE (when allowed) if
   * something in between refused the upgrade (an HTTP status other than
   * 401/429), or after `sseAfterFailures` failures in a row. The client
   * stays on SSE until close().
   */
  _fallBack(status) {
    if (this._transport !== 'websocket' || !this._transports.includes('sse')) return false;
    this._wsFailures++;
    const refused = status >= 400 && status !== 401 && status !== 429;
    if (!refused && this._wsFailures < this._o.sseAfterFailures) return false;
    this._transport = 'sse';
    this._attempt = 0;
    this._emit('transport', { transport: 'sse', reason: refused ? `WebSocket refused with HTTP ${status}` : `${this._wsFailures} WebSocket failures` });
    return true;
  }

  /** Gives up for good with `err` (final: retrying cannot help). */
  _fail(err, code, reason) {
    this._stopped = true;
    if (this._hooks) this._hooks();
    this._hooks = null;
    this._emit('error', err);
    this._failOutbox(err);
    this._setState('closed', { code, reason, error: err });
  }

  /** After a failed handshake: does the server refuse our token (401)? At most once per probeIntervalMs. */
  async _probeUnauthorized() {
    if (!this._fetch || !this._token) return false;
    if (Date.now() - this._lastProbe < this._o.probeIntervalMs) return false;
    this._lastProbe = Date.now();
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
    return Math.max(this._o.backoffFloorMs, this._random() * exp);
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
        this._wsFailures = 0;
        this._connectTimer = this._cancel(this._connectTimer);
        if (f.user) this.user = f.user;
        this.worker = f.worker || null;
        this._setState('open', { user: f.user, worker: f.worker, transport: this._transport });
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
      case 'truncated': {
        // The server pruned this conversation's history below from_seq
        // (retention): what follows starts there, and is not a gap.
        const c = f.conversation_id;
        const from = f.from_seq;
        if (!Number.isInteger(c) || !Number.isInteger(from)) break;
        this._high.set(c, Math.max(this._high.get(c) || 0, from - 1));
        this._emit('truncated', { conversation_id: c, from_seq: from, conversationId: c, fromSeq: from });
        break;
      }
      case 'presence':
        // Another member's presence (a change, or the state right after synced).
        if (Number.isInteger(f.conversation_id) && typeof f.user === 'string') {
          this._emit('presence', {
            conversation_id: f.conversation_id,
            conversationId: f.conversation_id,
            user: f.user,
            status: f.status === 'online' ? 'online' : 'offline',
            online: f.status === 'online',
            last_seen: f.last_seen ?? null,
            lastSeen: f.last_seen ?? null,
          });
        }
        break;
      case 'typing':
        if (Number.isInteger(f.conversation_id) && typeof f.user === 'string') {
          this._emit('typing', { conversation_id: f.conversation_id, conversationId: f.conversation_id, user: f.user });
        }
        break;
      case 'read':
        if (Number.isInteger(f.conversation_id) && typeof f.user === 'string' && Number.isInteger(f.seq)) {
          this._emit('read', {
            conversation_id: f.conversation_id,
            conversationId: f.conversation_id,
            user: f.user,
            seq: f.seq,
          });
        }
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
    this._connHigh.set(c, Math.max(this._connHigh.get(c) || 0, seq));
    const me = this.user;
    const joinsMe =
      (f.event === 'member.joined' && f.user === me) ||
      (f.event === 'conversation.created' && Array.isArray(f.members) && f.members.includes(me));
    const high = this._high.get(c);
    if (high !== undefined && seq <= high) {
      // A replay from a cursor below what we saw (the last connection ended
      // before the server stored our ack): ack again what was consumed.
      if (!this._left.has(c)) this._scheduleAck();
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
    const pending = this._emit('event', ev);
    if (f.event === 'member.left' && f.user === me) {
      // The server no longer knows us in this conversation: acks would be refused.
      this._left.add(c);
      this._consumed.delete(c);
      return;
    }
    if (!this._o.autoAck) return;
    const prev = this._chains.get(c);
    if (pending.length === 0 && !prev) {
      this._consume(c, seq);
      return;
    }
    // Acked once every listener's promise settled, in order per conversation.
    const chain = (prev || Promise.resolve())
      .then(() => Promise.allSettled(pending))
      .then((settled) => {
        for (const r of settled) {
          if (r.status === 'rejected') {
            this._emit(
              'error',
              new TetherError('listener_failed', `an "event" listener failed on ${c}:${seq}`, {
                cause: r.reason,
                conversationId: c,
                seq,
              }),
            );
          }
        }
        if (this._chains.get(c) === chain) this._chains.delete(c);
        this._consume(c, seq);
      });
    this._chains.set(c, chain);
  }

  /**
   * Acknowledges a conversation up to `seq` (with autoAck:false, after the
   * application has processed it). Clamped to what was delivered; false if
   * nothing was delivered in that conversation.
   */
  ack(conversationId, seq) {
    return this._consume(Number(conversationId), Number(seq));
  }

  _consume(c, seq) {
    const high = this._high.get(c);
    if (high === undefined || !Number.isInteger(seq)) return false;
    if (this._left.has(c)) return true;
    const s = Math.min(seq, high);
    if (s <= (this._consumed.get(c) || 0)) return true;
    this._consumed.set(c, s);
    this._eventsSinceAck++;
    this._scheduleAck();
    return true;
  }

  /** What may be acked in `c` on this connection now (0: nothing). */
  _ackable(c) {
    const seq = Math.min(this._consumed.get(c) || 0, this._connHigh.get(c) || 0);
    return seq > (this._ackSent.get(c) || 0) && !this._left.has(c) ? seq : 0;
  }

  _scheduleAck() {
    if (!this._synced) return;
    if (this._eventsSinceAck >= this._o.ackEvery) this._flushAcks();
    else if (!this._ackTimer) {
      this._ackTimer = this._later(this._o.ackDelayMs, () => {
        this._ackTimer = null;
        this._flushAcks();
      });
    }
  }

  /**
   * Sends one ack per conversation with something new, except where one is
   * in flight (`all`: those too, before a close).
   */
  _flushAcks(all = false) {
    const ws = this._ws;
    if (!this._synced || !ws) return;
    this._ackTimer = this._cancel(this._ackTimer);
    this._eventsSinceAck = 0;
    const batch = [];
    for (const c of this._consumed.keys()) {
      const seq = this._ackable(c);
      if (!seq || (this._ackInflight.has(c) && !all)) continue;
      if (!this._send(ws, { type: 'ack', conversation_id: c, seq })) return;
      this._ackSent.set(c, seq);
      this._ackInflight.add(c);
      batch.push(c);
    }
    if (batch.length === 0) return;
    this._ping(() => {
      if (this._ws !== ws) return;
      for (const c of batch) this._ackInflight.delete(c);
      const more = [...this._consumed.keys()].some((c) => this._ackable(c));
      if (more && !this._ackTimer) {
        this._ackTimer = this._later(this._o.ackDelayMs, () => {
          this._ackTimer = null;
          this._flushAcks();
        });
      }
    });
  }

  // ----- sends ------------------------------------------------------------

  /**
   * Sends a message over the WebSocket. Resolves with `{seq, duplicate,
   * conversation_id, client_msg_id}` (the wire's names, as in events; the
   * camelCase `conversationId`/`clientMsgId` are aliases) once committed;
   * retried with the same client_msg_id across reconnects; rejects with a
   * TetherError on a final error, when the outbox is full, on close(), at
   * once if connect() was never called (`not_connected`), after
   * `timeoutMs` (`timeout`) or when `signal` aborts (`aborted`). A send
   * that timed out or was aborted may still have been stored: retry it with
   * the same `clientMsgId` to find out without making a second event.
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
    if (this._state === 'idle') {
      return Promise.reject(new TetherError('not_connected', 'call connect() before send()'));
    }
    const { signal, timeoutMs } = options;
    if (signal && signal.aborted) {
      return Promise.reject(new TetherError('aborted', 'the send was aborted before it was queued', { cause: signal.reason }));
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
      let timer = null;
      const onAbort = () => giveUp(new TetherError('aborted', 'the send was aborted; it may have been stored', { cause: signal.reason }));
      const settle = () => {
        if (timer) clearTimeout(timer);
        if (signal) signal.removeEventListener('abort', onAbort);
      };
      const entry = {
        id,
        frame,
        bytes,
        resolve: (v) => (settle(), resolve(v)),
        reject: (e) => (settle(), reject(e)),
        inflight: false,
        notBefore: 0,
        attempts: 0,
      };
      const giveUp = (err) => {
        if (this._outbox.get(id) !== entry) return;
        this._outbox.delete(id);
        err.conversationId = c;
        err.clientMsgId = id;
        entry.reject(err);
      };
      if (timeoutMs > 0) {
        timer = setTimeout(
          () => giveUp(new TetherError('timeout', `no answer within ${timeoutMs} ms; it may have been stored`)),
          timeoutMs,
        );
      }
      if (signal) signal.addEventListener('abort', onAbort, { once: true });
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
      conversation_id: f.conversation_id,
      client_msg_id: entry.id,
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

  /** One conversation's view: its events, send, history, back-fill, mark-read. */
  conversation(conversationId) {
    return new Conversation(this, conversationId);
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

  /** POST /v1/conversations: `{id, title, members, seq, history}`. The caller is the owner. */
  createConversation({ members = [], title = '', history } = {}) {
    const body = { members, title };
    if (history) body.history = history;
    return this._http('POST', '/v1/conversations', body);
  }

  /** POST /v1/conversations/{id}/members: `{added, role, seq}` (`role`: member, or admin by the owner). */
  addMember(conversationId, user, { role } = {}) {
    const body = { user };
    if (role) body.role = role;
    return this._http('POST', `/v1/conversations/${encodeURIComponent(conversationId)}/members`, body);
  }

  /** PATCH /v1/conversations/{id}/members/{user}: `{role, changed, seq}` (owner only). */
  setRole(conversationId, user, role) {
    return this._http(
      'PATCH',
      `/v1/conversations/${encodeURIComponent(conversationId)}/members/${encodeURIComponent(user)}`,
      { role },
    );
  }

  /** DELETE /v1/conversations/{id}/members/{user}. */
  removeMember(conversationId, user) {
    return this._http(
      'DELETE',
      `/v1/conversations/${encodeURIComponent(conversationId)}/members/${encodeURIComponent(user)}`,
    );
  }

  /**
   * Tells the other members this user is typing in `conversationId` (the
   * server forwards it at most once every 2 s; members only). False when
   * not connected (typing is ephemeral: nothing is queued).
   */
  typing(conversationId) {
    if (!this._synced || !this._ws) return false;
    return this._send(this._ws, { type: 'typing', conversation_id: Number(conversationId) });
  }

  /** GET /v1/conversations/{id}/presence: `{members: [{user, status, last_seen, read_seq}]}`. */
  presence(conversationId) {
    return this._http('GET', `/v1/conversations/${encodeURIComponent(conversationId)}/presence`);
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

/**
 * One conversation over a client (as Centrifugo subscriptions or Phoenix
 * channels): the client-wide stream stays the one source of events (one
 * order, one ack path); this narrows it.
 */
/**
 * The SSE transport, shaped like a WebSocket for the client (readyState,
 * send, close, on*): it reads `GET /v1/sse` (an EventSource with a one-time
 * ticket, never the token in the URL; or, where there is no EventSource, a
 * fetch stream with the token in the header) and turns what the client
 * writes into HTTP: a `send` into POST .../messages, answered with the
 * `sent` or `error` frame the WebSocket would have sent (same
 * client_msg_id, so the same retry rules); an `ack` into POST .../cursor
 * (the client already coalesces them); a `ping` into a `pong` once the
 * acks before it are done. `event: draining`, then the end of the stream,
 * closes it as 1001 does a WebSocket (`event: resync`, as 1013).
 */
class SseSocket {
  constructor(client, token) {
    this.readyState = 0;
    this._c = client;
    this._token = token;
    this._acks = Promise.resolve();
    // Set by `event: draining` (1001) or `event: resync` (1013): the
    // server ends the stream and wants us back at once.
    this._endCode = 1006;
    // When the stream last said anything (the server pings every 15 s).
    this._heard = Date.now();
    this._es = null;
    this._ctl = null;
    this.onopen = this.onmessage = this.onerror = this.onclose = null;
    // After the client has set the handlers.
    Promise.resolve().then(() => this._start());
  }

  _http(method, path, body) {
    return this._c._fetch(`${this._c.httpUrl}${path}`, {
      method,
      headers: { authorization: `Bearer ${this._token}`, 'content-type': 'application/json' },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  }

  _frame(f) {
    if (this.readyState !== 3 && this.onmessage) this.onmessage({ data: typeof f === 'string' ? f : JSON.stringify(f) });
  }

  _end(code, reason, error) {
    if (this.readyState === 3) return;
    this.readyState = 3;
    if (this._es) this._es.close();
    if (this._ctl) this._ctl.abort();
    if (error && this.onerror) this.onerror({ message: error });
    if (this.onclose) this.onclose({ code, reason });
  }

  _onData(name, data) {
    if (this.readyState === 3) return;
    this._heard = Date.now();
    if (name === 'draining' || name === 'resync') {
      this._endCode = name === 'draining' ? 1001 : 1013;
      return;
    }
    if (name === 'hello' && this.readyState === 0) {
      this.readyState = 1;
      if (this.onopen) this.onopen();
    }
    this._frame(data);
  }

  async _start() {
    const ES = this._c._o.EventSource || globalThis.EventSource;
    const url = `${this._c.httpUrl}/v1/sse`;
    const ended = () => this._end(this._endCode, 'event stream ended');
    try {
      if (!this._c._fetch) throw new Error('SSE needs fetch');
      if (ES) {
        const r = await this._http('POST', '/v1/sse/tickets', {});
        if (r.status !== 200) return this._end(1006, '', `Unexpected server response: ${r.status}`);
        const { ticket } = await r.json();
        if (this.readyState === 3) return;
        const es = (this._es = new ES(`${url}?ticket=${encodeURIComponent(ticket)}`));
        // `failure` is the WebSocket's `error` frame (`error` is EventSource's own event).
        for (const name of ['hello', 'event', 'synced', 'failure', 'truncated', 'presence', 'typing', 'read', 'ping', 'draining', 'resync']) {
          es.addEventListener(name, (m) => this._onData(name, m.data));
        }
        // A ticket opens one stream: no EventSource reconnects, the client does.
        es.onerror = ended;
        return;
      }
      this._ctl = new AbortController();
      const r = await this._c._fetch(url, {
        headers: { authorization: `Bearer ${this._token}`, accept: 'text/event-stream' },
        signal: this._ctl.signal,
      });
      if (r.status !== 200) return this._end(1006, '', `Unexpected server response: ${r.status}`);
      const reader = r.body.getReader();
      const dec = new TextDecoder();
      let buf = '';
      for (;;) {
        const { done, value } = await reader.read();
        if (done) break;
        buf += dec.decode(value, { stream: true });
        for (let i; (i = buf.indexOf('\n\n')) >= 0; ) {
          const block = buf.slice(0, i);
          buf = buf.slice(i + 2);
          let name = 'message';
          const data = [];
          for (const line of block.split('\n')) {
            if (line.startsWith('event:')) name = line.slice(6).trim();
            else if (line.startsWith('data:')) data.push(line.slice(5).replace(/^ /, ''));
          }
          if (data.length) this._onData(name, data.join('\n'));
        }
      }
      ended();
    } catch (e) {
      this._end(1006, '', String((e && e.message) || e));
    }
  }

  send(text) {
    if (this.readyState !== 1) throw new Error('the event stream is not open');
    const f = JSON.parse(text);
    if (f.type === 'send') this._post(f);
    else if (f.type === 'ack') {
      const path = `/v1/conversations/${f.conversation_id}/cursor`;
      this._acks = this._acks.then(() => this._http('POST', path, { seq: f.seq }).catch(() => {}));
    } else if (f.type === 'typing') {
      this._http('POST', `/v1/conversations/${f.conversation_id}/typing`).catch(() => {});
    } else if (f.type === 'ping') {
      // Answered once the acks before it are done, and only while the
      // stream is heard from: the client's heartbeat then drops a stream
      // that went silent (a half-open connection), as it drops a WebSocket.
      this._acks = this._acks.then(() => {
        if (Date.now() - this._heard < 30000) this._frame({ type: 'pong' });
      });
    }
  }

  async _post(f) {
    const ids = { client_msg_id: f.client_msg_id, conversation_id: f.conversation_id };
    let frame;
    try {
      const r = await this._http('POST', `/v1/conversations/${f.conversation_id}/messages`, { body: f.body, client_msg_id: f.client_msg_id });
      const b = await r.json().catch(() => ({}));
      if (r.status === 200 || r.status === 201) frame = { type: 'sent', ...ids, seq: b.seq, duplicate: r.status === 200 };
      else {
        // What a proxy says without the contract's body: retried, like a lost connection.
        const code = b.error || (r.status >= 500 ? 'unavailable' : `http_${r.status}`);
        frame = { type: 'error', ...ids, code, message: b.message || `HTTP ${r.status}`, retry_after: b.retry_after ?? (b.error ? undefined : 1) };
      }
    } catch (e) {
      frame = { type: 'error', ...ids, code: 'unavailable', message: `send failed: ${e && e.message}`, retry_after: 1 };
    }
    this._frame(frame);
  }

  close() {
    this._end(1000, 'client closed');
  }
}

export class Conversation {
  constructor(client, conversationId) {
    const id = Number(conversationId);
    if (!Number.isInteger(id) || id <= 0) throw new TypeError('conversationId must be a positive integer');
    this.client = client;
    this.id = id;
    this._offs = new Set();
  }

  /**
   * `message` (message.created events), `event` (all of this
   * conversation's), `gap` (a gap reported here). Returns an unsubscribe
   * function. With autoAck, an async listener's promise is awaited before
   * the event is acknowledged, as for the client's own listeners.
   */
  on(name, fn) {
    let off;
    if (name === 'gap') {
      off = this.client.on('error', (e) => (e.code === 'gap' && e.conversationId === this.id ? fn(e) : undefined));
    } else if (name === 'event' || name === 'message') {
      off = this.client.on('event', (e) =>
        e.conversation_id === this.id && (name === 'event' || e.event === 'message.created') ? fn(e) : undefined,
      );
    } else {
      throw new TypeError(`unknown conversation event ${name} (message, event, gap)`);
    }
    this._offs.add(off);
    return () => {
      this._offs.delete(off);
      off();
    };
  }

  /** Removes every listener added through this view. */
  off() {
    for (const off of this._offs) off();
    this._offs.clear();
  }

  /** See TetherClient.send. */
  send(body, options) {
    return this.client.send(this.id, body, options);
  }

  /** A page of history: `{beforeSeq}` newest first (default), `{afterSeq}` oldest first. */
  history(options = {}) {
    return this.client.eventsPage(this.id, options);
  }

  /** Every event in `from..to`, oldest first: what a `gap` reported missing. */
  async backfill(from, to) {
    const out = [];
    let after = from - 1;
    while (after < to) {
      const page = await this.client.eventsPage(this.id, { afterSeq: after, limit: 200 });
      for (const e of page.events) if (e.seq <= to) out.push(e);
      if (page.next_after_seq == null || page.next_after_seq <= after) break;
      after = page.next_after_seq;
    }
    return out;
  }

  /** Marks read up to `seq` (the server's cursor, and so `unread`). */
  markRead(seq) {
    return this.client.ack(this.id, seq);
  }

  /** The highest seq seen here. */
  get lastSeq() {
    return this.client.lastSeq(this.id);
  }
}

export default TetherClient;
