// SIGTERM to the supervisor: its workers finish in-flight commits and close
// every socket with 1001; the client reconnects soon, and lands on a
// replacement cluster started on the same port (same database), without
// losing or repeating anything.

import assert from 'node:assert/strict';
import { after, test } from 'node:test';
import WebSocket from 'ws';
import { TetherClient } from '../src/index.js';
import { Cluster, Pg, mintToken, waitFor } from '../test-support/harness.js';

let pg;
const clusters = [];
const clients = [];

after(async () => {
  for (const c of clients) c.close();
  for (const cl of clusters) await cl.stop();
  if (pg) pg.stop();
});

function makeClient(url, user) {
  const rec = { events: [], states: [], errors: [] };
  const c = new TetherClient({
    url,
    getToken: async () => mintToken(user),
    WebSocket,
    backoffBaseMs: 50,
    backoffCapMs: 500,
    soonMs: 250,
    connectTimeoutMs: 3000,
  });
  const last = new Map();
  c.on('event', (e) => {
    if (e.seq <= (last.get(e.conversation_id) ?? 0)) rec.errors.push(new Error(`${user}: repeated ${e.seq}`));
    last.set(e.conversation_id, e.seq);
    rec.events.push(e);
  });
  c.on('state', (s) => rec.states.push({ ...s, at: Date.now() }));
  c.on('error', (e) => rec.errors.push(e));
  c.rec = rec;
  c.messages = (conv) => rec.events.filter((e) => e.conversation_id === conv && e.event === 'message.created');
  clients.push(c);
  return c;
}

test('1001 on SIGTERM: the client reconnects soon, to a replacement cluster on the same port', { timeout: 120000 }, async () => {
  pg = await Pg.start();
  const first = await Cluster.start({ pg, workers: 2 });
  clusters.push(first);
  const port = first.port;
  const ana = makeClient(first.base, 'ana');
  const ben = makeClient(first.base, 'ben');
  ana.connect();
  ben.connect();
  await Promise.all([ana.whenSynced(), ben.whenSynced()]);
  const firstPids = new Set(first.workerPids().values());
  const { id } = await ana.createConversation({ members: ['ben'], title: 'drain' });
  await waitFor(() => ben.rec.events.some((e) => e.conversation_id === id), { what: 'ben to see the conversation' });
  const before = [];
  for (let i = 0; i < 5; i++) before.push(await ana.send(id, `before ${i}`));

  // Sends in flight when the SIGTERM lands, then the signal.
  const during = [];
  for (let i = 0; i < 20; i++) during.push(ana.send(id, `during ${i}`));
  const t0 = Date.now();
  first.signal('SIGTERM');

  // Both see a 1001 and schedule a reconnect "soon" (within soonMs).
  for (const c of [ana, ben]) {
    const s = await waitFor(() => c.rec.states.find((x) => x.state === 'reconnecting' && x.at >= t0), {
      what: 'the reconnecting state',
    });
    assert.equal(s.code, 1001, `close code seen: ${JSON.stringify(s)}`);
    assert.ok(s.delay <= 250, `reconnect delay after 1001 is ${s.delay} ms`);
  }
  const exit = await first.exited;
  assert.deepEqual(exit, { code: 0, signal: null }, 'the supervisor drained and exited 0');

  // A replacement on the same port; the clients find it on their own.
  const second = await Cluster.start({ pg, workers: 2, port });
  clusters.push(second);
  const secondPids = second.workerPids();
  for (const c of [ana, ben]) {
    await waitFor(() => c.rec.states.filter((x) => x.state === 'synced' && x.at >= t0).length >= 1, {
      timeout: 30000,
      what: 'synced on the replacement',
    });
    assert.ok(secondPids.has(c.worker), `${c.user} is served by ${c.worker} of the replacement`);
  }
  assert.ok(![...secondPids.values()].some((p) => firstPids.has(p)));

  // Every send resolved exactly once: the ones in flight at the SIGTERM too.
  const duringResults = await Promise.all(during);
  const after1001 = await ana.send(id, 'after');
  const all = [...before, ...duringResults, after1001];
  assert.equal(new Set(all.map((r) => r.seq)).size, all.length);
  const count = Number(pg.query(`SELECT count(*) FROM events WHERE conversation_id = ${id} AND type = 'message.created'`));
  assert.equal(count, 26);
  const dbRows = pg
    .query(`SELECT seq || ':' || body FROM events WHERE conversation_id = ${id} AND type = 'message.created' ORDER BY seq`)
    .split('\n');
  await waitFor(() => ben.messages(id).length >= 26, { what: 'ben to have all 26 messages' });
  assert.deepEqual(
    ben.messages(id).map((e) => `${e.seq}:${e.body}`),
    dbRows,
  );
  // Attempts made while no cluster listened are reported (connect_failed,
  // with their cause); nothing else went wrong.
  for (const c of [ana, ben]) {
    const other = c.rec.errors.filter((e) => e.code !== 'connect_failed');
    assert.deepEqual(other, []);
    for (const e of c.rec.errors) assert.ok(e.cause, `connect_failed says why: ${e.message}`);
  }
});
