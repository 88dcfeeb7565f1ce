// The demo page (demo/) in headless Chromium over the DevTools protocol,
// against the real cluster: two windows as two users chat; the worker
// serving the second is SIGKILLed while the first sends 20 more through the
// UI; the second shows all 20, in order, once, and is synced again.
// Skipped when no Chromium is installed. The page is served by a small
// front server (test-support/browser.js) exactly as the gateway serves it
// at /demo/; set TETHER_DEMO_SCREENSHOT=path.png to keep a screenshot.

import assert from 'node:assert/strict';
import os from 'node:os';
import path from 'node:path';
import { after, test } from 'node:test';
import { Browser, demoServer, findChromium } from '../test-support/browser.js';
import { Cluster, Pg, mintToken } from '../test-support/harness.js';

let pg;
let cluster;
let server;
let browser;

after(async () => {
  if (browser) await browser.close();
  if (server) server.close();
  if (cluster) await cluster.stop();
  if (pg) pg.stop();
});

const js = (v) => JSON.stringify(v);

/** Types `text` into the composer and presses Send. */
const sendThroughUi = (text) => `(() => {
  const ta = document.querySelector('#composer textarea');
  ta.value = ${js(text)};
  document.querySelector('#send').click();
  return true;
})()`;

const messagesOf = `[...document.querySelectorAll('#messages li[data-seq]')].map((li) => [Number(li.dataset.seq), li.querySelector('.body').textContent])`;

test('the demo page: two users chat, a worker dies, nothing is lost or repeated', { skip: !findChromium() && 'no chromium installed', timeout: 180000 }, async () => {
  pg = await Pg.start();
  cluster = await Cluster.start({ pg, workers: 2 });
  server = await demoServer(() => cluster.port);
  browser = await Browser.launch();

  const alice = await browser.open(`${server.base}/demo/#token=${mintToken('alice')}`);
  const bob = await browser.open(`${server.base}/demo/#token=${mintToken('bob')}`);
  for (const p of [alice, bob]) {
    await p.waitFor(`document.querySelector('#state')?.dataset.state === 'synced'`, { timeout: 30000 });
  }
  assert.equal(await alice.eval(`document.querySelector('#me').dataset.user`), 'alice');

  // Alice starts a conversation with bob through the form.
  await alice.eval(`(() => {
    document.querySelector('#new-member').value = 'bob';
    document.querySelector('#new-title').value = 'demo';
    document.querySelector('#create').click();
    return true;
  })()`);
  const id = Number(await alice.waitFor(`document.querySelector('#conversation-title').dataset.id`));
  assert.ok(id > 0);

  // Bob sees it in his list, with an unread count, and opens it.
  await bob.waitFor(`document.querySelector('#conversations li[data-id="${id}"]')?.dataset.unread === '1'`);
  await bob.eval(`document.querySelector('#conversations li[data-id="${id}"]').click(), true`);
  await bob.waitFor(`document.querySelector('#conversation-title').dataset.id === '${id}'`);

  await alice.eval(sendThroughUi('hello bob'));
  await bob.waitFor(`${messagesOf}.some(([, b]) => b === 'hello bob')`);
  // Bob answers; it lands on alice's page.
  await bob.eval(sendThroughUi('hi alice'));
  await alice.waitFor(`${messagesOf}.some(([, b]) => b === 'hi alice')`);

  // A message sent while offline is shown as pending until `sent`.
  const aliceWorker = await alice.eval(`document.querySelector('#worker').dataset.worker`);
  cluster.killWorker(aliceWorker);
  await alice.waitFor(`document.querySelector('#state').dataset.state !== 'synced'`);
  await alice.eval(sendThroughUi('sent while offline'));
  await alice.waitFor(
    `[...document.querySelectorAll('#messages li.pending')].some((li) => li.querySelector('.body').textContent === 'sent while offline')`,
  );
  await alice.waitFor(`document.querySelector('#state').dataset.state === 'synced'`, { timeout: 30000 });
  await alice.waitFor(
    `document.querySelectorAll('#messages li.pending').length === 0 && ${messagesOf}.some(([, b]) => b === 'sent while offline')`,
  );
  await bob.waitFor(`${messagesOf}.some(([, b]) => b === 'sent while offline')`);
  await cluster.waitHealthy();

  // The worker serving bob's page dies while alice sends 20 more.
  const bobWorker = await bob.eval(`document.querySelector('#worker').dataset.worker`);
  const twenty = Array.from({ length: 20 }, (_, i) => `burst ${i + 1}`);
  for (let i = 0; i < twenty.length; i++) {
    if (i === 5) cluster.killWorker(bobWorker);
    await alice.eval(sendThroughUi(twenty[i]));
  }
  await bob.waitFor(`${messagesOf}.filter(([, b]) => b.startsWith('burst ')).length >= 20`, { timeout: 30000 });
  await bob.waitFor(`document.querySelector('#state').dataset.state === 'synced'`, { timeout: 30000 });
  const shown = await bob.eval(messagesOf);
  const bursts = shown.filter(([, b]) => b.startsWith('burst ')).map(([, b]) => b);
  assert.deepEqual(bursts, twenty, 'all 20, in order, once');
  const seqs = shown.map(([s]) => s);
  assert.deepEqual(
    seqs,
    [...seqs].sort((a, b) => a - b),
  );
  assert.equal(new Set(seqs).size, seqs.length);
  const dbRows = pg
    .query(`SELECT seq || ':' || body FROM events WHERE conversation_id = ${id} AND type = 'message.created' ORDER BY seq`)
    .split('\n');
  assert.deepEqual(
    shown.map(([s, b]) => `${s}:${b}`),
    dbRows,
  );
  assert.notEqual(await bob.eval(`document.querySelector('#worker').dataset.worker`), '');

  await alice.waitFor(`${messagesOf}.length === ${dbRows.length}`);
  const file = process.env.TETHER_DEMO_SCREENSHOT || path.join(os.tmpdir(), 'tether-demo.png');
  await bob.screenshot(file);
});
