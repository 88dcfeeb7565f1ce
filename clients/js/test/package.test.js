// The package as a user gets it: `npm pack` (clean: only the files meant to
// ship), then, in an empty temporary directory, the README's install command
// with the tarball in place of the registry name, the README's Node example
// (extracted from README.md, run as is) against a real gateway, require() of
// the CommonJS build, the browser bundle in a fresh V8 context, and
// `tsc --noEmit` on the usage files in test-types/ (strict, nodenext).

import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import vm from 'node:vm';
import { after, before, test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { Cluster, Pg, mintToken, tmpDir } from '../test-support/harness.js';

const pkgDir = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const readme = fs.readFileSync(path.join(pkgDir, 'README.md'), 'utf8');

let pg;
let cluster;
let app; // the temporary application directory, with the package installed

function run(cmd, args, opts = {}) {
  const r = spawnSync(cmd, args, { encoding: 'utf8', timeout: 300000, ...opts });
  assert.equal(r.status, 0, `${cmd} ${args.join(' ')} failed (${r.status}):\n${r.stdout}\n${r.stderr}`);
  return r.stdout;
}

before(async () => {
  pg = await Pg.start();
  cluster = await Cluster.start({ pg, workers: 1 });
  const packDir = tmpDir('tether-js-pack-');
  const [info] = JSON.parse(run('npm', ['pack', '--json', '--pack-destination', packDir], { cwd: pkgDir }));
  const shipped = info.files.map((f) => f.path).sort();
  assert.deepEqual(shipped, [
    'README.md',
    'dist/index.cjs',
    'dist/index.d.cts',
    'dist/tether-client.browser.js',
    'index.d.ts',
    'package.json',
    'src/index.js',
  ]);
  app = tmpDir('tether-js-app-');
  fs.writeFileSync(path.join(app, 'package.json'), JSON.stringify({ name: 'app', private: true, type: 'module' }));
  // The README's install command, with the tarball for the registry name.
  const install = /```sh\n(npm install @tether\/client ws)\n```/.exec(readme);
  assert.ok(install, 'README.md has the install command');
  const args = install[1].split(' ').slice(1).map((a) => (a === '@tether/client' ? path.join(packDir, info.filename) : a));
  run('npm', [...args, '--no-audit', '--no-fund'], { cwd: app });
});

after(async () => {
  if (cluster) await cluster.stop();
  if (pg) pg.stop();
});

test("the README's Node example runs against a gateway", { timeout: 120000 }, () => {
  const block = /<!-- node-example[^>]*-->\n```js\n([\s\S]*?)```/.exec(readme);
  assert.ok(block, 'README.md has the marked Node example');
  fs.writeFileSync(path.join(app, 'example.mjs'), block[1]);
  const out = run('node', ['example.mjs'], {
    cwd: app,
    timeout: 60000,
    env: { ...process.env, TETHER_URL: cluster.base, TETHER_TOKEN: mintToken('alice') },
  });
  assert.match(out, /stored as seq 2\n/);
  assert.match(out, /#2 message\.created alice: hello from Node/);
});

test('require() gets the CommonJS build; the browser bundle defines Tether', () => {
  const out = run('node', ['-e', "const t = require('@tether/client'); console.log(typeof t.TetherClient, typeof t.default, typeof t.Conversation)"], {
    cwd: app,
  });
  assert.equal(out.trim(), 'function function function');
  const bundle = fs.readFileSync(path.join(app, 'node_modules/@tether/client/dist/tether-client.browser.js'), 'utf8');
  const context = vm.createContext({ URL, setTimeout, clearTimeout });
  vm.runInContext(bundle, context);
  const client = vm.runInContext(
    "new Tether.TetherClient({ url: 'https://chat.example.com/', token: 't', WebSocket: function () {} })",
    context,
  );
  assert.equal(client.wsUrl, 'wss://chat.example.com/v1/ws');
});

test('the types: tsc --noEmit on the usage files (ESM and CommonJS)', { timeout: 120000 }, () => {
  for (const f of ['usage.ts', 'usage.cts']) fs.copyFileSync(path.join(pkgDir, 'test-types', f), path.join(app, f));
  fs.writeFileSync(
    path.join(app, 'tsconfig.json'),
    JSON.stringify({
      compilerOptions: { strict: true, noEmit: true, module: 'nodenext', moduleResolution: 'nodenext', target: 'es2022', skipLibCheck: false, types: [] },
      files: ['usage.ts', 'usage.cts'],
    }),
  );
  // `ws` ships no types of its own; the usage only needs its default export.
  fs.writeFileSync(path.join(app, 'ws.d.ts'), "declare module 'ws' { const WebSocket: any; export default WebSocket; }\n");
  const tsconfig = JSON.parse(fs.readFileSync(path.join(app, 'tsconfig.json'), 'utf8'));
  tsconfig.files.push('ws.d.ts');
  fs.writeFileSync(path.join(app, 'tsconfig.json'), JSON.stringify(tsconfig));
  const tsc = path.join(pkgDir, 'node_modules', 'typescript', 'bin', 'tsc');
  run(process.execPath, [tsc, '-p', app], { cwd: app });
});
