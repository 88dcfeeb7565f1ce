// The SDK's own logic against a scripted fake WebSocket (no server): dedupe
// and gaps, ack coalescing with one ack in flight, backoff bounds, the auth
// retry, the outbox, final and retryable send errors. The end-to-end tests
// against the real binaries are in e2e.test.js and drain.test.js.

import assert from 'node:assert/strict';
import { test } from 'node:test';
import { TetherClient, TetherError, tokenUser, uuid } from '../src/index.js';
import { mintToken, waitFor } from '../test-support/harness.js';

/** A WebSocket the test plays the server of. */
class FakeWS {
  static all = [];
  constructor(url, protocols) {
    this.url = url;
    this.protocols = protocols;
    this.readyState = 0;
    this.sent = [];
    FakeWS.all.push(this);
  }
  send(text) {
    if (this.readyState !== 1) throw new Error('not open');
    this.sent.push(JSON.parse(text));
  }
  close(code = 1005) {
    if (this.readyState === 3) return;
    this.readyState = 3;
    setTimeout(() => this.onclose && this.onclose({ code, reason: '' }), 0);
  }
  // --- the server's side
  accept(user = 'alice', worker = 'w1') {
    this.readyState = 1;
    this.onopen && this.onopen({});
    this.frame({ type: 'hello', user, worker });
  }
  frame(obj) {
    this.onmessage && this.onmessage({ data: JSON.stringify(obj) });
  }
  drop(code = 1006, reason = '') {
    this.readyState = 3;
    this.onclose && this.onclose({ code, reason });
  }
  refuse(status = 401) {
    this.readyState = 3;
    this.onerror && this.onerror({ message: `Unexpected server response: ${status}` });
    this.onclose && this.onclose({ code: 1006, reason: '' });
  }
  sentOf(type) {
    return this.sent.filter((f) => f.type === type);
  }
}

function fresh() {
  FakeWS.all = [];
}

const latest = () => FakeWS.all[FakeWS.all.length - 1];

function ev(c, seq, extra = {}) {
  return {
    type: 'event',
    event: 'message.created',
    conversation_id: c,
    seq,
    sender: 'bob',
    created_at: '2026-01-01T00:00:00.000000Z',
    body: `m${seq}`,
    client_msg_id: `id${seq}`,
    ...extra,
  };
}

function client(opts = {}) {
  return new TetherClient({
    url: 'http://gateway.test:8080',
    token: mintToken('alice'),
    WebSocket: FakeWS,
    fetch: async () => ({ status: 200 }),
    backoffBaseMs: 20,
    backoffCapMs: 200,
    soonMs: 30,
    heartbeatMs: 0,
    ...opts,
  });
}

async function connected(c, user = 'alice') {
  const before = FakeWS.all.length;
  c.connect();
  await waitFor(() => FakeWS.all.length > before, { what: 'a socket' });
  latest().accept(user);
  return latest();
}

test('helpers: uuid, tokenUser, URLs', { timeout: 30000 }, () => {
  assert.match(uuid(), /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
  assert.equal(tokenUser(mintToken('bob@x.org')), 'bob@x.org');
  assert.equal(tokenUser('garbage'), null);
  const c = client({ url: 'https://chat.example.com/base/' });
  assert.equal(c.wsUrl, 'wss://chat.example.com/base/v1/ws');
  assert.equal(c.httpUrl, 'https://chat.example.com/base');
  const d = client({ url: 'ws://127.0.0.1:9/v1/ws' });
  assert.equal(d.httpUrl, 'http://127.0.0.1:9');
  assert.throws(() => new TetherClient({ url: 'http://x', WebSocket: FakeWS }), /token/);
});

test('the token is offered as a subprotocol, never in the URL; events are delivered once, in order; a gap is an error', { timeout: 30000 }, async () => {
  fresh();
  const c = client();
  const seen = [];
  const errors = [];
  c.on('event', (e) => seen.push(`${e.conversation_id}:${e.seq}`));
  c.on('error', (e) => errors.push(e));
  const ws = await connected(c);
  assert.equal(ws.url, 'ws://gateway.test:8080/v1/ws');
  assert.equal(ws.protocols[0], 'tether.v1');
  assert.match(ws.protocols[1], /^tether\.token\.ey/);
  ws.frame(ev(1, 1));
  ws.frame(ev(1, 2));
  ws.frame(ev(1, 2)); // duplicate
  ws.frame(ev(1, 1)); // older
  ws.frame(ev(2, 7)); // first sight of conversation 2: no gap
  ws.frame({ type: 'synced' });
  ws.frame(ev(1, 3));
  ws.frame(ev(1, 5)); // gap: 4 is missing
  assert.deepEqual(seen, ['1:1', '1:2', '2:7', '1:3', '1:5']);
  assert.equal(errors.length, 1);
  assert.equal(errors[0].code, 'gap');
  assert.equal(errors[0].conversationId, 1);
  assert.equal(errors[0].expected, 4);
  assert.equal(errors[0].got, 5);
  assert.equal(c.lastSeq(1), 5);
  c.close();
});

test('leaving and re-joining a conversation is not a gap', { timeout: 30000 }, async () => {
  fresh();
  const c = client();
  const errors = [];
  c.on('error', (e) => errors.push(e));
  const ws = await connected(c);
  ws.frame({ type: 'synced' });
  ws.frame(ev(3, 1));
  ws.frame(ev(3, 2, { event: 'member.left', user: 'alice', body: undefined }));
  ws.frame(ev(3, 9, { event: 'member.joined', user: 'alice', body: undefined }));
  assert.equal(errors.length, 0);
  c.close();
});

test('truncated: history pruned by the server is announced, and what follows is not a gap', { timeout: 30000 }, async () => {
  fresh();
  const c = client();
  const errors = [];
  const truncated = [];
  const seen = [];
  c.on('error', (e) => errors.push(e));
  c.on('truncated', (t) => truncated.push(t));
  c.on('event', (e) => seen.push(`${e.conversation_id}:${e.seq}`));
  const ws = await connected(c);
  ws.frame(ev(4, 2));
  ws.frame({ type: 'truncated', conversation_id: 4, from_seq: 16 });
  ws.frame(ev(4, 16));
  ws.frame({ type: 'truncated', conversation_id: 5, from_seq: 3 }); // first sight
  ws.frame(ev(5, 3));
  ws.frame({ type: 'synced' });
  assert.deepEqual(seen, ['4:2', '4:16', '5:3']);
  assert.equal(errors.length, 0);
  assert.deepEqual(truncated.map((t) => [t.conversationId, t.fromSeq]), [[4, 16], [5, 3]]);
  assert.equal(c.lastSeq(4), 16);
  c.close();
});

test('acks are coalesced: every N events or after a delay, one in flight per conversation', { timeout: 30000 }, async () => {
  fresh();
  const c = client({ ackEvery: 5, ackDelayMs: 40 });
  const ws = await connected(c);
  for (let s = 1; s <= 3; s++) ws.frame(ev(1, s)); // backlog: nothing acked before synced
  assert.equal(ws.sentOf('ack').length, 0);
  ws.frame({ type: 'synced' });
  // At synced the backlog is acked at once, with a ping behind it.
  assert.deepEqual(ws.sentOf('ack'), [{ type: 'ack', conversation_id: 1, seq: 3 }]);
  assert.equal(ws.sentOf('ping').length, 1);
  // While that ack is in flight (no pong yet) nothing more is acked for 1 ...
  for (let s = 4; s <= 12; s++) ws.frame(ev(1, s));
  ws.frame(ev(2, 1));
  await waitFor(() => ws.sentOf('ack').length === 2, { what: 'the ack of conversation 2' });
  assert.deepEqual(ws.sentOf('ack')[1], { type: 'ack', conversation_id: 2, seq: 1 });
  await new Promise((r) => setTimeout(r, 80));
  assert.equal(ws.sentOf('ack').length, 2, 'no second ack while one is in flight');
  // ... until the pong: then one ack with the highest seq.
  ws.frame({ type: 'pong' });
  ws.frame({ type: 'pong' });
  await waitFor(() => ws.sentOf('ack').length === 3, { what: 'the coalesced ack' });
  assert.deepEqual(ws.sentOf('ack')[2], { type: 'ack', conversation_id: 1, seq: 12 });
  c.close();
});

test('a replay below what was seen re-acks the highest seq on the new connection', { timeout: 30000 }, async () => {
  fresh();
  const c = client({ ackDelayMs: 10 });
  let ws = await connected(c);
  ws.frame({ type: 'synced' });
  for (let s = 1; s <= 4; s++) ws.frame(ev(1, s));
  ws.drop(1006);
  await waitFor(() => FakeWS.all.length === 2, { what: 'a reconnect' });
  ws = latest();
  ws.accept();
  ws.frame(ev(1, 3)); // the server's cursor was 2
  ws.frame(ev(1, 4));
  ws.frame({ type: 'synced' });
  assert.deepEqual(ws.sentOf('ack'), [{ type: 'ack', conversation_id: 1, seq: 4 }]);
  c.close();
});

test('backoff: full jitter, bounded by the cap, soon after 1001 and 1013, never zero-spaced loops', { timeout: 30000 }, async () => {
  fresh();
  const delays = [];
  const c = client({ random: () => 1, backoffBaseMs: 10, backoffCapMs: 80, soonMs: 25 });
  c.on('state', (s) => s.state === 'reconnecting' && delays.push([s.delay, s.code]));
  c.connect();
  for (let i = 1; i <= 6; i++) {
    await waitFor(() => FakeWS.all.length === i, { what: `attempt ${i}` });
    latest().drop(1006);
  }
  await waitFor(() => delays.length === 6, { what: 'six reconnect states' });
  // random() == 1: the upper bound of each window, doubling up to the cap.
  assert.deepEqual(
    delays.map((d) => d[0]),
    [10, 20, 40, 80, 80, 80],
  );
  // A connection that lived a while and was told 1001: soon.
  await waitFor(() => FakeWS.all.length === 7, { what: 'attempt 7' });
  const ws = latest();
  ws.accept();
  ws.frame({ type: 'synced' });
  c._openedAt -= 5000; // as if it had been up for five seconds
  ws.drop(1001, 'server draining; reconnect');
  await waitFor(() => delays.length === 7, { what: 'the reconnect after 1001' });
  assert.deepEqual(delays[6], [25, 1001]);
  c.close();

  // With real jitter every delay lies in [0, window].
  fresh();
  const d2 = [];
  const c2 = client({ backoffBaseMs: 10, backoffCapMs: 40 });
  c2.on('state', (s) => s.state === 'reconnecting' && d2.push(s.delay));
  c2.connect();
  for (let i = 1; i <= 5; i++) {
    await waitFor(() => FakeWS.all.length === i, { what: `attempt ${i}` });
    latest().drop(1006);
  }
  await waitFor(() => d2.length === 5, { what: 'five delays' });
  d2.forEach((d, i) => assert.ok(d >= 0 && d <= Math.min(40, 10 * 2 ** i), `delay ${i} = ${d}`));
  c2.close();
});

test('1008: getToken() is asked once more, then the client gives up', { timeout: 30000 }, async () => {
  fresh();
  let calls = 0;
  const c = client({ token: undefined, getToken: async () => mintToken('alice', { ttl: 60 + ++calls }) });
  const states = [];
  c.on('state', (s) => states.push(s.state));
  const errors = [];
  c.on('error', (e) => errors.push(e.code));
  c.connect();
  const pending = c.send(1, 'never sent');
  await waitFor(() => FakeWS.all.length === 1, { what: 'a socket' });
  latest().accept();
  latest().drop(1008, 'policy');
  await waitFor(() => FakeWS.all.length === 2, { what: 'the retry with a new token' });
  assert.equal(calls, 2);
  assert.notEqual(FakeWS.all[0].protocols[1], FakeWS.all[1].protocols[1], 'a fresh token');
  latest().refuse(401); // a refused handshake counts the same
  await assert.rejects(pending, (e) => e instanceof TetherError && e.code === 'unauthorized');
  assert.equal(c.state, 'closed');
  assert.deepEqual(errors, ['unauthorized']);
  assert.equal(calls, 2);
  assert.equal(FakeWS.all.length, 2);

  // A static token that is refused: no second try.
  fresh();
  const d = client();
  const closed = new Promise((r) => d.on('state', (s) => s.state === 'closed' && r(s)));
  d.connect();
  await waitFor(() => FakeWS.all.length === 1, { what: 'a socket' });
  latest().refuse(401);
  const s = await closed;
  assert.equal(s.error.code, 'unauthorized');
  assert.equal(FakeWS.all.length, 1);
});

test('a refused handshake in a browser (no status) is classified by a probe', { timeout: 30000 }, async () => {
  fresh();
  let probes = 0;
  const c = client({
    fetch: async (url, opts) => {
      probes++;
      assert.match(url, /\/v1\/conversations\?limit=1$/);
      assert.match(opts.headers.authorization, /^Bearer ey/);
      return { status: 401 };
    },
  });
  const done = new Promise((r) => c.on('state', (s) => s.state === 'closed' && r(s)));
  c.connect();
  await waitFor(() => FakeWS.all.length === 1, { what: 'a socket' });
  latest().drop(1006); // no error message at all
  const s = await done;
  assert.equal(s.error.code, 'unauthorized');
  assert.equal(probes, 1);
});

test('send: queued until synced, retried with the same client_msg_id after a reconnect', { timeout: 30000 }, async () => {
  fresh();
  const c = client();
  await assert.rejects(c.send(4, 'too early'), (e) => e.code === 'not_connected');
  c.connect();
  const p = c.send(4, 'hello');
  let ws = await connected(c);
  assert.equal(ws.sentOf('send').length, 0, 'nothing sent before synced');
  ws.frame({ type: 'synced' });
  const [first] = ws.sentOf('send');
  assert.equal(first.conversation_id, 4);
  assert.equal(first.body, 'hello');
  ws.drop(1006); // lost before `sent`
  await waitFor(() => FakeWS.all.length === 2, { what: 'a reconnect' });
  ws = latest();
  ws.accept();
  ws.frame({ type: 'synced' });
  const [again] = ws.sentOf('send');
  assert.equal(again.client_msg_id, first.client_msg_id);
  ws.frame({ type: 'sent', client_msg_id: first.client_msg_id, conversation_id: 4, seq: 17, duplicate: true });
  assert.deepEqual(await p, {
    seq: 17,
    duplicate: true,
    conversation_id: 4,
    client_msg_id: first.client_msg_id,
    conversationId: 4,
    clientMsgId: first.client_msg_id,
  });
  c.close();
});

test('send: final errors reject, retryable ones honour retry_after', { timeout: 30000 }, async () => {
  fresh();
  const c = client();
  const ws = await connected(c);
  ws.frame({ type: 'synced' });
  const bad = c.send(9, 'x');
  const limited = c.send(9, 'y');
  const [s1, s2] = ws.sentOf('send');
  ws.frame({ type: 'error', code: 'not_found', message: 'conversation 9 not found', client_msg_id: s1.client_msg_id });
  await assert.rejects(bad, (e) => e.code === 'not_found' && e.clientMsgId === s1.client_msg_id && e.conversationId === 9);
  const t0 = Date.now();
  ws.frame({ type: 'error', code: 'rate_limited', message: 'slow down', client_msg_id: s2.client_msg_id, retry_after: 1 });
  await waitFor(() => ws.sentOf('send').length === 3, { what: 'the retry', timeout: 5000 });
  assert.ok(Date.now() - t0 >= 1000, 'waited retry_after');
  assert.equal(ws.sentOf('send')[2].client_msg_id, s2.client_msg_id);
  ws.frame({ type: 'error', code: 'database_unavailable', message: 'later', client_msg_id: s2.client_msg_id, retry_after: 1 });
  await waitFor(() => ws.sentOf('send').length === 4, { what: 'the second retry', timeout: 5000 });
  ws.frame({ type: 'sent', client_msg_id: s2.client_msg_id, conversation_id: 9, seq: 3, duplicate: false });
  assert.equal((await limited).seq, 3);
  c.close();
});

test('send: a bounded outbox with a clear error, and close() rejects what is left', { timeout: 30000 }, async () => {
  fresh();
  const c = client({ outboxLimit: 3 });
  c.connect();
  const ps = [c.send(1, 'a'), c.send(1, 'b'), c.send(1, 'c')];
  await assert.rejects(c.send(1, 'd'), (e) => e.code === 'outbox_full' && /outbox full/.test(e.message));
  await assert.rejects(c.send(0, 'x'), (e) => e.code === 'invalid_field');
  await assert.rejects(c.send(1, 'x'.repeat(300 * 1024)), (e) => e.code === 'payload_too_large');
  assert.equal(c.pending, 3);
  c.close();
  for (const p of ps) await assert.rejects(p, (e) => e.code === 'closed');
  await assert.rejects(c.send(1, 'late'), (e) => e.code === 'closed');
});

test('a silent connection is abandoned by the heartbeat', { timeout: 30000 }, async () => {
  fresh();
  const c = client({ heartbeatMs: 60, heartbeatTimeoutMs: 60 });
  const states = [];
  c.on('state', (s) => states.push(s));
  const ws = await connected(c);
  ws.frame({ type: 'synced' });
  await waitFor(() => ws.sentOf('ping').length >= 1, { what: 'a heartbeat ping' });
  await waitFor(() => FakeWS.all.length === 2, { what: 'the reconnect after the heartbeat timeout' });
  assert.ok(states.some((s) => s.state === 'reconnecting' && s.reason === 'heartbeat timeout'));
  c.close();
});

test('the 401 probe after failed handshakes is rate-limited', { timeout: 30000 }, async () => {
  fresh();
  let probes = 0;
  const c = client({
    fetch: async () => {
      probes++;
      return { status: 200 }; // not a token problem
    },
    backoffBaseMs: 5,
    backoffCapMs: 5,
    backoffFloorMs: 5,
  });
  const failures = [];
  c.on('error', (e) => e.code === 'connect_failed' && failures.push(e));
  c.connect();
  for (let n = 1; n <= 5; n++) {
    await waitFor(() => FakeWS.all.length === n, { what: `attempt ${n}` });
    latest().drop(1006); // a browser learns nothing about why
    await waitFor(() => failures.length === n, { what: `failure ${n} reported` });
  }
  assert.equal(probes, 1, 'one probe per probeIntervalMs, not one per failed handshake');
  c.close();
});

test('a browser coming back online reconnects at once', { timeout: 30000 }, async () => {
  fresh();
  const target = new EventTarget();
  globalThis.addEventListener = target.addEventListener.bind(target);
  globalThis.removeEventListener = target.removeEventListener.bind(target);
  try {
    const c = client({ backoffBaseMs: 60000, backoffCapMs: 60000, backoffFloorMs: 60000 });
    c.connect();
    await waitFor(() => FakeWS.all.length === 1, { what: 'a socket' });
    latest().refuse(503);
    await waitFor(() => c.state === 'reconnecting', { what: 'a minute of backoff' });
    target.dispatchEvent(new Event('online'));
    await waitFor(() => FakeWS.all.length === 2, { what: 'the reconnect the online event triggers' });
    c.close();
    // A reconnect would set the state to `connecting` synchronously.
    target.dispatchEvent(new Event('online'));
    assert.equal(c.state, 'closed', 'a closed client ignores it (the listener is gone)');
  } finally {
    delete globalThis.addEventListener;
    delete globalThis.removeEventListener;
  }
});
