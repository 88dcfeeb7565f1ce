// The SDK over Server-Sent Events, against the real `tether` supervisor (two
// workers) and a throwaway PostgreSQL. Node has no EventSource before 22: the
// SDK reads the stream with fetch (token in the header); the browser test
// (tests/browser/) covers EventSource and its one-time tickets.
//
// - transports: ['sse']: two clients chat; acks move the server's cursor
//   over POST .../cursor (and are read receipts); typing over POST; a worker SIGKILLed under the SSE client while 120
//   messages are sent: every send resolves, each event once, in order;
// - transports: ['websocket', 'sse']: a WebSocket refused by a proxy (an
//   HTTP status) falls back at once; one that just fails, after
//   `sseAfterFailures` attempts.

import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { TetherClient } from '../src/index.js';
import { Cluster, Pg, mintToken, waitFor } from '../test-support/harness.js';

let pg;
let cluster;
const clients = [];

before(async () => {
  pg = await Pg.start();
  cluster = await Cluster.start({ pg, workers: 2 });
});

after(async () => {
  for (const c of clients) c.close();
  if (cluster) await cluster.stop();
  if (pg) pg.stop();
});

/** A WebSocket that never gets through, as behind a proxy that refuses it. */
function blockedWebSocket(status, made) {
  return class {
    constructor() {
      made.push(status);
      this.readyState = 0;
      setTimeout(() => {
        this.readyState = 3;
        if (this.onerror) this.onerror({ message: status ? `Unexpected server response: ${status}` : 'socket hang up' });
        if (this.onclose) this.onclose({ code: 1006, reason: '' });
      }, 5);
    }
    send() {
      throw new Error('not open');
    }
    close() {}
  };
}

function makeClient(user, client = {}) {
  const rec = { events: [], states: [], errors: [], transports: [] };
  const c = new TetherClient({
    url: cluster.base,
    token: mintToken(user),
    transports: ['sse'],
    backoffBaseMs: 50,
    backoffCapMs: 1000,
    connectTimeoutMs: 5000,
    ackDelayMs: 50,
    ...client,
  });
  const last = new Map();
  c.on('event', (e) => {
    const prev = last.get(e.conversation_id) ?? 0;
    if (e.seq !== prev + 1 && prev !== 0) rec.errors.push(new Error(`${user}: event ${e.conversation_id}:${e.seq} after ${prev}`));
    last.set(e.conversation_id, e.seq);
    rec.events.push(e);
  });
  c.on('state', (s) => rec.states.push(s));
  c.on('error', (e) => rec.errors.push(e));
  c.on('transport', (t) => rec.transports.push(t));
  clients.push(c);
  c.rec = rec;
  c.messages = (conv) => rec.events.filter((e) => e.conversation_id === conv && e.event === 'message.created');
  return c;
}

test('over SSE: chat, acks move the cursor, a worker SIGKILLed under the stream loses nothing', { timeout: 120000 }, async () => {
  const sam = makeClient('sam');
  const rita = makeClient('rita');
  sam.connect();
  rita.connect();
  await Promise.all([sam.whenSynced(), rita.whenSynced()]);
  assert.equal(rita.transport, 'sse');
  assert.equal(rita.rec.states.find((s) => s.state === 'open').transport, 'sse');
  // Listening from the start: the receipt of rita's first ack may come
  // before the cursor check below returns.
  const typings = [];
  const reads = [];
  rita.on('typing', (t) => typings.push(t));
  sam.on('read', (r) => reads.push(r));
  const { id } = await sam.createConversation({ members: ['rita'], title: 'sse' });
  const first = await sam.send(id, 'hello over SSE');
  assert.equal(first.duplicate, false);
  await waitFor(() => rita.messages(id).some((e) => e.body === 'hello over SSE'), { what: 'rita to get it' });
  // Acks go over POST .../cursor: the server's cursor follows.
  await waitFor(
    async () => {
      const page = await rita.listConversations();
      return page.conversations.find((c) => c.id === id)?.cursor === first.seq;
    },
    { what: "rita's cursor to reach the message" },
  );
  // Typing goes over POST .../typing, and an ack over POST .../cursor is a
  // read receipt: both reach the other member's stream.
  assert.equal(sam.typing(id), true);
  await waitFor(() => typings.some((t) => t.user === 'sam' && t.conversationId === id), { what: "sam's typing at rita" });
  await waitFor(() => reads.some((r) => r.user === 'rita' && r.conversationId === id && r.seq >= first.seq), {
    what: "rita's read receipt at sam",
  });
  // The same client_msg_id again: the first event, not a second one.
  const again = await sam.send(id, 'hello over SSE', { clientMsgId: first.client_msg_id });
  assert.deepEqual([again.seq, again.duplicate], [first.seq, true]);

  const N = 120;
  const results = [];
  let resolved = 0;
  const killer = (async () => {
    await waitFor(() => resolved >= 40, { timeout: 60000, what: '40 sends' });
    return cluster.killWorkerServing(rita);
  })();
  const sends = [];
  for (let i = 0; i < N; i++) {
    if (i >= 20) await sends[i - 20];
    sends.push(
      sam.send(id, `msg ${i}`).then((r) => {
        results[i] = r;
        resolved++;
      }),
    );
  }
  await Promise.all(sends);
  const killed = await killer;
  assert.equal(new Set(results.map((r) => r.seq)).size, N);
  const dbRows = pg
    .query(`SELECT seq || ':' || body FROM events WHERE conversation_id = ${id} AND type = 'message.created' ORDER BY seq`)
    .split('\n');
  assert.equal(dbRows.length, N + 1);
  await waitFor(() => rita.messages(id).length >= N + 1, { timeout: 60000, what: 'rita to receive everything' });
  assert.deepEqual(
    rita.messages(id).map((e) => `${e.seq}:${e.body}`),
    dbRows,
  );
  assert.ok(rita.rec.states.some((s) => s.state === 'reconnecting'), 'rita was cut off and came back');
  assert.notEqual(rita.worker, killed.worker);
  assert.deepEqual(rita.rec.errors, []);
  assert.deepEqual(sam.rec.errors, []);
});

test('a WebSocket refused by a proxy falls back to SSE at once; one that just fails, after sseAfterFailures', { timeout: 60000 }, async () => {
  const made = [];
  const refused = makeClient('pat', { transports: ['websocket', 'sse'], WebSocket: blockedWebSocket(403, made) });
  refused.connect();
  await refused.whenSynced();
  assert.equal(refused.transport, 'sse');
  assert.equal(made.length, 1, 'one refused WebSocket is enough');
  assert.match(refused.rec.transports[0].reason, /403/);

  const lost = [];
  const flaky = makeClient('flo', {
    transports: ['websocket', 'sse'],
    WebSocket: blockedWebSocket(0, lost),
    sseAfterFailures: 2,
    probeIntervalMs: 0,
  });
  flaky.connect();
  await flaky.whenSynced();
  assert.equal(flaky.transport, 'sse');
  assert.equal(lost.length, 2);
  // Only the WebSocket: no fall-back, however often it fails.
  const none = [];
  const stuck = makeClient('sid', { transports: ['websocket'], WebSocket: blockedWebSocket(0, none), probeIntervalMs: 0 });
  stuck.connect();
  await waitFor(() => none.length >= 4, { what: 'four WebSocket attempts' });
  assert.equal(stuck.transport, 'websocket');
  assert.equal(stuck.synced, false);
  // And they chat.
  const { id } = await refused.createConversation({ members: ['flo'] });
  await refused.send(id, 'through the proxy');
  await waitFor(() => flaky.messages(id).some((e) => e.body === 'through the proxy'), { what: 'flo to get it' });
});
