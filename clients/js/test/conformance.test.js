// The SDK conformance scenarios of docs/SDK.md that concern consumption,
// failures and configuration, run by the JS SDK against the real `tether`
// supervisor (two workers) and a throwaway PostgreSQL (the Rust client runs
// the same list in client/tests/conformance.rs):
//
// - resume after a partial consume: an app that consumed 100 of 300 events
//   (async listeners; then manual acks) resumes at exactly event 101;
// - configuration errors are final at once; a refused connection says why
//   (connect_failed with its cause); send() rejects when never connected,
//   on timeout and on abort; reconnectNow() skips the backoff;
// - a valid token is reused across reconnects;
// - the per-conversation view: messages, send, history both ways, back-fill,
//   mark-read.

import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import WebSocket from 'ws';
import { TetherClient, TetherError } from '../src/index.js';
import { Cluster, Pg, freePort, getJson, mintToken, waitFor } from '../test-support/harness.js';

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

function makeClient(user, opts = {}) {
  const rec = { errors: [], states: [], getTokenCalls: 0 };
  const c = new TetherClient({
    url: cluster.base,
    getToken: async () => {
      rec.getTokenCalls++;
      return mintToken(user);
    },
    WebSocket,
    backoffBaseMs: 50,
    backoffCapMs: 500,
    ackDelayMs: 50,
    ...opts,
  });
  c.on('error', (e) => rec.errors.push(e));
  c.on('state', (s) => rec.states.push(s.state));
  c.rec = rec;
  clients.push(c);
  return c;
}

const auth = (user) => ({ authorization: `Bearer ${mintToken(user)}` });

/** A conversation of alice's with `members` holding exactly `events` events. */
async function conversationWith(members, events) {
  const alice = makeClient('alice');
  const { id } = await alice.createConversation({ members, title: 'conformance' });
  for (let seq = 2; seq <= events; seq++) {
    const e = await alice.sendMessage(id, `m${seq}`);
    assert.equal(e.seq, seq);
  }
  return id;
}

async function cursor(user, id) {
  const r = await getJson(`${cluster.base}/v1/conversations?limit=200`, auth(user));
  return r.json.conversations.find((c) => c.id === id).cursor;
}

async function waitCursor(user, id, want) {
  let got;
  await waitFor(async () => (got = await cursor(user, id)) === want, {
    timeout: 10000,
    what: `${user}'s cursor to be ${want} (it is ${got})`,
  });
}

/** The seqs of `id` a fresh client of `user` gets first (n of them). */
async function firstSeqs(user, id, n, opts = {}) {
  const c = makeClient(user, opts);
  const seqs = [];
  c.on('event', (e) => e.conversation_id === id && seqs.push(e.seq));
  c.connect();
  await waitFor(() => seqs.length >= n, { what: `${n} events of ${id}` });
  c.close();
  return seqs.slice(0, n);
}

test('an app that consumed 100 of 300 events resumes at 101 (async listeners, then manual acks)', { timeout: 120000 }, async () => {
  const id = await conversationWith(['bob', 'carol'], 300);

  // autoAck: an event is acked once its async listener settled; the app
  // quits while event 101's listener is still running.
  const bob = makeClient('bob');
  let done = 0;
  bob.on('event', async (e) => {
    if (e.conversation_id !== id) return;
    if (e.seq > 100) return new Promise(() => {}); // never finishes
    await new Promise((r) => setTimeout(r, 1));
    done = e.seq;
  });
  bob.connect();
  await waitFor(() => done === 100 && bob.lastSeq(id) === 300, { what: 'bob to process 100 and receive 300' });
  await new Promise((r) => setImmediate(r)); // the 100th's promise chain settles
  bob.close();
  await waitCursor('bob', id, 100);
  assert.deepEqual(await firstSeqs('bob', id, 3), [101, 102, 103]);

  // autoAck: false: only what ack() names, though all 300 were read.
  const carol = makeClient('carol', { autoAck: false });
  carol.on('event', () => {});
  carol.connect();
  await waitFor(() => carol.lastSeq(id) === 300, { what: 'carol to receive 300' });
  assert.equal(carol.ack(id, 100), true);
  carol.close();
  await waitCursor('carol', id, 100);
  assert.deepEqual(await firstSeqs('carol', id, 2, { autoAck: false }), [101, 102]);
  assert.deepEqual(bob.rec.errors, []);
});

test('configuration errors are final at once', { timeout: 60000 }, async () => {
  assert.throws(() => makeClient('bob', { url: 'ftp://127.0.0.1:1' }), /unsupported scheme ftp/);
  const c = makeClient('bob', { url: `${cluster.base}/nope` });
  c.connect();
  await assert.rejects(c.whenSynced(), (e) => e instanceof TetherError && e.code === 'config' && e.status === 404);
  assert.equal(c.state, 'closed');
  assert.ok(!c.rec.states.includes('reconnecting'), `no retry: ${c.rec.states}`);
});

test('a refused connection says why; send() rejects when never connected, on timeout, on abort; reconnectNow()', { timeout: 60000 }, async () => {
  const idle = makeClient('bob');
  await assert.rejects(idle.send(1, 'x'), (e) => e.code === 'not_connected');

  const c = makeClient('bob', { url: `http://127.0.0.1:${await freePort()}`, backoffBaseMs: 60000, backoffCapMs: 60000, backoffFloorMs: 30000 });
  c.connect();
  await waitFor(() => c.rec.errors.some((e) => e.code === 'connect_failed'), { what: 'connect_failed' });
  const failed = c.rec.errors.find((e) => e.code === 'connect_failed');
  assert.match(String(failed.cause), /ECONNREFUSED/);
  assert.equal(c.state, 'reconnecting');

  const t0 = Date.now();
  await assert.rejects(c.send(1, 'x', { timeoutMs: 200 }), (e) => e.code === 'timeout' && typeof e.clientMsgId === 'string');
  assert.ok(Date.now() - t0 >= 200);
  const ac = new AbortController();
  const aborted = c.send(1, 'y', { signal: ac.signal });
  ac.abort();
  await assert.rejects(aborted, (e) => e.code === 'aborted');
  assert.equal(c.pending, 0);

  // The backoff is at least 30 s here: a second attempt now is reconnectNow's.
  const attempts = () => c.rec.states.filter((s) => s === 'connecting').length;
  assert.equal(attempts(), 1);
  c.reconnectNow();
  await waitFor(() => attempts() === 2 && c.state === 'reconnecting', { what: 'a second attempt at once' });
  c.close();
});

test('a valid token is reused across reconnects', { timeout: 120000 }, async () => {
  const dave = makeClient('dave');
  dave.connect();
  await dave.whenSynced();
  const syncs = () => dave.rec.states.filter((s) => s === 'synced').length;
  await cluster.killWorkerServing(dave);
  await waitFor(() => syncs() >= 2, { timeout: 30000, what: 'dave to be synced again' });
  assert.equal(dave.rec.getTokenCalls, 1, 'getToken() asked once: the token is valid for an hour');
  dave.close();
  await cluster.waitHealthy(30000);
});

test('the conversation view: messages, send, history both ways, back-fill, mark-read', { timeout: 120000 }, async () => {
  const id = await conversationWith(['erin'], 50);
  const erin = makeClient('erin', { autoAck: false });
  const chat = erin.conversation(id);
  const messages = [];
  chat.on('message', (e) => messages.push(e.seq));
  erin.connect();
  await waitFor(() => messages.length === 49, { what: '49 messages' });
  assert.deepEqual(messages, Array.from({ length: 49 }, (_, i) => i + 2));
  const sent = await chat.send('from the view');
  assert.equal(sent.seq, 51);
  assert.equal(sent.conversation_id, id);
  const newest = await chat.history({ limit: 5 });
  assert.deepEqual(newest.events.map((e) => e.seq), [51, 50, 49, 48, 47]);
  const oldest = await chat.history({ afterSeq: 0, limit: 5 });
  assert.deepEqual(oldest.events.map((e) => e.seq), [1, 2, 3, 4, 5]);
  assert.equal(oldest.next_after_seq, 5);
  const filled = await chat.backfill(10, 30);
  assert.deepEqual(filled.map((e) => e.seq), Array.from({ length: 21 }, (_, i) => i + 10));
  await waitFor(() => erin.lastSeq(id) === 51, { what: 'erin to see her own message' });
  chat.markRead(40);
  await waitCursor('erin', id, 40);
  chat.off();
  erin.close();
});
