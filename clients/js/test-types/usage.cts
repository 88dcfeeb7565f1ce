// Type test of the CommonJS form: require() gets the same API.
import tether = require('@tether/client');

const client = new tether.TetherClient({ url: 'http://127.0.0.1:8080', token: 't' });
const n: number = client.pending;
client.close();
export = n;
