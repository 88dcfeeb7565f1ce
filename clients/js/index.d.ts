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
  /** closed after giving up (e.g. `unauthorized`). */
  error?: TetherError;
}

export interface SyncedInfo {
  worker: string | null;
}

export interface SendResult {
  seq: number;
  /** True when the server had already committed this client_msg_id (a retry). */
  duplicate: boolean;
  conversationId: number;
  clientMsgId: string;
}

export interface SendOptions {
  /** Your own idempotency key (default: crypto.randomUUID()). */
  clientMsgId?: string;
  /** Called synchronously with the client_msg_id once the send is queued. */
  onQueued?: (clientMsgId: string) => void;
}

export interface TetherClientOptions {
  /** The gateway: "https://chat.example.com" (or ws(s)://; a trailing /v1/ws is fine). Default in browsers: location.origin. */
  url?: string;
  /** A fixed token (used for the first connection, and for all when there is no getToken). */
  token?: string;
  /** Returns a token; called before every connection attempt, and once more after an authentication failure. */
  getToken?: () => string | Promise<string>;
  /** The WebSocket constructor (default globalThis.WebSocket; in Node 20 pass `WebSocket` from the "ws" package). */
  WebSocket?: any;
  /** fetch() for the REST helpers (default globalThis.fetch). */
  fetch?: typeof fetch;
  /** First reconnect window in ms (full jitter: the delay is uniform in [0, min(cap, base * 2^attempt)]). Default 500. */
  backoffBaseMs?: number;
  /** Largest reconnect window in ms. Default 30000. */
  backoffCapMs?: number;
  /** Reconnect window after 1001 (draining) or 1013 (too slow). Default 250. */
  soonMs?: number;
  /** A connection synced this long resets the backoff. Default 5000. */
  stableMs?: number;
  /** Give up on a handshake (and the hello frame) after this. Default 15000. */
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
 * `outbox_full`, `closed`, `token_error`, `network`.
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
}

export interface TetherEventMap {
  event: TetherEvent;
  synced: SyncedInfo;
  state: StateChange;
  error: TetherError;
}

export interface ConversationSummary {
  id: number;
  title: string;
  last_seq: number;
  /** The highest seq this user has acknowledged. */
  cursor: number;
  /** last_seq - cursor. */
  unread: number;
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
  /** Sends waiting for the server's answer. */
  readonly pending: number;
  readonly wsUrl: string;
  readonly httpUrl: string;

  /** Starts connecting; reconnects until close(). */
  connect(): this;
  /** Closes for good: pending sends reject with `closed`. */
  close(): void;
  /** Resolves at the next `synced` (at once if synced); rejects if the client closes first. */
  whenSynced(): Promise<void>;

  on<K extends keyof TetherEventMap>(name: K, fn: (value: TetherEventMap[K]) => void): () => void;
  off<K extends keyof TetherEventMap>(name: K, fn: (value: TetherEventMap[K]) => void): void;
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

  createConversation(options?: { members?: string[]; title?: string }): Promise<{
    id: number;
    title: string;
    members: string[];
    seq: number;
  }>;
  addMember(
    conversationId: number,
    user: string,
  ): Promise<{ conversation_id: number; user: string; added: boolean; seq?: number }>;
  removeMember(
    conversationId: number,
    user: string,
  ): Promise<{ conversation_id: number; user: string; removed: boolean; seq: number | null }>;
  listConversations(options?: { after?: string | number; limit?: number }): Promise<ConversationsPage>;
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

/** A random UUID v4 (crypto.randomUUID where available). */
export function uuid(): string;
/** The `sub` of a JWT, unverified; null if unreadable. */
export function tokenUser(token: string): string | null;

export default TetherClient;
