// The tether demo chat: plain JS on top of the SDK, no build step.
//
// The token comes from the URL fragment (#token=...), which browsers never
// send to the server. Everything shown comes from the SDK: `event` for
// every committed event (once, in order), `state` for the connection, the
// promise of send() for the pending → committed transition, and the REST
// helpers for the conversation list (with unread counts) and history.

import { TetherClient, tokenUser, uuid } from './tether-client.js';

const $ = (sel) => document.querySelector(sel);

// ----- the token ---------------------------------------------------------

const fragment = new URLSearchParams(location.hash.slice(1));
const token = fragment.get('token');
const wantConversation = Number(fragment.get('conversation')) || null;


// ----- model -------------------------------------------------------------

/** id → { id, title, lastSeq, readSeq, activity, events: Map(seq → event), pending: Map(id → {body, error}), oldest, historyDone, left,
 *          members: Map(user → {online, lastSeen}), typing: Map(user → until ms), reads: Map(user → seq) } */
const convs = new Map();
let me = null;
let client = null;
let current = null;

function conv(id) {
  let c = convs.get(id);
  if (!c) {
    c = {
      id,
      title: '',
      lastSeq: 0,
      readSeq: null,
      activity: 0,
      events: new Map(),
      pending: new Map(),
      oldest: null,
      historyLoaded: false,
      historyDone: false,
      left: false,
      members: new Map(),
      typing: new Map(),
      reads: new Map(),
      presenceLoaded: false,
    };
    convs.set(id, c);
  }
  return c;
}

function unread(c) {
  if (c.readSeq == null) return 0;
  return Math.max(0, c.lastSeq - c.readSeq);
}

// ----- start -------------------------------------------------------------

function start(tok) {
  me = tokenUser(tok);
  $('#app').hidden = false;
  $('#me').textContent = me ? `signed in as ${me}` : '';
  $('#me').dataset.user = me || '';

  // WebSocket first, Server-Sent Events where it does not get through (a
  // proxy); `?transport=sse` uses SSE only.
  const only = new URLSearchParams(location.search).get('transport');
  const transports = only === 'sse' || only === 'websocket' ? [only] : ['websocket', 'sse'];
  client = new TetherClient({ url: location.origin, token: tok, transports });
  // For poking around in the console.
  window.tether = { client, convs };

  client.on('state', showState);
  client.on('event', onEvent);
  client.on('synced', () => {
    loadConversations();
  });
  // Presence, typing and read receipts: ephemeral, shown next to the log.
  client.on('presence', (p) => {
    conv(p.conversationId).members.set(p.user, { online: p.online, lastSeen: p.lastSeen });
    scheduleRender();
  });
  client.on('typing', (t) => {
    conv(t.conversationId).typing.set(t.user, Date.now() + TYPING_SHOWN_MS);
    scheduleRender();
    setTimeout(scheduleRender, TYPING_SHOWN_MS + 50);
  });
  client.on('read', (r) => {
    const c = conv(r.conversationId);
    c.reads.set(r.user, Math.max(c.reads.get(r.user) || 0, r.seq));
    scheduleRender();
  });
  client.on('error', (e) => {
    if (e.code === 'gap') toast(`conversation ${e.conversationId}: events ${e.expected}–${e.got - 1} are missing`);
    else toast(`${e.code}: ${e.message}`);
  });
  client.connect();
  loadConversations();
  wireForms();
  document.addEventListener('visibilitychange', () => {
    if (!document.hidden) render();
  });
}

/** "alice is typing…" stays this long unless renewed. */
const TYPING_SHOWN_MS = 5000;
/** The page says "typing" at most this often (the server forwards one per 2 s). */
const TYPING_EVERY_MS = 1500;

const STATE_LABEL = {
  idle: 'idle',
  connecting: 'connecting…',
  open: 'syncing…',
  synced: 'live',
  reconnecting: 'reconnecting',
  closed: 'offline',
};

let countdown = null;
function showState(s) {
  const el = $('#state');
  el.dataset.state = s.state;
  clearInterval(countdown);
  countdown = null;
  if (s.state === 'reconnecting') {
    const until = Date.now() + (s.delay || 0);
    const tick = () => {
      const left = Math.max(0, until - Date.now());
      el.textContent = left > 0 ? `reconnecting in ${(left / 1000).toFixed(1)} s` : 'reconnecting…';
    };
    tick();
    if (s.delay > 200) countdown = setInterval(tick, 100);
  } else if (s.state === 'closed' && s.error) {
    el.textContent = s.error.code === 'unauthorized' ? 'offline: token refused (expired?)' : `offline: ${s.error.code}`;
  } else {
    el.textContent = STATE_LABEL[s.state] || s.state;
  }
  if (s.worker !== undefined || s.state === 'reconnecting' || s.state === 'closed') {
    const w = s.state === 'open' || s.state === 'synced' ? s.worker || '' : '';
    const t = w ? client.transport : '';
    $('#worker').textContent = w ? `worker ${w}${t === 'sse' ? ' · SSE' : ''}` : '';
    $('#worker').dataset.worker = w;
    $('#worker').dataset.transport = t;
  }
}

// ----- events from the SDK ---------------------------------------------

function onEvent(e) {
  const c = conv(e.conversation_id);
  if (c.readSeq == null) c.readSeq = e.seq - 1; // the backlog starts just above the cursor
  c.events.set(e.seq, e);
  c.lastSeq = Math.max(c.lastSeq, e.seq);
  c.activity = Math.max(c.activity, Date.parse(e.created_at) || Date.now());
  if (e.event === 'conversation.created' && e.title) c.title = e.title;
  if (e.event === 'conversation.created') for (const u of e.members || []) if (!c.members.has(u)) c.members.set(u, { online: false, lastSeen: null });
  if (e.event === 'member.joined' && !c.members.has(e.user)) c.members.set(e.user, { online: false, lastSeen: null });
  if (e.event === 'member.left') c.members.delete(e.user);
  if (e.event === 'member.left' && e.user === me) c.left = true;
  if (e.event === 'member.joined' && e.user === me) c.left = false;
  if (e.event === 'message.created' && e.sender === me && e.client_msg_id) c.pending.delete(e.client_msg_id);
  if (c.oldest == null || e.seq < c.oldest) c.oldest = e.seq;
  scheduleRender();
}

async function loadConversations() {
  try {
    let after;
    for (let page = 0; page < 50; page++) {
      const r = await client.listConversations({ after, limit: 200 });
      for (const row of r.conversations) {
        const c = conv(row.id);
        if (row.title) c.title = row.title;
        c.lastSeq = Math.max(c.lastSeq, row.last_seq);
        // First sight: unread is what the server says (last seq - cursor).
        if (c.readSeq == null) c.readSeq = row.cursor;
      }
      if (!r.next) break;
      after = r.next;
    }
    if (wantConversation && !current && convs.has(wantConversation)) select(wantConversation);
    scheduleRender();
  } catch (e) {
    toast(`could not list conversations: ${e.message}`);
  }
}

async function loadHistory(c, older) {
  if (c.historyDone) return;
  try {
    const page = await client.eventsPage(c.id, { beforeSeq: older && c.oldest ? c.oldest : undefined, limit: 50 });
    for (const e of page.events) {
      if (!c.events.has(e.seq)) c.events.set(e.seq, e);
      if (c.oldest == null || e.seq < c.oldest) c.oldest = e.seq;
      c.lastSeq = Math.max(c.lastSeq, e.seq);
      if (e.event === 'conversation.created' && e.title) c.title = e.title;
    }
    c.historyLoaded = true;
    if (page.next_before_seq == null) c.historyDone = true;
    scheduleRender();
  } catch (e) {
    toast(`could not load history: ${e.message}`);
  }
}

// ----- actions ------------------------------------------------------------

function select(id) {
  current = id;
  const c = conv(id);
  // Remember the open conversation in the fragment (a reload reopens it).
  fragment.set('conversation', String(id));
  history.replaceState(null, '', `#${fragment.toString()}`);
  if (!c.historyLoaded) loadHistory(c, false);
  if (!c.presenceLoaded) loadPresence(c);
  render();
  $('#composer textarea').focus();
}

/** Members, their presence and how far each has read (REST: works in any size of conversation). */
async function loadPresence(c) {
  try {
    const { members } = await client.presence(c.id);
    c.presenceLoaded = true;
    for (const m of members) {
      c.members.set(m.user, { online: m.status === 'online', lastSeen: m.last_seen });
      if (m.user !== me) c.reads.set(m.user, Math.max(c.reads.get(m.user) || 0, m.read_seq));
    }
    scheduleRender();
  } catch (e) {
    // Not a member any more, or the gateway is away: the pushes still come.
  }
}

let lastTyping = 0;
function typed() {
  if (!current || Date.now() - lastTyping < TYPING_EVERY_MS) return;
  if (client.typing(current)) lastTyping = Date.now();
}

function sendCurrent() {
  const ta = $('#composer textarea');
  const body = ta.value;
  if (!current || body.trim() === '') return;
  ta.value = '';
  const c = conv(current);
  const id = uuid();
  c.pending.set(id, { body, error: null, at: Date.now() });
  scheduleRender(true);
  client.send(c.id, body, { clientMsgId: id }).then(
    (r) => {
      // Committed. The event itself may not have arrived yet: show it as
      // committed already (the event with the same seq replaces it).
      if (!c.events.has(r.seq)) {
        c.events.set(r.seq, {
          conversation_id: c.id,
          seq: r.seq,
          event: 'message.created',
          sender: me,
          body,
          client_msg_id: id,
          created_at: new Date().toISOString(),
        });
      }
      c.pending.delete(id);
      scheduleRender();
    },
    (err) => {
      const p = c.pending.get(id);
      if (p) p.error = err;
      scheduleRender();
    },
  );
}

function wireForms() {
  $('#composer').addEventListener('submit', (e) => {
    e.preventDefault();
    sendCurrent();
  });
  $('#composer textarea').addEventListener('input', typed);
  $('#composer textarea').addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      sendCurrent();
    }
  });
  $('#new-conversation').addEventListener('submit', async (e) => {
    e.preventDefault();
    const members = $('#new-member')
      .value.split(/[\s,]+/)
      .filter(Boolean);
    const title = $('#new-title').value.trim() || [me, ...members].join(', ');
    try {
      const r = await client.createConversation({ members, title });
      const c = conv(r.id);
      c.title = r.title || title;
      if (c.readSeq == null) c.readSeq = r.seq;
      c.lastSeq = Math.max(c.lastSeq, r.seq);
      c.activity = Date.now();
      $('#new-member').value = '';
      $('#new-title').value = '';
      select(r.id);
    } catch (err) {
      toast(`could not create the conversation: ${err.message}`);
    }
  });
  $('#add-member-form').addEventListener('submit', async (e) => {
    e.preventDefault();
    const user = $('#add-member').value.trim();
    if (!current || !user) return;
    try {
      await client.addMember(current, user);
      $('#add-member').value = '';
    } catch (err) {
      toast(`could not add ${user}: ${err.message}`);
    }
  });
  $('#older').addEventListener('click', () => current && loadHistory(conv(current), true));
  $('#conversations').addEventListener('click', (e) => {
    const li = e.target.closest('li[data-id]');
    if (li) select(Number(li.dataset.id));
  });
}

// ----- rendering ---------------------------------------------------------

let renderQueued = false;
let stickToBottom = false;
function scheduleRender(forceBottom) {
  if (forceBottom) stickToBottom = true;
  if (renderQueued) return;
  renderQueued = true;
  // A timer rather than requestAnimationFrame: a page in a background tab
  // (or a second headless window) still renders, at most ~1/s.
  setTimeout(() => {
    renderQueued = false;
    render();
  }, 0);
}

function render() {
  renderConversations();
  renderChat();
  const total = [...convs.values()].reduce((n, c) => n + (c.id === current ? 0 : unread(c)), 0);
  document.title = total ? `(${total}) tether chat` : 'tether chat';
}

function renderConversations() {
  const list = $('#conversations');
  const rows = [...convs.values()].filter((c) => !c.left || c.id === current);
  rows.sort((a, b) => b.activity - a.activity || b.id - a.id);
  $('#no-conversations').hidden = rows.length > 0;
  const items = rows.map((c) => {
    if (c.id === current) c.readSeq = c.lastSeq;
    const n = unread(c);
    const li = document.createElement('li');
    li.dataset.id = String(c.id);
    li.dataset.unread = String(n);
    if (c.id === current) li.classList.add('current');
    li.tabIndex = 0;
    const title = document.createElement('span');
    title.className = 'title';
    title.textContent = c.title || `conversation ${c.id}`;
    const badge = document.createElement('span');
    badge.className = 'unread';
    badge.textContent = String(n);
    badge.hidden = n === 0;
    li.append(title, badge);
    return li;
  });
  list.replaceChildren(...items);
}

function fmtTime(iso) {
  const d = new Date(iso);
  return Number.isNaN(d.getTime()) ? '' : d.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
}

function systemText(e) {
  switch (e.event) {
    case 'conversation.created':
      return `${e.sender} started “${e.title || 'a conversation'}” with ${(e.members || []).join(', ')}`;
    case 'member.joined':
      return `${e.user} joined (added by ${e.sender})`;
    case 'member.left':
      return e.user === e.sender ? `${e.user} left` : `${e.user} was removed by ${e.sender}`;
    default:
      return `${e.event} by ${e.sender}`;
  }
}

function messageItem(e) {
  const li = document.createElement('li');
  li.className = 'message';
  if (e.sender === me) li.classList.add('mine');
  const who = document.createElement('span');
  who.className = 'sender';
  who.textContent = e.sender;
  const body = document.createElement('span');
  body.className = 'body';
  body.textContent = e.body ?? '';
  const time = document.createElement('span');
  time.className = 'time';
  li.append(who, body, time);
  return { li, time };
}

function renderChat() {
  const title = $('#conversation-title');
  const ta = $('#composer textarea');
  const send = $('#send');
  const ul = $('#messages');
  if (!current) {
    title.textContent = 'Pick a conversation';
    title.dataset.id = '';
    ta.disabled = send.disabled = true;
    $('#add-member-form').hidden = true;
    $('#older').hidden = true;
    ul.replaceChildren();
    $('#members').replaceChildren();
    $('#typing').hidden = true;
    return;
  }
  const c = conv(current);
  title.textContent = c.title || `conversation ${c.id}`;
  title.dataset.id = String(c.id);
  ta.disabled = send.disabled = c.left;
  $('#add-member-form').hidden = c.left;
  $('#older').hidden = c.historyDone || !c.historyLoaded;

  const scroller = $('#scroller');
  const atBottom = scroller.scrollHeight - scroller.scrollTop - scroller.clientHeight < 40;

  const items = [];
  const seqs = [...c.events.keys()].sort((a, b) => a - b);
  for (const seq of seqs) {
    const e = c.events.get(seq);
    if (e.event === 'message.created') {
      const { li, time } = messageItem(e);
      li.dataset.seq = String(seq);
      time.textContent = fmtTime(e.created_at);
      items.push(li);
    } else {
      const li = document.createElement('li');
      li.className = 'system';
      li.dataset.systemSeq = String(seq);
      li.textContent = systemText(e);
      items.push(li);
    }
  }
  for (const [id, p] of c.pending) {
    const { li, time } = messageItem({ sender: me, body: p.body });
    li.classList.add(p.error ? 'failed' : 'pending');
    li.dataset.clientMsgId = id;
    time.textContent = p.error ? `not sent: ${p.error.code}` : 'sending…';
    items.push(li);
  }
  // "seen by bob" under the last message each other member has read.
  const seenBy = new Map();
  for (const [user, readSeq] of c.reads) {
    if (user === me) continue;
    // Under the last message of someone else's that they have read.
    const last = seqs
      .filter((s) => s <= readSeq && c.events.get(s).event === 'message.created' && c.events.get(s).sender !== user)
      .pop();
    if (last != null) seenBy.set(last, [...(seenBy.get(last) || []), user]);
  }
  for (const li of items) {
    const users = seenBy.get(Number(li.dataset.seq));
    if (!users) continue;
    const seen = document.createElement('span');
    seen.className = 'seen';
    seen.dataset.seenBy = users.sort().join(' ');
    seen.textContent = `seen by ${users.sort().join(', ')}`;
    li.append(seen);
  }
  ul.replaceChildren(...items);
  renderMembers(c);
  if (atBottom || stickToBottom) scroller.scrollTop = scroller.scrollHeight;
  stickToBottom = false;
}

/** A dot per member (green while online anywhere), and who is typing. */
function renderMembers(c) {
  const users = [...c.members.keys()].sort();
  $('#members').replaceChildren(
    ...users.map((u) => {
      const m = c.members.get(u);
      const li = document.createElement('li');
      li.dataset.user = u;
      li.dataset.online = String(u === me || m.online);
      li.title = m.online || u === me ? `${u}: online` : `${u}: last seen ${m.lastSeen ? new Date(m.lastSeen).toLocaleString() : 'never'}`;
      const dot = document.createElement('span');
      dot.className = 'dot';
      li.append(dot, document.createTextNode(u));
      return li;
    }),
  );
  const now = Date.now();
  const typing = [...c.typing].filter(([u, until]) => until > now && u !== me).map(([u]) => u).sort();
  const el = $('#typing');
  el.hidden = typing.length === 0;
  el.dataset.users = typing.join(' ');
  el.textContent = typing.length === 1 ? `${typing[0]} is typing…` : `${typing.join(', ')} are typing…`;
}

// ----- toast ---------------------------------------------------------------

let toastTimer = null;
function toast(text) {
  const el = $('#toast');
  el.textContent = text;
  el.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => {
    el.hidden = true;
  }, 5000);
}

// ----- go ------------------------------------------------------------------

if (!token) {
  $('#login').hidden = false;
  $('#login-form').addEventListener('submit', (e) => {
    e.preventDefault();
    const t = $('#token-input').value.trim();
    if (t) {
      location.hash = `token=${encodeURIComponent(t)}`;
      location.reload();
    }
  });
} else {
  start(token);
}
