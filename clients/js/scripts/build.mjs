// Builds the package's other two forms from the one source, src/index.js
// (an ES module with no imports): dist/index.cjs (CommonJS, for require()),
// dist/tether-client.browser.js (a classic script that defines the global
// `Tether`), and dist/index.d.cts (the types, for require()). Run by
// `npm run build` and by `npm pack` (prepack); dist/ is not committed.

import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const source = fs.readFileSync(path.join(root, 'src/index.js'), 'utf8');
if (/^\s*import\s/m.test(source)) throw new Error('src/index.js must stay free of imports (it is bundled as is)');

const names = [];
const body = source
  .replace(/^export default (\w+);\s*$/m, '')
  .replace(/^export (class|function|const|async function) (\w+)/gm, (_, kind, name) => {
    names.push(name);
    return `${kind} ${name}`;
  });
if (/^export\b/m.test(body)) throw new Error('an export form the build does not know');
const exportsObject = `{ ${names.join(', ')}, default: TetherClient }`;

const out = path.join(root, 'dist');
fs.mkdirSync(out, { recursive: true });
const banner = '// Generated from src/index.js by scripts/build.mjs: do not edit.\n';
fs.writeFileSync(
  path.join(out, 'index.cjs'),
  `${banner}'use strict';\n${body}\nmodule.exports = ${exportsObject};\n`,
);
fs.writeFileSync(
  path.join(out, 'tether-client.browser.js'),
  `${banner}// <script src="tether-client.browser.js"></script> defines \`Tether\` ({TetherClient, ...}).\n` +
    `(function (global) {\n'use strict';\n${body}\nglobal.Tether = ${exportsObject};\n})(typeof globalThis !== 'undefined' ? globalThis : this);\n`,
);
fs.copyFileSync(path.join(root, 'index.d.ts'), path.join(out, 'index.d.cts'));
console.error(`built dist/ (${names.join(', ')})`);
