// Test harness of the JS SDK's end-to-end tests: a throwaway PostgreSQL
// cluster, the real `tether` supervisor (or standalone `tether-worker`s)
// as child processes, tokens, and condition waits.
//
// Every child started here is tracked and killed when the test process
// ends, also when a test fails or throws: `after()` hooks stop things in
// order, and a synchronous `exit` handler SIGKILLs whatever is left and
// stops PostgreSQL.
//
// Outside it lives in the repository root: the binaries are
// target/debug/{tether,tether-worker} (override with TETHER_BIN_DIR).
// Set TETHER_TEST_KEEP=1 to keep the temporary directories (logs).

import { spawn, spawnSync, execFileSync } from 'node:child_process';
import { createHmac } from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
export const REPO = path.resolve(here, '../../..');
export const BIN_DIR = process.env.TETHER_BIN_DIR || path.join(REPO, 'target', 'debug');
// 32 random bytes in hex: tether refuses secrets shorter than 32 bytes.
export const SECRET = '9d3b6f1e84a2c750e1f9b38d6a04c2e7f5b81d39a6c0e4f2b7d95a13c8e06f4b';

const PG_BIN_CANDIDATES = ['/usr/lib/postgresql/17/bin', '/usr/lib/postgresql/16/bin', '/usr/lib/postgresql/15/bin'];

// ---------------------------------------------------------------------------
// Bookkeeping: every child process and PostgreSQL data dir, cleaned at exit.

const children = new Set(); // ChildProcess
const pgDirs = new Set(); // { dir, asPostgres }
const tmpDirs = new Set();

function killAllSync() {
  for (const child of children) {
    if (child.exitCode === null && child.signalCode === null) {
      for (const pid of childPids(child.pid)) {
        try {
          process.kill(pid, 'SIGKILL');
        } catch {
          // gone
        }
      }
      try {
        child.kill('SIGKILL');
      } catch {
        // gone
      }
    }
  }
  for (const pg of pgDirs) stopPgSync(pg);
  if (!process.env.TETHER_TEST_KEEP) {
    for (const d of tmpDirs) fs.rmSync(d, { recursive: true, force: true });
  }
}
process.on('exit', killAllSync);
for (const sig of ['SIGINT', 'SIGTERM']) {
  process.on(sig, () => {
    killAllSync();
    process.exit(130);
  });
}

/** Kills `child` (and its children) when the test process ends, whatever happens. */
export function track(child) {
  children.add(child);
  child.once('exit', () => children.delete(child));
  return child;
}

export function tmpDir(prefix) {
  const d = fs.mkdtempSync(path.join(os.tmpdir(), prefix));
  tmpDirs.add(d);
  return d;
}

/** Pids of the direct children of `pid` (from /proc). */
export function childPids(pid) {
  const out = [];
  let entries = [];
  try {
    entries = fs.readdirSync('/proc');
  } catch {
    return out;
  }
  for (const e of entries) {
    if (!/^\d+$/.test(e)) continue;
    try {
      const stat = fs.readFileSync(`/proc/${e}/stat`, 'utf8');
      const ppid = Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]);
      if (ppid === pid) out.push(Number(e));
    } catch {
      // raced with an exit
    }
  }
  return out;
}

function environOf(pid) {
  try {
    return fs
      .readFileSync(`/proc/${pid}/environ`, 'utf8')
      .split('\0')
      .reduce((m, kv) => {
        const i = kv.indexOf('=');
        if (i > 0) m[kv.slice(0, i)] = kv.slice(i + 1);
        return m;
      }, {});
  } catch {
    return {};
  }
}

// ---------------------------------------------------------------------------
// Small helpers.

/** Waits until `cond()` (sync or async) is truthy; throws after `timeout` ms. */
export async function waitFor(cond, { timeout = 20000, interval = 25, what = 'condition' } = {}) {
  const deadline = Date.now() + timeout;
  let last;
  for (;;) {
    try {
      last = await cond();
      if (last) return last;
    } catch (e) {
      last = e;
    }
    if (Date.now() > deadline) {
      const why = last instanceof Error ? `: ${last.message}` : '';
      throw new Error(`timed out after ${timeout} ms waiting for ${what}${why}`);
    }
    await new Promise((r) => setTimeout(r, interval));
  }
}

/** A TCP port that was free a moment ago. */
export function freePort() {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.unref();
    s.on('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

const b64url = (b) => Buffer.from(b).toString('base64url');

/** An HS256 JWT for `user`: `exp` seconds since the epoch, or now + `ttl`. */
export function mintToken(user, { ttl = 3600, exp, secret = SECRET } = {}) {
  const e = exp ?? Math.floor(Date.now() / 1000) + ttl;
  const head = b64url(JSON.stringify({ alg: 'HS256', typ: 'JWT' }));
  const body = b64url(JSON.stringify({ sub: user, exp: e }));
  const sig = createHmac('sha256', secret).update(`${head}.${body}`).digest('base64url');
  return `${head}.${body}.${sig}`;
}

/** GET a JSON document; `{status, json}` (json null if not JSON). Never throws on HTTP errors. */
export async function getJson(url, headers = {}) {
  const r = await fetch(url, { headers, signal: AbortSignal.timeout(5000) });
  const text = await r.text();
  let json = null;
  try {
    json = JSON.parse(text);
  } catch {
    json = null;
  }
  return { status: r.status, json };
}

function tail(file, n = 40) {
  try {
    return fs.readFileSync(file, 'utf8').split('\n').slice(-n).join('\n');
  } catch {
    return '(no log)';
  }
}

function onExit(child) {
  return new Promise((resolve) => {
    if (child.exitCode !== null || child.signalCode !== null) resolve({ code: child.exitCode, signal: child.signalCode });
    else child.once('exit', (code, signal) => resolve({ code, signal }));
  });
}

// ---------------------------------------------------------------------------
// PostgreSQL.

function pgBin(name) {
  for (const d of PG_BIN_CANDIDATES) {
    if (fs.existsSync(path.join(d, name))) return path.join(d, name);
  }
  return name; // from PATH
}

function runPg(asPostgres, cmd, args, opts = {}) {
  const [file, argv] = asPostgres ? ['runuser', ['-u', 'postgres', '--', cmd, ...args]] : [cmd, args];
  const r = spawnSync(file, argv, { encoding: 'utf8', ...opts });
  if (r.status !== 0) {
    throw new Error(`${cmd} ${args.join(' ')} failed (${r.status}): ${r.stderr || r.stdout}`);
  }
  return r.stdout;
}

function stopPgSync(pg) {
  if (!pgDirs.has(pg)) return;
  pgDirs.delete(pg);
  try {
    runPg(pg.asPostgres, pgBin('pg_ctl'), ['-D', pg.data, '-m', 'immediate', '-w', 'stop'], { timeout: 20000 });
  } catch {
    // Last resort: the postmaster's pid file.
    try {
      const pid = Number(fs.readFileSync(path.join(pg.data, 'postmaster.pid'), 'utf8').split('\n')[0]);
      if (pid > 0) process.kill(pid, 'SIGKILL');
    } catch {
      // not running
    }
  }
}

/** A private PostgreSQL cluster in a temporary directory, stopped and removed at the end. */
export class Pg {
  static async start() {
    const asPostgres = typeof process.getuid === 'function' && process.getuid() === 0;
    const dir = tmpDir('tether-js-pg-');
    const data = path.join(dir, 'data');
    if (asPostgres) execFileSync('chown', ['-R', 'postgres', dir]);
    runPg(asPostgres, pgBin('initdb'), ['-D', data, '-U', 'postgres', '--auth=trust', '--no-sync', '-E', 'UTF8'], {
      timeout: 120000,
    });
    const port = await freePort();
    const pg = { dir, data, port, asPostgres };
    pgDirs.add(pg);
    runPg(
      asPostgres,
      pgBin('pg_ctl'),
      [
        '-D',
        data,
        '-l',
        path.join(dir, 'postgres.log'),
        '-o',
        `-p ${port} -k ${dir} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200`,
        '-w',
        '-t',
        '60',
        'start',
      ],
      { timeout: 90000 },
    );
    const p = new Pg();
    p._pg = pg;
    p.port = port;
    p.url = `postgres://postgres@127.0.0.1:${port}/postgres`;
    return p;
  }

  /** Runs SQL with psql; returns the unaligned, tuples-only output, trimmed. */
  query(sql) {
    const r = spawnSync('psql', ['-X', '-h', '127.0.0.1', '-p', String(this.port), '-U', 'postgres', '-d', 'postgres', '-Atqc', sql], {
      encoding: 'utf8',
      timeout: 30000,
    });
    if (r.status !== 0) throw new Error(`psql failed: ${r.stderr}`);
    return r.stdout.trim();
  }

  /** Applies schema.sql (the workers do it too; harmless twice). */
  applySchema() {
    const r = spawnSync(
      'psql',
      ['-X', '-q', '-v', 'ON_ERROR_STOP=1', '-h', '127.0.0.1', '-p', String(this.port), '-U', 'postgres', '-d', 'postgres', '-f', path.join(REPO, 'schema.sql')],
      { encoding: 'utf8', timeout: 30000 },
    );
    if (r.status !== 0) throw new Error(`applying schema.sql failed: ${r.stderr}`);
  }

  stop() {
    stopPgSync(this._pg);
  }
}

// ---------------------------------------------------------------------------
// The gateway.

function requireBinary(name) {
  const p = path.join(BIN_DIR, name);
  if (!fs.existsSync(p)) {
    throw new Error(`${p} is missing: build it first (cargo build --bin tether --bin tether-worker)`);
  }
  return p;
}

/** True when target/debug/tether is the supervisor (it answers --help). */
export function haveSupervisor() {
  const p = path.join(BIN_DIR, 'tether');
  if (!fs.existsSync(p)) return false;
  const r = spawnSync(p, ['--help'], { encoding: 'utf8', timeout: 10000 });
  return r.status === 0 && /--workers/.test(r.stdout);
}

/**
 * The `tether` supervisor with N workers on 127.0.0.1:port.
 * `await Cluster.start({pg, port?, workers?})` returns once every worker is
 * alive (GET /health: workers.alive == configured).
 */
export class Cluster {
  static async start({ pg, port, workers = 2, extraArgs = [], env = {} }) {
    const c = new Cluster();
    c.port = port ?? (await freePort());
    c.workers = workers;
    c.base = `http://127.0.0.1:${c.port}`;
    c.dir = tmpDir('tether-js-cluster-');
    c.log = path.join(c.dir, 'tether.log');
    const out = fs.openSync(c.log, 'a');
    c.child = spawn(
      requireBinary('tether'),
      [
        '--listen',
        `127.0.0.1:${c.port}`,
        '--workers',
        String(workers),
        '--database-url',
        pg.url,
        '--secret',
        SECRET,
        '--drain-ms',
        '3000',
        '--restart-backoff-ms',
        '50',
        '--restart-backoff-max-ms',
        '500',
        // The suites drive load the default per-user rate limits would refuse.
        '--rate-limit',
        '0',
        '--membership-rate',
        '0',
        ...extraArgs,
      ],
      {
        stdio: ['ignore', out, out],
        env: { ...process.env, RUST_LOG: process.env.RUST_LOG || 'info', ...env },
      },
    );
    fs.closeSync(out);
    children.add(c.child);
    c.exited = onExit(c.child).then((r) => {
      children.delete(c.child);
      return r;
    });
    c.seenWorkers = new Set();
    try {
      await c.waitHealthy(60000);
    } catch (e) {
      e.message += `\n--- tether log ---\n${tail(c.log)}`;
      await c.kill();
      throw e;
    }
    return c;
  }

  /** Waits until every configured worker is alive and the database is reachable. */
  async waitHealthy(timeout = 30000) {
    await waitFor(
      async () => {
        if (this.child.exitCode !== null || this.child.signalCode !== null) {
          throw new Error(`tether exited (${this.child.exitCode ?? this.child.signalCode})`);
        }
        const r = await getJson(`${this.base}/health`).catch(() => null);
        const pids = this.workerPids();
        return (
          r &&
          r.status === 200 &&
          r.json.status === 'healthy' &&
          r.json.workers.alive === this.workers &&
          pids.size === this.workers
        );
      },
      { timeout, interval: 50, what: `tether on port ${this.port} to be healthy with ${this.workers} workers` },
    );
  }

  /** Worker id (`w1`, as in `hello`) → pid, for the live workers. */
  workerPids() {
    const m = new Map();
    if (this.child.exitCode !== null || this.child.signalCode !== null) return m;
    for (const pid of childPids(this.child.pid)) {
      const id = environOf(pid).TETHER_WORKER_ID;
      if (id) {
        m.set(id, pid);
        this.seenWorkers.add(pid);
      }
    }
    return m;
  }

  /** SIGKILLs the worker named `id` (as in `hello`); returns its pid. */
  killWorker(id) {
    const pid = this.workerPids().get(id);
    if (!pid) throw new Error(`no live worker ${id} (have ${[...this.workerPids().keys()].join(', ')})`);
    process.kill(pid, 'SIGKILL');
    return pid;
  }

  /**
   * SIGKILLs the worker serving `client` (a connected TetherClient) at this
   * moment; returns `{worker, pid}`. The id to kill is read here, not
   * earlier, and only once the client is synced on a worker that is alive:
   * the id a client last heard in `hello` can name a worker that has just
   * died (killed before, its close not yet seen by the client, or the
   * client still reconnecting), and then there is nothing to kill yet.
   * Waits up to `timeout` ms for such a moment, and then until the client
   * has seen its connection end (its state left `synced`), so that what the
   * test checks next happens after the cut, not before the client noticed.
   */
  async killWorkerServing(client, { timeout = 30000 } = {}) {
    const target = await waitFor(
      () => {
        const live = this.workerPids();
        const pid = client.synced && client.worker ? live.get(client.worker) : undefined;
        if (pid) return { worker: client.worker, pid };
        // Why not yet, for the timeout's message.
        throw new Error(
          `${client.synced ? 'synced' : 'not synced'}, last heard of ${client.worker}, live: ${[...live.keys()].join(', ')}`,
        );
      },
      { timeout, what: `${client.user || 'the client'} to be synced on a live worker` },
    );
    // Checked and killed in one synchronous step: nothing can change the
    // client's connection in between. The listener is there before the
    // kill, so even a quick reconnect cannot pass unseen.
    let cut = false;
    const off = client.on('state', (st) => {
      if (st.state === 'reconnecting' || st.state === 'closed') cut = true;
    });
    try {
      process.kill(target.pid, 'SIGKILL');
      await waitFor(() => cut, {
        timeout,
        what: `${client.user || 'the client'} to see the connection to ${target.worker} end`,
      });
    } finally {
      off();
    }
    return target;
  }

  signal(sig) {
    this.child.kill(sig);
  }

  logTail(n) {
    return tail(this.log, n);
  }

  /** SIGTERM and wait for exit (SIGKILL everything after `timeout`). */
  async stop(timeout = 15000) {
    if (this.child.exitCode !== null || this.child.signalCode !== null) return this.exited;
    this.workerPids();
    this.child.kill('SIGTERM');
    let t;
    const timer = new Promise((r) => {
      t = setTimeout(() => r('timeout'), timeout);
    });
    const first = await Promise.race([this.exited, timer]);
    clearTimeout(t);
    if (first === 'timeout') await this.kill();
    this._reapWorkers();
    return this.exited;
  }

  /** SIGKILL the supervisor and its workers. */
  async kill() {
    const pids = childPids(this.child.pid);
    for (const pid of pids) this.seenWorkers.add(pid);
    if (this.child.exitCode === null && this.child.signalCode === null) this.child.kill('SIGKILL');
    this._reapWorkers();
    return this.exited;
  }

  _reapWorkers() {
    for (const pid of this.seenWorkers) {
      try {
        // Only our own workers: still a tether-worker with our port.
        const cmd = fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8');
        if (cmd.includes('tether-worker')) process.kill(pid, 'SIGKILL');
      } catch {
        // gone
      }
    }
  }
}
