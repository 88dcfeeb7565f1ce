// The demo page in a real browser: headless Chromium (Debian's
// /usr/bin/chromium, driven by playwright-core over the DevTools protocol)
// against the real `tether` supervisor with two workers and a throwaway
// PostgreSQL cluster. The page is the one the worker serves at /demo/ from
// the files compiled into it.
//
//   1. Two windows, alice and bob (tokens in the URL fragment).
//   2. Alice starts a conversation with bob through the form; bob opens it
//      from his list; alice types a message and presses Send; bob's page
//      shows it (and bob's answer reaches alice).
//   3. The worker serving bob's WebSocket (the page shows it: #worker, from
//      the `hello` frame; mapped to a pid through TETHER_WORKER_ID in the
//      environment of the supervisor's children, and checked to hold TCP
//      connections on the gateway's port) is SIGKILLed while alice sends 20
//      more messages through the UI.
//   4. Bob's page leaves the synced state, comes back to it, and shows all
//      20, in order, once; bob answers through his new worker; what both
//      pages show equals the database's event log.
//   5. Screenshots of both pages: target/browser-test/{bob,alice}.png, and
//      bob's also at $TETHER_DEMO_SCREENSHOT when set (docs/demo.png in the
//      README is made that way).
//
// Then the same again with WebSocket made to fail in both pages (as behind a
// proxy that refuses it: the constructor's socket errors and closes, 1006):
// alice's page is opened with `?transport=sse`, bob's falls back to SSE by
// itself after its failed WebSocket attempts; both chat over Server-Sent
// Events (EventSource with one-time tickets; sends and acks over HTTP)
// through the SIGKILL of bob's worker (screenshots sse-{bob,alice}.png).
//
// Environment: TETHER_BIN, TETHER_WORKER_BIN (default target/debug/...),
// CHROMIUM (default /usr/bin/chromium), TETHER_DEMO_SCREENSHOT,
// TETHER_TEST_KEEP=1 keeps the temporary directories (logs).
//
// Everything started here (PostgreSQL, tether and its workers, Chromium) is
// stopped in `after()`, and, if the process exits another way, by a
// synchronous `exit` handler that SIGKILLs what is left.

import assert from 'node:assert/strict';
import { execFileSync, spawn, spawnSync } from 'node:child_process';
import { createHmac } from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { after, test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const TETHER_BIN = process.env.TETHER_BIN || path.join(REPO, 'target/debug/tether');
const WORKER_BIN = process.env.TETHER_WORKER_BIN || path.join(REPO, 'target/debug/tether-worker');
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const ARTIFACTS = path.join(REPO, 'target/browser-test');
// 32 random bytes in hex: tether refuses secrets shorter than 32 bytes.
const SECRET = '2c8e5a1f7b3d9e04c6a2f8b1d5e937a0c4f6b2d8e1a39c7f5b0d2e4a6c8f1b3d';
const KEEP = Boolean(process.env.TETHER_TEST_KEEP);

// ---------------------------------------------------------------------------
// Cleanup: synchronous steps, run last-in first-out, once.

const cleanups = [];
function cleanupSync() {
  while (cleanups.length) {
    try {
      cleanups.pop()();
    } catch {
      // best effort
    }
  }
}
process.on('exit', cleanupSync);
for (const [sig, n] of [
  ['SIGINT', 2],
  ['SIGTERM', 15],
]) {
  process.on(sig, () => {
    cleanupSync();
    process.exit(128 + n);
  });
}

function tmpDir(prefix) {
  const d = fs.mkdtempSync(path.join(os.tmpdir(), prefix));
  cleanups.push(() => {
    if (KEEP) console.log(`kept ${d}`);
    else fs.rmSync(d, { recursive: true, force: true });
  });
  return d;
}

/** SIGKILL, ignoring "no such process". */
function kill(pid, sig = 'SIGKILL') {
  try {
    process.kill(pid, sig);
  } catch {
    // gone
  }
}

// ---------------------------------------------------------------------------
// Small helpers.

const log = (...a) => console.log(`[${new Date().toISOString().slice(11, 23)}]`, ...a);

/** An error that ends `until` at once (the thing waited for cannot happen any more). */
class Fatal extends Error {}

async function until(cond, { timeout = 30000, interval = 50, what = 'condition' } = {}) {
  const deadline = Date.now() + timeout;
  let last;
  for (;;) {
    try {
      last = await cond();
      if (last) return last;
    } catch (e) {
      if (e instanceof Fatal) throw e;
      last = e;
    }
    if (Date.now() > deadline) {
      throw new Error(`timed out after ${timeout} ms waiting for ${what}${last instanceof Error ? `: ${last.message}` : ''}`);
    }
    await new Promise((r) => setTimeout(r, interval));
  }
}

function freePort() {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.on('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

function mintToken(user, ttl = 3600) {
  const b64 = (v) => Buffer.from(JSON.stringify(v)).toString('base64url');
  const unsigned = `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64({ sub: user, exp: Math.floor(Date.now() / 1000) + ttl })}`;
  return `${unsigned}.${createHmac('sha256', SECRET).update(unsigned).digest('base64url')}`;
}

function tail(file, n = 60) {
  try {
    return fs.readFileSync(file, 'utf8').split('\n').slice(-n).join('\n');
  } catch {
    return '(no log)';
  }
}

// ---------------------------------------------------------------------------
// /proc: the supervisor's workers and their sockets.

function childPids(pid) {
  try {
    return fs.readFileSync(`/proc/${pid}/task/${pid}/children`, 'utf8').trim().split(/\s+/).filter(Boolean).map(Number);
  } catch {
    return [];
  }
}

function environ(pid) {
  try {
    return Object.fromEntries(
      fs
        .readFileSync(`/proc/${pid}/environ`, 'utf8')
        .split('\0')
        .filter((kv) => kv.includes('='))
        .map((kv) => [kv.slice(0, kv.indexOf('=')), kv.slice(kv.indexOf('=') + 1)]),
    );
  } catch {
    return {};
  }
}

/** Worker id (as in `hello` and on the page: "w1") → pid, for the supervisor's live workers. */
function workerPids(supervisorPid) {
  const m = new Map();
  for (const pid of childPids(supervisorPid)) {
    const id = environ(pid).TETHER_WORKER_ID;
    if (id) m.set(id, pid);
  }
  return m;
}

/** How many ESTABLISHED TCP connections on local port `port` process `pid` holds (fds ∩ /proc/net/tcp). */
function establishedOnPort(pid, port) {
  const inodes = new Set();
  for (const fd of fs.readdirSync(`/proc/${pid}/fd`)) {
    try {
      const m = fs.readlinkSync(`/proc/${pid}/fd/${fd}`).match(/^socket:\[(\d+)\]$/);
      if (m) inodes.add(m[1]);
    } catch {
      // closed meanwhile
    }
  }
  let n = 0;
  for (const table of ['tcp', 'tcp6']) {
    let text = '';
    try {
      text = fs.readFileSync(`/proc/${pid}/net/${table}`, 'utf8');
    } catch {
      continue;
    }
    for (const line of text.split('\n').slice(1)) {
      const f = line.trim().split(/\s+/);
      if (f.length < 10) continue;
      const localPort = parseInt(f[1].split(':').pop(), 16);
      if (f[3] === '01' && localPort === port && inodes.has(f[9])) n++;
    }
  }
  return n;
}

// ---------------------------------------------------------------------------
// PostgreSQL: a private cluster (as the `postgres` user when run as root).

function pgBin(name) {
  const versions = fs.existsSync('/usr/lib/postgresql')
    ? fs
        .readdirSync('/usr/lib/postgresql')
        .filter((v) => fs.existsSync(`/usr/lib/postgresql/${v}/bin/${name}`))
        .sort((a, b) => Number(b) - Number(a))
    : [];
  return versions.length ? `/usr/lib/postgresql/${versions[0]}/bin/${name}` : name;
}

const asRoot = process.getuid?.() === 0;

function runPg(cmd, args, timeout = 120000) {
  const [file, argv] = asRoot ? ['runuser', ['-u', 'postgres', '--', pgBin(cmd), ...args]] : [pgBin(cmd), args];
  const r = spawnSync(file, argv, { encoding: 'utf8', timeout });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')} failed (${r.status ?? r.signal}): ${r.stderr}${r.stdout}`);
  return r.stdout;
}

async function startPg() {
  const dir = tmpDir('tether-browser-pg-');
  const data = path.join(dir, 'data');
  if (asRoot) execFileSync('chown', ['-R', 'postgres', dir]);
  runPg('initdb', ['-D', data, '-U', 'postgres', '--auth=trust', '--no-sync', '-E', 'UTF8']);
  const port = await freePort();
  cleanups.push(() => {
    try {
      runPg('pg_ctl', ['-D', data, '-m', 'immediate', '-w', 'stop'], 30000);
    } catch {
      try {
        kill(Number(fs.readFileSync(path.join(data, 'postmaster.pid'), 'utf8').split('\n')[0]));
      } catch {
        // not running
      }
    }
  });
  runPg('pg_ctl', [
    '-D',
    data,
    '-l',
    path.join(dir, 'postgres.log'),
    '-o',
    `-p ${port} -k ${dir} -c listen_addresses=127.0.0.1 -c fsync=off`,
    '-w',
    '-t',
    '60',
    'start',
  ]);
  return {
    url: `postgres://postgres@127.0.0.1:${port}/postgres`,
    query(sql) {
      const r = spawnSync(pgBin('psql'), ['-X', '-h', '127.0.0.1', '-p', String(port), '-U', 'postgres', '-d', 'postgres', '-AtqF', '\t', '-c', sql], {
        encoding: 'utf8',
        timeout: 30000,
      });
      if (r.status !== 0) throw new Error(`psql: ${r.stderr}`);
      return r.stdout
        .split('\n')
        .filter((l) => l !== '')
        .map((l) => l.split('\t'));
    },
  };
}

// ---------------------------------------------------------------------------
// tether: the supervisor in a process group of its own (its workers stay in
// it), so one kill(-pgid) takes everything down.

async function startTether(pg) {
  for (const bin of [TETHER_BIN, WORKER_BIN]) {
    if (!fs.existsSync(bin)) throw new Error(`${bin} is missing: run \`cargo build --bin tether --bin tether-worker\` (or set TETHER_BIN / TETHER_WORKER_BIN)`);
  }
  const port = await freePort();
  const dir = tmpDir('tether-browser-cluster-');
  const logFile = path.join(dir, 'tether.log');
  const out = fs.openSync(logFile, 'a');
  const child = spawn(
    TETHER_BIN,
    [
      '--listen',
      `127.0.0.1:${port}`,
      '--workers',
      '2',
      '--database-url',
      pg.url,
      '--secret',
      SECRET,
      '--worker-bin',
      WORKER_BIN,
      '--drain-ms',
      '2000',
      '--restart-backoff-ms',
      '50',
      '--restart-backoff-max-ms',
      '500',
    ],
    { stdio: ['ignore', out, out], detached: true, env: { ...process.env, RUST_LOG: process.env.RUST_LOG || 'info' } },
  );
  fs.closeSync(out);
  const seen = new Set();
  const t = {
    port,
    base: `http://127.0.0.1:${port}`,
    child,
    logFile,
    workers() {
      const m = workerPids(child.pid);
      for (const pid of m.values()) seen.add(pid);
      return m;
    },
  };
  cleanups.push(() => {
    t.workers();
    kill(-child.pid);
    kill(child.pid);
    // Workers re-parented after an early supervisor death: still ours if
    // they are tether-workers we saw.
    for (const pid of seen) {
      try {
        if (fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8').includes('tether-worker')) kill(pid);
      } catch {
        // gone
      }
    }
  });
  await until(
    async () => {
      if (child.exitCode !== null || child.signalCode !== null) throw new Fatal(`tether exited (${child.exitCode ?? child.signalCode})`);
      const ready = await fetch(`${t.base}/ready`, { signal: AbortSignal.timeout(2000) }).catch(() => null);
      if (!ready || ready.status !== 200) return false;
      const health = await fetch(`${t.base}/health`, { signal: AbortSignal.timeout(2000) }).then((r) => r.json());
      return health.workers.alive === 2 && t.workers().size === 2;
    },
    { timeout: 60000, what: `tether on :${port} ready with 2 workers` },
  ).catch((e) => {
    e.message += `\n--- tether log ---\n${tail(logFile)}`;
    throw e;
  });
  return t;
}

// ---------------------------------------------------------------------------
// Chromium: a fresh profile, its own process group (playwright spawns it
// detached), SIGKILLed at exit if still there.

async function startChromium() {
  const profile = tmpDir('tether-browser-chromium-');
  const before = new Set(childPids(process.pid));
  cleanups.push(() => {
    for (const pid of childPids(process.pid)) {
      if (before.has(pid)) continue;
      try {
        if (fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8').includes(profile)) {
          kill(-pid);
          kill(pid);
        }
      } catch {
        // gone
      }
    }
  });
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    viewport: { width: 1000, height: 680 },
    deviceScaleFactor: 1,
    args: [
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
      '--disable-dev-shm-usage',
      '--disable-background-timer-throttling',
      '--disable-renderer-backgrounding',
      '--disable-backgrounding-occluded-windows',
    ],
    timeout: 60000,
  });
  return context;
}

// ---------------------------------------------------------------------------
// The page.

/**
 * Opens the demo as `user`; records its state changes, toasts and console
 * errors. `sse`: WebSocket fails in the page (every connect errors and
 * closes with 1006, as behind a proxy that refuses it), and `query` (e.g.
 * `?transport=sse`) is the page's.
 */
async function openDemo(context, base, user, { sse = false, query = '' } = {}) {
  const page = await context.newPage();
  page.user = user;
  page.console = [];
  page.on('console', (m) => {
    if (m.type() === 'error' || m.type() === 'warning') page.console.push(`${m.type()}: ${m.text()}`);
  });
  page.on('pageerror', (e) => page.console.push(`pageerror: ${e.message}`));
  // Before the page's scripts: every value #state[data-state] takes, and
  // every toast, with a timestamp.
  await page.addInitScript(() => {
    window.__states = [];
    window.__toasts = [];
    window.__offline = [];
    document.addEventListener('DOMContentLoaded', () => {
      const state = document.querySelector('#state');
      const toast = document.querySelector('#toast');
      // Every member ever shown offline, with a timestamp.
      const members = document.querySelector('#members');
      new MutationObserver(() => {
        for (const li of members.querySelectorAll('li[data-online="false"]')) window.__offline.push([Date.now(), li.dataset.user]);
      }).observe(members, { attributes: true, childList: true, subtree: true });
      new MutationObserver(() => window.__states.push([Date.now(), state.dataset.state])).observe(state, {
        attributes: true,
        attributeFilter: ['data-state'],
      });
      new MutationObserver(() => {
        if (!toast.hidden && toast.textContent) window.__toasts.push(toast.textContent);
      }).observe(toast, { attributes: true, childList: true, characterData: true, subtree: true });
    });
  });
  if (sse) {
    await page.addInitScript(() => {
      window.__wsAttempts = 0;
      window.WebSocket = class {
        constructor() {
          window.__wsAttempts++;
          this.readyState = 0;
          setTimeout(() => {
            this.readyState = 3;
            if (this.onerror) this.onerror(new Event('error'));
            if (this.onclose) this.onclose({ code: 1006, reason: '' });
          }, 20);
        }
        send() {
          throw new Error('WebSocket is blocked here');
        }
        close() {}
      };
    });
  }
  await page.goto(`${base}/demo/${query}#token=${mintToken(user)}`);
  await waitSynced(page);
  return page;
}

const waitSynced = (page, timeout = 30000) => page.locator('#state[data-state="synced"]').waitFor({ state: 'attached', timeout });

/** Polls `fn(arg)` in the page until truthy (no fixed sleeps anywhere). */
const waitIn = (page, fn, arg, timeout = 30000) => page.waitForFunction(fn, arg, { timeout, polling: 50 });

/** The committed messages on the page: [seq, sender, body], in DOM order. */
const shownMessages = (page) =>
  page.$$eval('#messages li[data-seq]', (lis) =>
    lis.map((li) => [Number(li.dataset.seq), li.querySelector('.sender').textContent, li.querySelector('.body').textContent]),
  );

/** Types `text` into the composer and presses Send, as a person would. */
async function sendThroughUi(page, text) {
  // The window in front, as for a person typing (a page behind another
  // gets no animation frames, which playwright's actionability checks use).
  await page.bringToFront();
  const box = page.locator('#composer textarea');
  await box.fill(text);
  await page.locator('#send').click();
  // The page clears the box when it takes the message.
  await waitIn(page, () => document.querySelector('#composer textarea').value === '');
}

const pageWorker = (page) => page.locator('#worker').getAttribute('data-worker');

// ---------------------------------------------------------------------------

let context;
let pages = [];

after(async () => {
  if (context) {
    let timer;
    const giveUp = new Promise((r) => {
      timer = setTimeout(r, 10000);
    });
    await Promise.race([context.close().catch(() => {}), giveUp]);
    clearTimeout(timer);
  }
  cleanupSync();
});

test('the demo page in Chromium: two users chat, the worker serving one is SIGKILLed, nothing is lost or repeated', { timeout: 240000 }, async () => {
  await chatThroughKill({ sse: false });
});

test('with WebSocket failing, the demo page chats over SSE through the SIGKILL of a worker, nothing lost or repeated', { timeout: 240000 }, async () => {
  await chatThroughKill({ sse: true });
});

/** The scenario above; `sse`: WebSocket fails in both pages. */
async function chatThroughKill({ sse }) {
  assert.ok(fs.existsSync(CHROMIUM), `${CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium) or set CHROMIUM`);
  const t0 = Date.now();
  const pg = await startPg();
  const tether = await startTether(pg);
  log(`PostgreSQL and tether (2 workers) up on :${tether.port} in ${Date.now() - t0} ms${sse ? '; WebSocket blocked in the pages' : ''}`);
  context ??= await startChromium();
  const shot = (name) => path.join(ARTIFACTS, `${sse ? 'sse-' : ''}${name}.png`);

  try {
    // Over SSE: alice's page asks for it; bob's falls back by itself.
    const alice = await openDemo(context, tether.base, 'alice', { sse, query: sse ? '?transport=sse' : '' });
    const bob = await openDemo(context, tether.base, 'bob', { sse });
    pages = [alice, bob];
    const transport = sse ? 'sse' : 'websocket';
    for (const p of pages) assert.equal(await p.locator('#worker').getAttribute('data-transport'), transport, p.user);
    if (sse) {
      assert.equal(await alice.evaluate(() => window.__wsAttempts), 0, "alice's page never tries WebSocket");
      assert.ok((await bob.evaluate(() => window.__wsAttempts)) >= 3, "bob's page fell back after failed WebSockets");
    }
    assert.equal(await alice.locator('#me').getAttribute('data-user'), 'alice');
    assert.equal(await bob.locator('#me').getAttribute('data-user'), 'bob');

    // Put bob on the other worker than alice if a reload or two does it,
    // so that alice's page stays connected while bob's worker dies.
    for (let i = 0; i < 8 && (await pageWorker(bob)) === (await pageWorker(alice)); i++) {
      await bob.reload();
      await waitSynced(bob);
    }
    log(`alice on ${await pageWorker(alice)}, bob on ${await pageWorker(bob)}; workers ${JSON.stringify([...tether.workers()])}`);

    // Alice starts a conversation with bob through the form.
    await alice.locator('#new-member').fill('bob');
    await alice.locator('#new-title').fill('tether demo');
    await alice.locator('#create').click();
    await waitIn(alice, () => document.querySelector('#conversation-title').dataset.id !== '');
    const id = Number(await alice.locator('#conversation-title').getAttribute('data-id'));
    assert.ok(id > 0);

    // Bob sees it in his list with one unread event and opens it.
    const item = bob.locator(`#conversations li[data-id="${id}"]`);
    await waitIn(bob, (id) => document.querySelector(`#conversations li[data-id="${id}"]`)?.dataset.unread === '1', id);
    await bob.bringToFront();
    await item.click();
    await waitIn(bob, (id) => document.querySelector('#conversation-title').dataset.id === String(id), id);

    // Alice types and presses Send; bob's page shows it. Bob answers.
    await sendThroughUi(alice, 'hello bob');
    await waitIn(bob, () => [...document.querySelectorAll('#messages li[data-seq] .body')].some((b) => b.textContent === 'hello bob'));
    await sendThroughUi(bob, 'hi alice');
    await waitIn(alice, () => [...document.querySelectorAll('#messages li[data-seq] .body')].some((b) => b.textContent.startsWith('hi alice')));
    log(`conversation ${id}: alice → bob and bob → alice through the UI`);

    // Presence: each page shows the other's dot online; alice types and
    // bob's page says so; alice's page shows "seen by bob" once bob's page
    // has acknowledged (read) her message.
    await waitIn(alice, () => document.querySelector('#members li[data-user="bob"]')?.dataset.online === 'true');
    await waitIn(bob, () => document.querySelector('#members li[data-user="alice"]')?.dataset.online === 'true');
    await alice.bringToFront();
    await alice.locator('#composer textarea').fill('typing…');
    await waitIn(bob, () => {
      const t = document.querySelector('#typing');
      return !t.hidden && t.dataset.users === 'alice' && t.textContent === 'alice is typing…';
    });
    await alice.locator('#composer textarea').fill('');
    await waitIn(alice, () => [...document.querySelectorAll('#messages li[data-seq] .seen')].some((s) => s.dataset.seenBy === 'bob'));
    log('presence: online dots, "alice is typing…" and "seen by bob" shown');

    // The worker serving bob's WebSocket: the page shows the `hello` frame's
    // worker id; the supervisor's child with that TETHER_WORKER_ID is it.
    const bobWorker = await pageWorker(bob);
    const aliceWorker = await pageWorker(alice);
    assert.match(bobWorker, /^w\d+$/);
    const workers = tether.workers();
    const pid = workers.get(bobWorker);
    assert.ok(pid, `no live worker ${bobWorker} among ${JSON.stringify([...workers])}`);
    assert.ok(establishedOnPort(pid, tether.port) >= 1, `worker ${bobWorker} (pid ${pid}) holds no connection on :${tether.port}`);
    const statesBefore = (await bob.evaluate(() => window.__states.length)) | 0;

    // SIGKILL it while alice sends 20 more through the UI (after the 5th).
    const twenty = Array.from({ length: 20 }, (_, i) => `message ${i + 1} of 20`);
    let killedAt = 0;
    const tSend = Date.now();
    for (let i = 0; i < twenty.length; i++) {
      if (i === 5) {
        killedAt = Date.now();
        process.kill(pid, 'SIGKILL');
        log(`SIGKILLed ${bobWorker} (pid ${pid}), bob's worker${bobWorker === aliceWorker ? ' (and alice\'s)' : `; alice stays on ${aliceWorker}`}`);
      }
      await sendThroughUi(alice, twenty[i]);
    }
    log(`alice pressed Send 20 times in ${Date.now() - tSend} ms`);

    // Bob's page: all 20 arrive, and it is synced again (on another worker).
    await waitIn(
      bob,
      (n) => [...document.querySelectorAll('#messages li[data-seq] .body')].filter((b) => / of 20$/.test(b.textContent)).length >= n,
      twenty.length,
    );
    const allShownAt = Date.now();
    await waitIn(bob, (old) => {
      const s = document.querySelector('#state').dataset.state;
      const w = document.querySelector('#worker').dataset.worker;
      return s === 'synced' && w !== '' && w !== old;
    }, bobWorker);
    const bobStates = await bob.evaluate(() => window.__states);
    const since = bobStates.slice(statesBefore).filter(([at]) => at >= killedAt);
    const left = since.find(([, s]) => s !== 'synced');
    const back = since.find(([at, s]) => s === 'synced' && left && at >= left[0]);
    assert.ok(left, `bob's page never left the synced state after the kill: ${JSON.stringify(since)}`);
    assert.ok(back, `bob's page did not return to synced: ${JSON.stringify(since)}`);
    log(
      `bob: ${since.map(([at, s]) => `${s}@+${at - killedAt}ms`).join(' → ')}; all 20 shown at +${allShownAt - killedAt} ms; now on ${await pageWorker(bob)}`,
    );

    // Alice's sends all committed (none pending or failed); bob's page
    // sends again, through its new worker, and alice's shows it.
    await waitIn(alice, () => document.querySelectorAll('#messages li.pending, #messages li.failed').length === 0);
    await sendThroughUi(bob, 'got all 20, in order, once');
    await waitIn(alice, () => [...document.querySelectorAll('#messages li[data-seq] .body')].some((b) => b.textContent === 'got all 20, in order, once'));
    await waitIn(bob, () => document.querySelectorAll('#messages li.pending, #messages li.failed').length === 0);

    // All 20, in order, once; bob's list is exactly the database's log.
    const shown = await shownMessages(bob);
    const bodies = shown.map(([, , b]) => b);
    assert.deepEqual(
      bodies.filter((b) => / of 20$/.test(b)),
      twenty,
      'bob shows all 20, in order, once',
    );
    const seqs = shown.map(([s]) => s);
    assert.equal(new Set(seqs).size, seqs.length, 'no seq twice in the DOM');
    assert.equal(new Set(bodies).size, bodies.length, 'no message twice in the DOM');
    assert.deepEqual(
      seqs,
      [...seqs].sort((a, b) => a - b),
      'in seq order',
    );
    const db = pg.query(`SELECT seq, sender, body FROM events WHERE conversation_id = ${id} AND type = 'message.created' ORDER BY seq`);
    assert.equal(db.length, 23, 'the database holds the 2 first messages, the 20 and the last answer');
    assert.deepEqual(
      shown,
      db.map(([s, who, b]) => [Number(s), who, b]),
      "bob's page equals the event log",
    );
    assert.deepEqual(await shownMessages(alice), shown, "alice's page shows the same");
    assert.equal(await bob.locator('#messages li.pending').count(), 0);
    const gaps = (await bob.evaluate(() => window.__toasts)).filter((t) => /missing/.test(t));
    assert.deepEqual(gaps, [], 'no gap reported on bob\'s page');
    // Bob's worker died and his page came straight back: alice's page never
    // showed him offline (the grace period is 60 s).
    const offline = (await alice.evaluate(() => window.__offline)).filter(([at, u]) => u === 'bob' && at >= killedAt);
    assert.deepEqual(offline, [], "alice's page showed bob offline after his worker died");
    assert.equal(await alice.locator('#members li[data-user="bob"]').getAttribute('data-online'), 'true');
    assert.ok(!fs.existsSync(`/proc/${pid}/cmdline`) || !fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8'), `pid ${pid} is still running`);

    // Both pages stayed on their transport through the kill.
    for (const p of pages) assert.equal(await p.locator('#worker').getAttribute('data-transport'), transport, p.user);

    // Screenshots (bob's is the README's: TETHER_DEMO_SCREENSHOT=docs/demo.png).
    fs.mkdirSync(ARTIFACTS, { recursive: true });
    await bob.bringToFront();
    await bob.screenshot({ path: shot('bob') });
    await alice.screenshot({ path: shot('alice') });
    if (process.env.TETHER_DEMO_SCREENSHOT && !sse) fs.copyFileSync(shot('bob'), path.resolve(process.env.TETHER_DEMO_SCREENSHOT));
    log(`screenshots in ${ARTIFACTS}; whole test ${Date.now() - t0} ms`);
  } catch (e) {
    // What the pages and the gateway looked like when it failed.
    fs.mkdirSync(ARTIFACTS, { recursive: true });
    for (const p of pages) {
      await p.screenshot({ path: shot(`failed-${p.user}`) }).catch(() => {});
      const states = await p.evaluate(() => window.__states).catch(() => null);
      const toasts = await p.evaluate(() => window.__toasts).catch(() => null);
      e.message += `\n--- ${p.user}: states ${JSON.stringify(states)} toasts ${JSON.stringify(toasts)} console ${JSON.stringify(p.console)}`;
    }
    e.message += `\n--- tether log (${tether.logFile}) ---\n${tail(tether.logFile)}\n(screenshots: ${ARTIFACTS}/*failed-*.png)`;
    throw e;
  } finally {
    for (const p of pages) await p.close().catch(() => {});
    pages = [];
  }
}
