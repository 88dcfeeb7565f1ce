// The SDK against the real `tether` supervisor (two workers) and a
// throwaway PostgreSQL: two clients chat; a crash while 200 messages are
// sent; a token that expires is refreshed through getToken().

import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import WebSocket from 'ws';
import { TetherClient } from '../src/index.js';
import { Cluster, Pg, getJson, mintToken, waitFor } from '../test-support/harness.js';

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

/** A client that records what it surfaces, and fails loudly on a duplicate or out-of-order event. */
function makeClient(user, opts = {}) {
  const rec = { events: [], states: [], errors: [], tokens: [], urls: [], protocols: [], getTokenCalls: 0 };
  class RecordingWS extends WebSocket {
    constructor(url, protocols) {
      super(url, protocols);
      rec.urls.push(url);
      rec.protocols.push(protocols);
    }
  }
  const c = new TetherClient({
    url: cluster.base,
    getToken: async () => {
      rec.getTokenCalls++;
      const t = opts.token ? opts.token(rec.getTokenCalls) : mintToken(user);
      rec.tokens.push(t);
      return t;
    },
    WebSocket: RecordingWS,
    backoffBaseMs: 50,
    backoffCapMs: 1000,
    connectTimeoutMs: 5000,
    ...opts.client,
  });
  const last = new Map();
  c.on('event', (e) => {
    const prev = last.get(e.conversation_id) ?? 0;
    if (e.seq <= prev) rec.errors.push(new Error(`${user}: event ${e.conversation_id}:${e.seq} after ${prev}`));
    last.set(e.conversation_id, e.seq);
    rec.events.push(e);
  });
  c.on('state', (s) => rec.states.push(s));
  c.on('error', (e) => rec.errors.push(e));
  clients.push(c);
  c.rec = rec;
  c.syncs = () => rec.states.filter((s) => s.state === 'synced').length;
  c.messages = (conv) => rec.events.filter((e) => e.conversation_id === conv && e.event === 'message.created');
  return c;
}

test('two clients exchange messages', { timeout: 120000 }, async () => {
  const alice = makeClient('alice');
  const bob = makeClient('bob');
  alice.connect();
  bob.connect();
  await Promise.all([alice.whenSynced(), bob.whenSynced()]);
  assert.equal(alice.user, 'alice');
  // The token is offered as a subprotocol; the URL carries none.
  assert.match(alice.rec.urls[0], /\/v1\/ws$/);
  assert.equal(alice.rec.protocols[0][0], 'tether.v1');
  assert.equal(alice.rec.protocols[0][1], `tether.token.${alice.rec.tokens[0]}`);

  const { id } = await alice.createConversation({ members: ['bob'], title: 'hello' });
  await waitFor(() => bob.rec.events.some((e) => e.conversation_id === id && e.event === 'conversation.created'), {
    what: 'bob to see the conversation',
  });
  const a1 = await alice.send(id, 'hi bob');
  const b1 = await bob.send(id, 'hi alice 🙂');
  assert.ok(b1.seq > a1.seq);
  assert.equal(a1.duplicate, false);
  await waitFor(() => alice.messages(id).length === 2 && bob.messages(id).length === 2, { what: 'both messages on both sides' });
  for (const c of [alice, bob]) {
    assert.deepEqual(
      c.messages(id).map((e) => [e.seq, e.sender, e.body]),
      [
        [a1.seq, 'alice', 'hi bob'],
        [b1.seq, 'bob', 'hi alice 🙂'],
      ],
    );
  }
  // The REST helpers.
  const viaHttp = await bob.sendMessage(id, 'over http', { clientMsgId: 'bob-http-1' });
  assert.equal(viaHttp.event, 'message.created');
  const again = await bob.sendMessage(id, 'over http', { clientMsgId: 'bob-http-1' });
  assert.equal(again.seq, viaHttp.seq, 'a repeated client_msg_id returns the first event');
  await waitFor(() => alice.messages(id).length === 3, { what: 'the HTTP message over the socket' });
  const page = await alice.eventsPage(id, { limit: 2 });
  assert.deepEqual(
    page.events.map((e) => e.seq),
    [viaHttp.seq, b1.seq],
  );
  assert.equal(page.next_before_seq, b1.seq);
  await alice.addMember(id, 'carol');
  await alice.removeMember(id, 'carol');
  // Acks reach the server: bob's cursor catches up with what he received.
  await waitFor(
    async () => {
      const list = await bob.listConversations();
      const row = list.conversations.find((r) => r.id === id);
      return row && row.unread === 0 && row.cursor === row.last_seq;
    },
    { what: "bob's cursor to reach the last seq" },
  );
  await assert.rejects(alice.send(999999, 'nowhere'), (e) => e.code === 'not_found');
  await assert.rejects(alice.eventsPage(999999), (e) => e.code === 'not_found' && e.status === 404);
  assert.deepEqual(alice.rec.errors, []);
  assert.deepEqual(bob.rec.errors, []);
});

test('presence, typing and read receipts reach the other member', { timeout: 120000 }, async () => {
  const alice = makeClient('dana');
  const bob = makeClient('eve');
  const seen = { presence: [], typing: [], read: [] };
  for (const kind of Object.keys(seen)) alice.on(kind, (x) => seen[kind].push(x));
  alice.connect();
  await alice.whenSynced();
  const { id } = await alice.createConversation({ members: ['eve'], title: 'presence' });
  bob.connect();
  await bob.whenSynced();
  await waitFor(() => seen.presence.some((p) => p.conversationId === id && p.user === 'eve' && p.online), {
    what: "eve's presence at dana",
  });
  const bobTyping = [];
  bob.on('typing', (t) => bobTyping.push(t));
  assert.equal(alice.typing(id), true);
  await waitFor(() => bobTyping.some((t) => t.conversationId === id && t.user === 'dana'), { what: 'typing at eve' });
  const sent = await alice.send(id, 'read me');
  // eve's SDK acks what it consumed: dana gets the receipt.
  await waitFor(() => seen.read.some((r) => r.conversationId === id && r.user === 'eve' && r.seq >= sent.seq), {
    what: "eve's read receipt at dana",
  });
  const { members } = await alice.presence(id);
  assert.deepEqual(
    members.map((m) => [m.user, m.status]),
    [
      ['dana', 'online'],
      ['eve', 'online'],
    ],
  );
  assert.ok(members.find((m) => m.user === 'eve').read_seq >= sent.seq);
  await assert.rejects(makeClient('mallory').presence(id), (e) => e.status === 404);
  assert.deepEqual(alice.rec.errors, []);
  assert.deepEqual(bob.rec.errors, []);
});

test('a worker SIGKILLed while 200 messages are sent: every send resolves, 200 events, each received once in order', { timeout: 120000 }, async (t) => {
  const sender = makeClient('sam');
  const receiver = makeClient('rita');
  sender.connect();
  receiver.connect();
  await Promise.all([sender.whenSynced(), receiver.whenSynced()]);
  const { id } = await sender.createConversation({ members: ['rita'], title: 'crash' });
  await waitFor(() => receiver.rec.events.some((e) => e.conversation_id === id), { what: 'rita to see the conversation' });

  const N = 200;
  const WINDOW = 25;
  const results = new Array(N);
  let resolved = 0;
  const kills = [];
  const killer = (async () => {
    // First the sender's worker, mid-stream ...
    await waitFor(() => resolved >= 50, { timeout: 60000, what: '50 sends' });
    kills.push({ who: 'sender', ...(await cluster.killWorkerServing(sender)) });
    // ... then, once the cluster is whole again, the worker serving the
    // receiver at that moment. The receiver may have been on the sender's
    // worker and still be reconnecting (or not yet have seen its close):
    // the worker it names is read when the kill happens, and must be alive.
    await waitFor(() => resolved >= 110, { timeout: 60000, what: '110 sends' });
    await cluster.waitHealthy(30000);
    kills.push({ who: 'receiver', ...(await cluster.killWorkerServing(receiver)) });
  })();
  const sends = [];
  for (let i = 0; i < N; i++) {
    if (i >= WINDOW) await sends[i - WINDOW];
    sends.push(
      sender.send(id, `msg ${i}`).then((r) => {
        results[i] = r;
        resolved++;
      }),
    );
  }
  await Promise.all(sends);
  await killer;
  assert.equal(kills.length, 2);
  // Two different workers died, the second one while it served the receiver.
  assert.notEqual(kills[0].pid, kills[1].pid);

  // Every promise resolved with a seq, all different.
  assert.ok(results.every((r) => Number.isInteger(r.seq) && r.seq > 1));
  assert.equal(new Set(results.map((r) => r.seq)).size, N);

  // The database holds exactly 200 message events of the conversation.
  const count = Number(pg.query(`SELECT count(*) FROM events WHERE conversation_id = ${id} AND type = 'message.created'`));
  assert.equal(count, N);
  const distinctIds = Number(pg.query(`SELECT count(DISTINCT client_msg_id) FROM events WHERE conversation_id = ${id}`));
  assert.equal(distinctIds, N);
  const dbRows = pg
    .query(`SELECT seq || ':' || body FROM events WHERE conversation_id = ${id} AND type = 'message.created' ORDER BY seq`)
    .split('\n');
  // The resolved seqs are the database's.
  assert.deepEqual(
    results.map((r, i) => `${r.seq}:msg ${i}`).sort(),
    [...dbRows].sort(),
  );

  // The receiver ends with exactly those 200, in order, none twice.
  await waitFor(() => receiver.messages(id).length >= N, { timeout: 60000, what: 'rita to receive 200 messages' });
  await waitFor(() => receiver.synced, { what: 'rita synced again' });
  const got = receiver.messages(id).map((e) => `${e.seq}:${e.body}`);
  assert.deepEqual(got, dbRows);
  // The sender (a member too) saw them the same way.
  await waitFor(() => sender.messages(id).length >= N, { timeout: 30000, what: 'sam to receive 200 messages' });
  assert.deepEqual(
    sender.messages(id).map((e) => `${e.seq}:${e.body}`),
    dbRows,
  );
  // Both were really cut off and came back; nothing was surfaced twice or skipped.
  assert.ok(sender.rec.states.some((s) => s.state === 'reconnecting'), 'the sender reconnected');
  assert.ok(receiver.rec.states.some((s) => s.state === 'reconnecting'), 'the receiver reconnected');
  assert.deepEqual(receiver.rec.errors, []);
  assert.deepEqual(sender.rec.errors, []);
  const dups = results.filter((r) => r.duplicate).length;
  t.diagnostic(`kills: ${JSON.stringify(kills)}; sends answered as duplicates: ${dups}`);
});

test('an expired token is replaced through getToken() on reconnect', { timeout: 120000 }, async () => {
  let exp = 0;
  const carol = makeClient('carol', {
    token: () => {
      exp = Math.floor(Date.now() / 1000) + 2;
      return mintToken('carol', { exp });
    },
  });
  carol.connect();
  await carol.whenSynced();
  assert.equal(carol.rec.getTokenCalls, 1);
  const first = carol.rec.tokens[0];
  // Wait until the server refuses the first token ...
  await waitFor(
    async () => (await getJson(`${cluster.base}/v1/conversations`, { authorization: `Bearer ${first}` })).status === 401,
    { timeout: 10000, interval: 200, what: 'the first token to expire' },
  );
  // ... and force a reconnect: the worker serving carol dies.
  await cluster.killWorkerServing(carol);
  await waitFor(() => carol.syncs() >= 2, { timeout: 30000, what: 'carol to be synced again' });
  assert.ok(carol.rec.getTokenCalls >= 2);
  const lastOffer = carol.rec.protocols[carol.rec.protocols.length - 1];
  assert.notEqual(lastOffer[1], `tether.token.${first}`, 'reconnected with a new token');
  const { id } = await carol.createConversation({ members: [], title: 'solo' });
  const r = await carol.send(id, 'still here');
  assert.ok(r.seq > 1);
  assert.deepEqual(carol.rec.errors, []);
  await cluster.waitHealthy(30000);
});

test('an expired token from getToken() is asked for once more; a good one then connects', { timeout: 120000 }, async () => {
  const dan = makeClient('dan', {
    // The first call hands out an expired token, as a stale cache would.
    token: (n) => (n === 1 ? mintToken('dan', { exp: Math.floor(Date.now() / 1000) - 10 }) : mintToken('dan')),
  });
  dan.connect();
  await dan.whenSynced();
  assert.equal(dan.rec.getTokenCalls, 2);
  assert.deepEqual(dan.rec.errors, []);

  // Always expired: the client gives up after the second refusal.
  const eve = makeClient('eve', { token: () => mintToken('eve', { exp: Math.floor(Date.now() / 1000) - 10 }) });
  eve.connect();
  await assert.rejects(eve.whenSynced(), (e) => e.code === 'unauthorized');
  assert.equal(eve.state, 'closed');
  assert.equal(eve.rec.getTokenCalls, 2);
  assert.deepEqual(
    eve.rec.errors.map((e) => e.code),
    ['unauthorized'],
  );
});
