// Type test (tsc --noEmit, run by test/package.test.js against the packed
// package): what README.md shows compiles under strict settings, and wrong
// uses do not.
import WebSocket from 'ws';
import { TetherClient, TetherError, type SendResult, type TetherEvent } from '@tether/client';

const client = new TetherClient({ url: 'http://127.0.0.1:8080', token: 't', WebSocket, autoAck: false });
client.on('event', async (e: TetherEvent) => {
  const seq: number = e.seq;
  client.ack(e.conversation_id, seq);
});
client.on('error', (e: TetherError) => console.error(e.code, e.cause));
client.on('state', (s) => s.state === 'reconnecting' && s.delay);
client.connect();
const chat = client.conversation(7);
chat.on('message', (e) => console.log(e.body));
chat.on('gap', (e) => chat.backfill(e.expected ?? 0, (e.got ?? 1) - 1));
const ac = new AbortController();
const sent: Promise<SendResult> = chat.send('hi', { clientMsgId: 'm-1', timeoutMs: 5000, signal: ac.signal });
sent.then((r) => r.seq + r.conversation_id);
client.eventsPage(7, { afterSeq: 0 }).then((p) => p.next_after_seq);
client.reconnectNow();
client.close();
// @ts-expect-error: send() takes a string body
client.send(7, 42);
// @ts-expect-error: no such option
new TetherClient({ url: 'x', token: 't', autoAk: false });
// WebSocket first, SSE when it does not get through.
const fallback = new TetherClient({ url: 'x', token: 't', transports: ['websocket', 'sse'], sseAfterFailures: 2 });
fallback.on('transport', (t) => console.log(t.transport === 'sse', t.reason));
const now: 'websocket' | 'sse' = fallback.transport;
console.log(now);
// @ts-expect-error: no such transport
new TetherClient({ url: 'x', token: 't', transports: ['long-polling'] });

// Presence, typing, read receipts (issue 13).
{
  const c = new TetherClient({ url: 'http://localhost:8080', token: 't' });
  c.on('presence', (p) => {
    const online: boolean = p.online;
    const status: 'online' | 'offline' = p.status;
    const seen: string | null = p.lastSeen;
    void [online, status, seen, p.conversationId, p.user];
  });
  c.on('typing', (t) => void [t.conversationId, t.user]);
  c.on('read', (r) => {
    const seq: number = r.seq;
    void seq;
  });
  c.on('truncated', (t) => void [t.conversationId, t.fromSeq]);
  const sent: boolean = c.typing(1);
  void sent;
  void c.presence(1).then((p) => p.members.map((m) => [m.user, m.status, m.last_seen, m.read_seq]));
}
