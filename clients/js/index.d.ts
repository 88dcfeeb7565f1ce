// Type declarations of @tether/client (src/index.js).

/** One committed event of a conversation's log (the wire frame without `type`). */
export interface TetherEvent {
  conversation_id: number;
  /** 1, 2, 3, ... per conversation, no gaps. */
  seq: number;
  /** The event type. */
  event: 'conversation.created' | 'member.joined' | 'member.left' | 'message.created' | (string & {});
  sender: string;
  /** RFC 3339, UTC. */
  created_at: string;
  /** message.created */
  body?: string;
  /** message.created: the sender's idempotency key. */
  client_msg_id?: string;
  /** member.joined / member.left: who joined or left. */
  user?: string;
  /** conversation.created */
  title?: string;
  /** conversation.created: the initial members. */
  members?: string[];
}

export type ConnectionState = 'idle' | 'connecting' | 'open' | 'synced' | 'reconnecting' | 'closed';

export interface StateChange {
  state: ConnectionState;
  /** connecting / reconnecting: consecutive failed attempts so far. */
  attempt?: number;
  /** reconnecting: milliseconds until the next attempt. */
  delay?: number;
  /** reconnecting / closed: the close code that ended the connection (1001 draining, 1013 too slow, 1008 policy, 1006 lost, 4000 client timeout). */
  code?: number;
  reason?: string;
  /** open: who the server says we are. */
  user?: string;
  /** open / synced: the worker serving the connection. */
  worker?: string;
  /** open: the transport of the connection. */
  transport?: Transport;
  /** closed after giving up (e.g. `unauthorized`). */
  error?: TetherError;
}

export interface SyncedInfo {
  worker: string | null;
}

/**
 * The server's history of a conversation starts at `from_seq`: older
 * events were pruned by its retention while this user was behind. Events
 * continue from there, gap-free.
 */
/**
 * Another member's presence: a change, or (right after `synced`) the
 * current state. Pushed in conversations of at most the server's
 * `--presence-push-max-members`; offline only after its grace period.
 */
export interface PresenceInfo {
  conversation_id: number;
  conversationId: number;
  user: string;
  status: 'online' | 'offline';
  online: boolean;
  /** RFC 3339; null for a user never seen. */
  last_seen: string | null;
  lastSeen: string | null;
}

/** Another member is typing: show it for 5 s unless renewed. */
export interface TypingInfo {
  conversation_id: number;
  conversationId: number;
  user: string;
}

/** Another member has read up to `seq`. */
export interface ReadInfo {
  conversation_id: number;
  conversationId: number;
  user: string;
  seq: number;
}

export interface MemberPresence {
  user: string;
  status: 'online' | 'offline';
  last_seen: string | null;
  /** The highest seq this member has read (their cursor). */
  read_seq: number;
}

export interface TruncatedInfo {
  conversation_id: number;
  from_seq: number;
  /** Alias of conversation_id. */
  conversationId: number;
  /** Alias of from_seq. */
  fromSeq: number;
}

export interface SendResult {
  seq: number;
  /** True when the server had already committed this client_msg_id (a retry). */
  duplicate: boolean;
  conversation_id: number;
  client_msg_id: string;
  /** Alias of conversation_id. */
  conversationId: number;
  /** Alias of client_msg_id. */
  clientMsgId: string;
}

export interface SendOptions {
  /** Your own idempotency key (default: crypto.randomUUID()); reuse it to retry without a second event. */
  clientMsgId?: string;
  /** Called synchronously with the client_msg_id once the send is queued (optimistic UI). */
  onQueued?: (clientMsgId: string) => void;
  /** Reject with `timeout` after this many ms (the send may still have been stored). */
  timeoutMs?: number;
  /** Reject with `aborted` when this signal aborts (the send may still have been stored). */
  signal?: AbortSignal;
}

/** How the client reaches the gateway: a WebSocket, or Server-Sent Events with sends and acks over HTTP. */
export type Transport = 'websocket' | 'sse';

export interface TransportChange {
  transport: Transport;
  /** Why: the WebSocket was refused with an HTTP status, or failed `sseAfterFailures` times. */
  reason: string;
}

export interface TetherClientOptions {
  /** The gateway: "https://chat.example.com" (or ws(s)://; a trailing /v1/ws is fine). Default in browsers: location.origin. */
  url?: string;
  /** A fixed token (used for the first connection, and for all when there is no getToken). */
  token?: string;
  /** Returns a token; asked when there is none, when it expires within tokenRefreshMarginMs, and once more after an authentication failure. */
  getToken?: () => string | Promise<string>;
  /** The WebSocket constructor (default globalThis.WebSocket; in Node 20 pass `WebSocket` from the "ws" package). */
  WebSocket?: any;
  /** fetch() for the REST helpers and SSE (default globalThis.fetch). */
  fetch?: typeof fetch;
  /** Transports in order of preference. Default ['websocket']; ['websocket', 'sse'] falls back to SSE when WebSocket does not get through; ['sse'] uses SSE only. */
  transports?: Transport[];
  /** WebSocket connects that failed in a row (never opened) before falling back to SSE. Default 3. */
  sseAfterFailures?: number;
  /** The EventSource constructor for SSE (default globalThis.EventSource; without one, a fetch stream with the token in a header). */
  EventSource?: any;
  /** First reconnect window in ms (full jitter: the delay is uniform in [floor, min(cap, base * 2^attempt)]). Default 100. */
  backoffBaseMs?: number;
  /** Largest reconnect window in ms. Default 5000. */
  backoffCapMs?: number;
  /** Shortest reconnect delay in ms. Default 10. */
  backoffFloorMs?: number;
  /** Reconnect window after 1001 (draining) or 1013 (too slow). Default 100. */
  soonMs?: number;
  /** A connection synced this long resets the backoff. Default 1000. */
  stableMs?: number;
  /** Ack an event once every listener returned (or its promise settled). false: only ack() acks. Default true. */
  autoAck?: boolean;
  /** Ask getToken() again when the token expires within this many ms. Default 30000. */
  tokenRefreshMarginMs?: number;
  /** At most one REST probe for a 401 per this many ms after failed handshakes (browsers). Default 30000. */
  probeIntervalMs?: number;
  /** Give up on a handshake (and the hello frame) after this. Default 10000. */
  connectTimeoutMs?: number;
  /** Ping when nothing was received for this long (0: never). Default 25000. */
  heartbeatMs?: number;
  /** Drop the connection when a ping is not answered within this. Default 10000. */
  heartbeatTimeoutMs?: number;
  /** Ack at most this long after an event. Default 1000. */
  ackDelayMs?: number;
  /** Ack at once after this many events. Default 64. */
  ackEvery?: number;
  /** Sends waiting for `sent` before send() rejects with `outbox_full`. Default 1000. */
  outboxLimit?: number;
  /** Largest send frame (bytes); larger sends reject with `payload_too_large`. Default 262144. */
  maxFrameBytes?: number;
  /** Retries of sendMessage() (REST) on 503, 429 and network errors. Default 3. */
  httpRetries?: number;
  /** Highest seq already seen per conversation (e.g. persisted from lastSeqs()). */
  lastSeqs?: Record<string, number>;
  /** Random source in [0, 1) for the jitter (tests). */
  random?: () => number;
}

/**
 * A gateway or client error. Codes: the server's (`not_found`,
 * `invalid_field`, `payload_too_large`, `rate_limited`,
 * `database_unavailable`, `unauthorized`, ...) and the client's own:
 * `gap` (an event skipped seqs: `conversationId`, `expected`, `got`),
 * `outbox_full`, `closed`, `token_error`, `network`, `not_connected`,
 * `timeout`, `aborted`, `connect_failed` (with `cause`), `config` (final:
 * a handshake refused with a 4xx other than 401/429), `listener_failed`.
 */
export class TetherError extends Error {
  constructor(code: string, message?: string, details?: Record<string, unknown>);
  code: string;
  conversationId?: number;
  clientMsgId?: string;
  expected?: number;
  got?: number;
  /** HTTP status (REST helpers). */
  status?: number;
  /** Seconds, where the server said when to retry. */
  retryAfter?: number;
  closeCode?: number;
  /** connect_failed: what the WebSocket said; listener_failed: the rejection. */
  cause?: unknown;
  seq?: number;
}

/** An event listener; with autoAck, a returned promise delays the ack until it settles. */
export type Listener<T> = (value: T) => unknown;

export interface TetherEventMap {
  event: TetherEvent;
  synced: SyncedInfo;
  truncated: TruncatedInfo;
  presence: PresenceInfo;
  typing: TypingInfo;
  read: ReadInfo;
  state: StateChange;
  error: TetherError;
  /** The client fell back to another transport. */
  transport: TransportChange;
}

export interface ConversationSummary {
  id: number;
  title: string;
  last_seq: number;
  /** The highest seq this user has acknowledged. */
  cursor: number;
  /** last_seq - cursor. */
  unread: number;
  role: 'owner' | 'admin' | 'member';
  history: 'since_join' | 'shared';
}

export interface ConversationsPage {
  conversations: ConversationSummary[];
  /** Pass as `after` for the next page; null on the last. */
  next: string | null;
}

export interface EventsPage {
  events: TetherEvent[];
  /** Newest-first pages: pass as `beforeSeq` for older events; null on the last page. */
  next_before_seq?: number | null;
  /** Oldest-first pages (afterSeq): pass as `afterSeq` for newer events; null on the last page. */
  next_after_seq?: number | null;
}

export class TetherClient {
  constructor(options: TetherClientOptions);

  /** The user id (from the token, then from `hello`). */
  readonly user: string | null;
  /** The worker serving the current connection (from `hello`). */
  readonly worker: string | null;
  readonly state: ConnectionState;
  /** True between `synced` and the end of the connection. */
  readonly synced: boolean;
  /** The transport in use. */
  readonly transport: Transport;
  /** Sends waiting for the server's answer. */
  readonly pending: number;
  readonly wsUrl: string;
  readonly httpUrl: string;

  /** Starts connecting; reconnects until close(). */
  connect(): this;
  /** Closes for good: flushes acks; pending sends reject with `closed`. */
  close(): void;
  /** Connects at once if waiting out a backoff (browsers do it when online or visible again). */
  reconnectNow(): void;
  /** Acknowledges up to seq (with autoAck: false); clamped to what was delivered. */
  ack(conversationId: number, seq: number): boolean;
  /** One conversation's view. */
  conversation(conversationId: number): Conversation;
  /** Resolves at the next `synced` (at once if synced); rejects if the client closes first. */
  whenSynced(): Promise<void>;

  on<K extends keyof TetherEventMap>(name: K, fn: Listener<TetherEventMap[K]>): () => void;
  off<K extends keyof TetherEventMap>(name: K, fn: Listener<TetherEventMap[K]>): void;
  once<K extends keyof TetherEventMap>(name: K): Promise<TetherEventMap[K]>;

  /** The highest seq seen in a conversation. */
  lastSeq(conversationId: number): number | undefined;
  /** All of them, to persist and pass back as `lastSeqs`. */
  lastSeqs(): Record<string, number>;

  /**
   * Sends a message over the WebSocket; resolves once committed. Retried
   * with the same client_msg_id across reconnects (never a second event);
   * rejects on a final error, `outbox_full` or `closed`.
   */
  send(conversationId: number, body: string, options?: SendOptions): Promise<SendResult>;

  createConversation(options?: { members?: string[]; title?: string; history?: 'since_join' | 'shared' }): Promise<{
    id: number;
    title: string;
    members: string[];
    seq: number;
    history: 'since_join' | 'shared';
  }>;
  addMember(
    conversationId: number,
    user: string,
    options?: { role?: 'member' | 'admin' },
  ): Promise<{ added: boolean; role?: string; seq?: number }>;
  setRole(conversationId: number, user: string, role: 'member' | 'admin'): Promise<{ role: string; changed: boolean; seq?: number }>;
  removeMember(
    conversationId: number,
    user: string,
  ): Promise<{ removed: boolean; seq?: number; new_owner?: string | null }>;
  listConversations(options?: { after?: string | number; limit?: number }): Promise<ConversationsPage>;
  /** Tells the other members this user is typing (at most once every 2 s forwarded); false when not connected. */
  typing(conversationId: number | string): boolean;
  /** GET /v1/conversations/{id}/presence. */
  presence(conversationId: number | string): Promise<{ members: MemberPresence[] }>;
  eventsPage(
    conversationId: number,
    options?: { beforeSeq?: number; afterSeq?: number; limit?: number },
  ): Promise<EventsPage>;
  /** POST .../messages; the committed event. */
  sendMessage(
    conversationId: number,
    body: string,
    options?: { clientMsgId?: string; retries?: number },
  ): Promise<TetherEvent>;
}

/** One conversation over a client: its events, send, history, back-fill, mark-read. */
export class Conversation {
  constructor(client: TetherClient, conversationId: number);
  readonly client: TetherClient;
  readonly id: number;
  readonly lastSeq: number | undefined;
  on(name: 'message' | 'event', fn: Listener<TetherEvent>): () => void;
  on(name: 'gap', fn: Listener<TetherError>): () => void;
  /** Removes every listener added through this view. */
  off(): void;
  send(body: string, options?: SendOptions): Promise<SendResult>;
  history(options?: { beforeSeq?: number; afterSeq?: number; limit?: number }): Promise<EventsPage>;
  /** Every event in from..to, oldest first. */
  backfill(from: number, to: number): Promise<TetherEvent[]>;
  /** Marks read up to seq (the server's cursor). */
  markRead(seq: number): boolean;
}

/** A random UUID v4 (crypto.randomUUID where available). */
export function uuid(): string;
/** The `sub` of a JWT, unverified; null if unreadable. */
export function tokenUser(token: string): string | null;

export default TetherClient;
