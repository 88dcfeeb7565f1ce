// For the demo page test: a small front server that serves demo/ (and the
// SDK as /demo/tether-client.js, as the gateway does) and proxies every
// other request, WebSocket upgrades included, to a tether cluster; and a
// headless Chromium driven over the DevTools protocol.

import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import path from 'node:path';
import WebSocket from 'ws';
import { REPO, tmpDir, track, waitFor } from './harness.js';

const TYPES = { '.html': 'text/html; charset=utf-8', '.js': 'text/javascript; charset=utf-8', '.css': 'text/css; charset=utf-8' };

/** Serves /demo/ from the repository and proxies the rest to `target` ("127.0.0.1:port"). */
export function demoServer(targetPort) {
  const files = {
    '/demo/': path.join(REPO, 'demo', 'index.html'),
    '/demo/index.html': path.join(REPO, 'demo', 'index.html'),
    '/demo/app.js': path.join(REPO, 'demo', 'app.js'),
    '/demo/style.css': path.join(REPO, 'demo', 'style.css'),
    '/demo/tether-client.js': path.join(REPO, 'clients', 'js', 'src', 'index.js'),
  };
  const server = http.createServer((req, res) => {
    const url = new URL(req.url, 'http://x');
    const file = files[url.pathname];
    if (file) {
      res.writeHead(200, { 'content-type': TYPES[path.extname(file)], 'cache-control': 'no-store' });
      res.end(fs.readFileSync(file));
      return;
    }
    const up = http.request(
      { host: '127.0.0.1', port: targetPort(), method: req.method, path: req.url, headers: req.headers },
      (r) => {
        res.writeHead(r.statusCode, r.headers);
        r.pipe(res);
      },
    );
    up.on('error', () => {
      res.writeHead(502);
      res.end();
    });
    req.pipe(up);
  });
  server.on('upgrade', (req, socket, head) => {
    const up = net.connect(targetPort(), '127.0.0.1', () => {
      let raw = `${req.method} ${req.url} HTTP/1.1\r\n`;
      for (let i = 0; i < req.rawHeaders.length; i += 2) raw += `${req.rawHeaders[i]}: ${req.rawHeaders[i + 1]}\r\n`;
      up.write(`${raw}\r\n`);
      if (head && head.length) up.write(head);
      up.pipe(socket);
      socket.pipe(up);
    });
    const end = () => {
      up.destroy();
      socket.destroy();
    };
    up.on('error', end);
    socket.on('error', end);
    up.on('close', end);
    socket.on('close', end);
  });
  return new Promise((resolve) => {
    server.listen(0, '127.0.0.1', () => {
      server.base = `http://127.0.0.1:${server.address().port}`;
      resolve(server);
    });
  });
}

/** The Chromium binary, or null. */
export function findChromium() {
  for (const name of [process.env.CHROMIUM, 'chromium', 'chromium-browser', 'google-chrome']) {
    if (!name) continue;
    const r = spawnSync('sh', ['-c', `command -v ${name}`], { encoding: 'utf8' });
    if (r.status === 0 && r.stdout.trim()) return r.stdout.trim();
  }
  return null;
}

/** A headless Chromium with one DevTools connection. */
export class Browser {
  static async launch() {
    const bin = findChromium();
    if (!bin) throw new Error('no chromium');
    const b = new Browser();
    b.profile = tmpDir('tether-js-chromium-');
    b.child = spawn(
      bin,
      [
        '--headless=new',
        '--no-sandbox',
        '--disable-gpu',
        '--disable-dev-shm-usage',
        '--no-first-run',
        '--no-default-browser-check',
        '--disable-background-timer-throttling',
        '--disable-renderer-backgrounding',
        '--disable-backgrounding-occluded-windows',
        '--window-size=1100,720',
        `--user-data-dir=${b.profile}`,
        '--remote-debugging-port=0',
        'about:blank',
      ],
      { stdio: ['ignore', 'ignore', 'pipe'] },
    );
    track(b.child);
    const endpoint = await new Promise((resolve, reject) => {
      let buf = '';
      const timer = setTimeout(() => reject(new Error(`chromium did not start: ${buf}`)), 30000);
      b.child.stderr.on('data', (d) => {
        buf += d;
        const m = buf.match(/DevTools listening on (ws:\/\/\S+)/);
        if (m) {
          clearTimeout(timer);
          resolve(m[1]);
        }
      });
      b.child.on('exit', (code) => reject(new Error(`chromium exited (${code}): ${buf}`)));
    });
    b.child.stderr.resume();
    b.ws = new WebSocket(endpoint, { perMessageDeflate: false });
    await new Promise((res, rej) => {
      b.ws.once('open', res);
      b.ws.once('error', rej);
    });
    b.nextId = 1;
    b.calls = new Map();
    const failAll = (why) => {
      for (const { reject } of b.calls.values()) reject(new Error(`DevTools connection lost: ${why}`));
      b.calls.clear();
      b.dead = why;
    };
    b.ws.on('close', () => failAll('socket closed'));
    b.child.on('exit', (code, sig) => failAll(`chromium exited (${code ?? sig})`));
    b.ws.on('message', (data) => {
      const msg = JSON.parse(data.toString());
      if (msg.id && b.calls.has(msg.id)) {
        const { resolve, reject } = b.calls.get(msg.id);
        b.calls.delete(msg.id);
        if (msg.error) reject(new Error(`${msg.error.message} ${msg.error.data || ''}`));
        else resolve(msg.result);
      }
    });
    return b;
  }

  send(method, params = {}, sessionId) {
    const id = this.nextId++;
    const msg = { id, method, params };
    if (sessionId) msg.sessionId = sessionId;
    if (this.dead) return Promise.reject(new Error(`DevTools connection lost: ${this.dead}`));
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.calls.delete(id);
        reject(new Error(`DevTools ${method}: no answer in 30 s`));
      }, 30000);
      this.calls.set(id, {
        resolve: (v) => {
          clearTimeout(timer);
          resolve(v);
        },
        reject: (e) => {
          clearTimeout(timer);
          reject(e);
        },
      });
      this.ws.send(JSON.stringify(msg));
    });
  }

  /** Opens `url` in a new window; returns a Page. */
  async open(url) {
    const { targetId } = await this.send('Target.createTarget', { url: 'about:blank', newWindow: true });
    const { sessionId } = await this.send('Target.attachToTarget', { targetId, flatten: true });
    const page = new Page(this, sessionId);
    await page.send('Page.enable');
    await page.send('Runtime.enable');
    await page.send('Page.navigate', { url });
    return page;
  }

  async close() {
    try {
      this.ws.close();
    } catch {
      // ignore
    }
    if (this.child.exitCode === null && this.child.signalCode === null) {
      this.child.kill('SIGKILL');
      await new Promise((r) => this.child.once('exit', r));
    }
  }
}

export class Page {
  constructor(browser, sessionId) {
    this.browser = browser;
    this.sessionId = sessionId;
  }

  send(method, params) {
    return this.browser.send(method, params, this.sessionId);
  }

  /** Evaluates an expression (awaiting a promise) and returns its JSON value. */
  async eval(expression) {
    const r = await this.send('Runtime.evaluate', { expression, awaitPromise: true, returnByValue: true });
    if (r.exceptionDetails) {
      throw new Error(`page: ${r.exceptionDetails.exception?.description || r.exceptionDetails.text}`);
    }
    return r.result.value;
  }

  /** Waits until `expression` is truthy in the page; returns its value. */
  waitFor(expression, opts = {}) {
    return waitFor(() => this.eval(expression), { what: expression, ...opts });
  }

  async screenshot(file) {
    const { data } = await this.send('Page.captureScreenshot', { format: 'png' });
    fs.writeFileSync(file, Buffer.from(data, 'base64'));
  }
}
