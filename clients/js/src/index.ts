/**
 * The presence-hub client for browsers and Node 20+.
 *
 * `PresenceClient` keeps one WebSocket open for as long as it is used: it
 * reconnects after any drop with exponential backoff and full jitter (so that
 * thousands of clients that lost a node do not come back in one wave),
 * resubscribes with the `ver` it holds of every contact (the hub answers with
 * only what changed), refreshes its token before it expires, and merges every
 * snapshot and update into a live map by `ver`, so that a late or duplicate
 * frame never overwrites newer state. `ProducerClient` posts call and meeting
 * events over the HTTP API.
 */

import { decode, encode } from "@msgpack/msgpack";

export type ManualStatus = "available" | "busy" | "dnd" | "away" | "invisible";
export type Status = "available" | "busy" | "dnd" | "on_call" | "away" | "offline";
export type Device = "desktop" | "mobile" | "web";
export type Format = "msgpack" | "json";
export type ConnectionState = "connecting" | "live" | "reconnecting" | "closed";
export type ErrorCode =
  | "bad_request"
  | "forbidden"
  | "limit_exceeded"
  | "rate_limited"
  | "unavailable"
  | "internal"
  | "timeout";

/** What observers see of a user (PROTOCOL.md: Presence). */
export interface Presence {
  user: string;
  status: Status;
  message: string | null;
  since: number | null;
  ver: number;
}

/** The user's own state (PROTOCOL.md: Self). */
export interface SelfMap {
  manual: ManualStatus;
  manual_until: number | null;
  message: string | null;
  message_expires_at: number | null;
  effective: Status;
  since: number | null;
  calls: number;
  meetings: number;
  idle: boolean;
  devices: Device[];
  auto_away_after: number | null;
  ver: number;
}

export interface Welcome {
  session: string;
  user: string;
  tenant: string;
  device: Device;
  server_time: number;
  self: SelfMap;
}

export type EventKind = "call_started" | "call_ended" | "meeting_started" | "meeting_ended";

/** A producer event (PROTOCOL.md: Event). */
export interface PresenceEvent {
  event_id: string;
  kind: EventKind;
  user: string;
  ref: string;
  at: number;
  max_duration?: number;
}

export interface EventResult {
  result: "applied" | "duplicate" | "stale" | "rejected";
  error?: string;
}

/** A request the hub refused, or could not answer: `code` is PROTOCOL.md's error code. */
export class HubError extends Error {
  constructor(
    readonly code: ErrorCode,
    message: string,
  ) {
    super(`${code}: ${message}`);
    this.name = "HubError";
  }
}

/** The part of a WebSocket the client uses: the browser's, or `ws`'s in Node. */
export interface WebSocketLike {
  binaryType: string;
  readonly readyState: number;
  readonly protocol: string;
  send(data: string | Uint8Array): void;
  close(code?: number, reason?: string): void;
  onopen: ((event: unknown) => void) | null;
  onmessage: ((event: { data: unknown }) => void) | null;
  onclose: ((event: { code: number; reason: string }) => void) | null;
  onerror: ((event: unknown) => void) | null;
}

/** A WebSocket class: the third argument carries `ws`'s options in Node (headers). */
export type WebSocketClass = new (
  url: string,
  protocols: string[],
  options?: { headers: Record<string, string> },
) => WebSocketLike;

export type TokenSource = string | (() => string | Promise<string>);

export interface PresenceClientOptions {
  /** The hub's WebSocket URL, e.g. `ws://127.0.0.1:8765/v1/ws`. */
  url: string;
  /** A token, or a function that returns a fresh one: called at every connect and
   * `refreshBefore` seconds before the current one expires. */
  token: TokenSource;
  device?: Device;
  format?: Format;
  /** The WebSocket implementation: the global one by default (browsers); `ws` in Node.
   * With it, the token travels in a header; with the browser's, in the URL. */
  WebSocket?: WebSocketClass;
  /** How long a request waits for its reply, in milliseconds. */
  requestTimeout?: number;
  /** The first reconnect delay's bound and the largest, in milliseconds. */
  backoff?: { initial: number; max: number };
  /** At most one `activity` report in this many milliseconds. */
  activityInterval?: number;
  /** Seconds before the token's expiry at which a fresh one is asked for. */
  refreshBefore?: number;
  /** The random source of the backoff's jitter, in [0, 1). */
  random?: () => number;
}

/** Users per subscribe or query request (PROTOCOL.md). */
export const MAX_USERS_PER_REQUEST = 1000;

const SUBPROTOCOLS: Record<Format, string> = {
  msgpack: "presence.v1.msgpack",
  json: "presence.v1.json",
};
const OPEN = 1;

type Frame = Record<string, unknown>;
interface Pending {
  resolve: (frame: Frame) => void;
  reject: (error: Error) => void;
  timer: ReturnType<typeof setTimeout>;
}

/** Keep `presence` if it is newer than what `contacts` holds of its user; true if kept. */
export function mergePresence(contacts: Map<string, Presence>, presence: Presence): boolean {
  const held = contacts.get(presence.user);
  if (held !== undefined && held.ver >= presence.ver) {
    return false;
  }
  contacts.set(presence.user, presence);
  return true;
}

/** The `exp` of a JWT, in Unix seconds, or null if it has none (or is not a JWT). */
export function tokenExpiry(token: string): number | null {
  const payload = token.split(".")[1];
  if (payload === undefined) {
    return null;
  }
  try {
    const base64 = payload.replace(/-/g, "+").replace(/_/g, "/");
    const claims: unknown = JSON.parse(atob(base64));
    const exp = (claims as { exp?: unknown }).exp;
    return typeof exp === "number" ? exp : null;
  } catch {
    return null;
  }
}

/** A delay in milliseconds before reconnect `attempt` (0 first): full jitter. */
export function backoffDelay(
  attempt: number,
  backoff: { initial: number; max: number },
  random: () => number = Math.random,
): number {
  const bound = Math.min(backoff.max, backoff.initial * 2 ** attempt);
  return random() * bound;
}

export interface PresenceClientEvents {
  /** A contact's presence changed (a newer `ver`). */
  presence: Presence;
  /** The user's own state changed. */
  self: SelfMap;
  /** The connection's state changed. */
  state: ConnectionState;
  /** A welcome arrived: connected, or connected again. */
  welcome: Welcome;
}

type Listener<K extends keyof PresenceClientEvents> = (value: PresenceClientEvents[K]) => void;

export class PresenceClient {
  readonly options: Required<Omit<PresenceClientOptions, "WebSocket">> & {
    WebSocket: WebSocketClass | undefined;
  };
  /** Every known contact's presence, the newest `ver` of each. */
  readonly presence: ReadonlyMap<string, Presence>;
  /** The user's own state, kept current by the hub (null before the first welcome). */
  me: SelfMap | null = null;
  /** The latest welcome. */
  welcome: Welcome | null = null;
  state: ConnectionState = "connecting";

  private readonly contacts = new Map<string, Presence>();
  private readonly watched = new Set<string>();
  private readonly pending = new Map<number, Pending>();
  private readonly listeners = new Map<keyof PresenceClientEvents, Set<Listener<never>>>();
  private ws: WebSocketLike | null = null;
  private nextId = 1;
  private attempt = 0;
  private closing = false;
  private token = "";
  private reconnectTimer: ReturnType<typeof setTimeout> | null = null;
  private refreshTimer: ReturnType<typeof setTimeout> | null = null;
  private lastActivity = -Infinity;
  private firstWelcome: { resolve: () => void; reject: (error: Error) => void } | null = null;

  constructor(options: PresenceClientOptions) {
    this.options = {
      device: "desktop",
      format: "msgpack",
      requestTimeout: 10_000,
      backoff: { initial: 500, max: 30_000 },
      activityInterval: 30_000,
      refreshBefore: 60,
      random: Math.random,
      ...options,
      WebSocket: options.WebSocket,
    };
    this.presence = this.contacts;
  }

  /** A client connected to the hub: resolves once the first welcome arrived. */
  static async connect(options: PresenceClientOptions): Promise<PresenceClient> {
    const client = new PresenceClient(options);
    await client.open();
    return client;
  }

  /** Connect, and keep connecting; resolves once the first welcome arrived. */
  open(): Promise<void> {
    const welcomed = new Promise<void>((resolve, reject) => {
      this.firstWelcome = { resolve, reject };
    });
    const gaveUp = setTimeout(() => {
      this.fail(new HubError("unavailable", "no welcome from the hub in time"));
    }, this.options.requestTimeout);
    void this.dial();
    return welcomed.finally(() => clearTimeout(gaveUp));
  }

  on<K extends keyof PresenceClientEvents>(kind: K, listener: Listener<K>): () => void {
    let set = this.listeners.get(kind);
    if (set === undefined) {
      set = new Set();
      this.listeners.set(kind, set);
    }
    set.add(listener as Listener<never>);
    return () => set.delete(listener as Listener<never>);
  }

  /** Every presence change from this call on, as it comes, until `close()` or the
   * loop's `break`. The changes are queued from the call, not from the first `next()`. */
  updates(): AsyncIterableIterator<Presence> {
    const queue: Presence[] = [];
    let wake: (() => void) | null = null;
    const offPresence = this.on("presence", (p) => {
      queue.push(p);
      wake?.();
    });
    const offState = this.on("state", () => wake?.());
    const stop = (): IteratorResult<Presence> => {
      offPresence();
      offState();
      return { done: true, value: undefined };
    };
    const iterator: AsyncIterableIterator<Presence> = {
      next: async () => {
        while (queue.length === 0 && this.state !== "closed") {
          await new Promise<void>((resolve) => {
            wake = resolve;
          });
          wake = null;
        }
        const value = queue.shift();
        return value === undefined ? stop() : { done: false, value };
      },
      return: async () => stop(),
      [Symbol.asyncIterator]: () => iterator,
    };
    return iterator;
  }

  // --- Requests (PROTOCOL.md: client to hub) ----------------------------------------

  /** Watch `users`; resolves with their presence (also merged into `presence`). */
  async subscribe(users: Iterable<string>): Promise<Presence[]> {
    const list = [...users];
    for (const user of list) {
      this.watched.add(user);
    }
    for (let start = 0; start < list.length; start += MAX_USERS_PER_REQUEST) {
      const chunk = list.slice(start, start + MAX_USERS_PER_REQUEST);
      const known: Record<string, number> = {};
      for (const user of chunk) {
        const held = this.contacts.get(user);
        if (held !== undefined) {
          known[user] = held.ver;
        }
      }
      // The snapshot holds only the users whose ver differs from the one held.
      this.mergeSnapshot(await this.request({ type: "subscribe", users: chunk, known }));
    }
    return list.flatMap((user) => this.contacts.get(user) ?? []);
  }

  async unsubscribe(users: Iterable<string>): Promise<void> {
    const list = [...users];
    for (const user of list) {
      this.watched.delete(user);
      this.contacts.delete(user);
    }
    await this.request({ type: "unsubscribe", users: list });
  }

  /** The presence of `users` now, without watching them. */
  async query(users: Iterable<string>): Promise<Presence[]> {
    const reply = await this.request({ type: "query", users: [...users] });
    return reply.presences as Presence[];
  }

  /** `until`: when the status becomes `available` by itself (Unix seconds); null: never. */
  async setStatus(status: ManualStatus, options: { until?: number | null } = {}): Promise<void> {
    await this.request({ type: "set_status", status, until: options.until ?? null });
  }

  async setMessage(
    text: string | null,
    options: { expiresAt?: number | null } = {},
  ): Promise<void> {
    await this.request({ type: "set_message", text, expires_at: options.expiresAt ?? null });
  }

  /** `autoAwayAfter`: seconds of inactivity after which the user shows away; null: off. */
  async setSettings(settings: { autoAwayAfter: number | null }): Promise<void> {
    await this.request({ type: "set_settings", auto_away_after: settings.autoAwayAfter });
  }

  /** The person interacted with the app; sent at most once per `activityInterval`, so
   * it may be called on every keystroke. True when a report was sent. */
  activity(): boolean {
    const now = Date.now();
    if (now - this.lastActivity < this.options.activityInterval || !this.isOpen()) {
      return false;
    }
    this.lastActivity = now;
    this.send({ type: "activity" });
    return true;
  }

  /** Hand the hub a fresh token for the same user before the current one expires (the
   * client does this by itself when its token is a function). */
  async auth(token: string): Promise<void> {
    await this.request({ type: "auth", token });
    this.token = token;
    this.scheduleRefresh();
  }

  /** A producer event over the WebSocket (producer tokens only). */
  async sendEvent(event: PresenceEvent): Promise<EventResult> {
    const reply = await this.request({ type: "event", event });
    const result: EventResult = { result: reply.result as EventResult["result"] };
    if (typeof reply.error === "string") {
      result.error = reply.error;
    }
    return result;
  }

  /** Log out: the socket closes with 1000 and the user's session ends at once. */
  async close(): Promise<void> {
    this.closing = true;
    this.clearTimers();
    const ws = this.ws;
    this.ws = null;
    this.setState("closed");
    this.failPending(new HubError("unavailable", "the client was closed"));
    if (ws !== null && ws.readyState <= OPEN) {
      await new Promise<void>((resolve) => {
        const done = setTimeout(resolve, 5000);
        ws.onclose = () => {
          clearTimeout(done);
          resolve();
        };
        ws.close(1000, "logout");
      });
    }
  }

  // --- The connection ----------------------------------------------------------------

  /** Give up before the first welcome: `open()` rejects and the client closes. */
  private fail(error: Error): void {
    const first = this.firstWelcome;
    if (first === null) {
      return;
    }
    this.firstWelcome = null;
    void this.close();
    first.reject(error);
  }

  private async dial(): Promise<void> {
    if (this.closing) {
      return;
    }
    this.setState(this.attempt === 0 && this.welcome === null ? "connecting" : "reconnecting");
    let ws: WebSocketLike;
    try {
      this.token = await this.freshToken();
      ws = this.newSocket();
    } catch (error) {
      this.scheduleReconnect();
      return;
    }
    this.ws = ws;
    ws.binaryType = "arraybuffer";
    ws.onmessage = (event) => this.received(ws, event.data);
    ws.onerror = (event) => {
      // Node's ws says why the handshake failed; a browser never does. A token the hub
      // refuses will not pass on a retry unless the token source can make a new one.
      const why = String((event as { message?: unknown }).message ?? "");
      if (why.includes("401") && typeof this.options.token === "string") {
        this.fail(new HubError("forbidden", "the hub refused the token"));
      }
    };
    ws.onclose = (event) => this.closed(ws, event.code);
  }

  private newSocket(): WebSocketLike {
    const { url, device, format } = this.options;
    const target = new URL(url);
    target.searchParams.set("device", device);
    const protocols = [SUBPROTOCOLS[format]];
    const Impl = this.options.WebSocket;
    if (Impl !== undefined) {
      return new Impl(target.toString(), protocols, {
        headers: { Authorization: `Bearer ${this.token}` },
      });
    }
    // A browser's WebSocket cannot send headers: the token goes in the query.
    target.searchParams.set("access_token", this.token);
    const Global = (globalThis as { WebSocket?: WebSocketClass }).WebSocket;
    if (Global === undefined) {
      throw new Error("no WebSocket here: pass one as the WebSocket option (ws in Node)");
    }
    return new Global(target.toString(), protocols);
  }

  private async freshToken(): Promise<string> {
    const source = this.options.token;
    return typeof source === "string" ? source : await source();
  }

  private received(ws: WebSocketLike, data: unknown): void {
    if (ws !== this.ws) {
      return;
    }
    let frame: Frame;
    try {
      frame = this.decode(data);
    } catch {
      return;
    }
    switch (frame.type) {
      case "welcome":
        this.welcomed(frame as unknown as Welcome & Frame);
        break;
      case "presence":
        this.mergeOne(frame as unknown as Presence);
        break;
      case "presences":
        for (const item of frame.items as Presence[]) {
          this.mergeOne(item);
        }
        break;
      case "self":
        this.mergeSelf(frame as unknown as SelfMap);
        break;
      default:
        this.answered(frame);
    }
  }

  private welcomed(welcome: Welcome): void {
    const first = this.welcome === null;
    this.welcome = welcome;
    this.attempt = 0;
    this.me = null;
    this.mergeSelf(welcome.self);
    this.setState("live");
    this.scheduleRefresh();
    this.emit("welcome", welcome);
    if (first) {
      this.firstWelcome?.resolve();
      this.firstWelcome = null;
    } else if (this.watched.size > 0) {
      // Connected again: resubscribe, with the ver held of each contact.
      this.subscribe([...this.watched]).catch(() => undefined);
    }
  }

  private closed(ws: WebSocketLike, code: number): void {
    if (ws !== this.ws) {
      return;
    }
    this.ws = null;
    this.failPending(new HubError("unavailable", `connection closed (${code})`));
    if (this.closing) {
      return;
    }
    this.scheduleReconnect();
  }

  private scheduleReconnect(): void {
    if (this.closing) {
      return;
    }
    this.clearTimers();
    this.setState("reconnecting");
    const delay = backoffDelay(this.attempt, this.options.backoff, this.options.random);
    this.attempt += 1;
    this.reconnectTimer = setTimeout(() => {
      this.reconnectTimer = null;
      void this.dial();
    }, delay);
  }

  private scheduleRefresh(): void {
    if (this.refreshTimer !== null) {
      clearTimeout(this.refreshTimer);
      this.refreshTimer = null;
    }
    const exp = tokenExpiry(this.token);
    if (exp === null || typeof this.options.token === "string") {
      return;
    }
    const inMs = Math.max(0, (exp - this.options.refreshBefore) * 1000 - Date.now());
    this.refreshTimer = setTimeout(() => void this.refresh(), inMs);
  }

  private async refresh(): Promise<void> {
    this.refreshTimer = null;
    try {
      await this.auth(await this.freshToken());
    } catch {
      // Try again soon; if the token expires first, the hub closes and we reconnect.
      this.refreshTimer = setTimeout(() => void this.refresh(), 1000);
    }
  }

  // --- Frames ------------------------------------------------------------------------

  private request(frame: Frame): Promise<Frame> {
    const id = this.nextId++;
    return new Promise<Frame>((resolve, reject) => {
      if (!this.isOpen()) {
        reject(new HubError("unavailable", "not connected; retry later"));
        return;
      }
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new HubError("timeout", `no reply to ${String(frame.type)} in time`));
      }, this.options.requestTimeout);
      this.pending.set(id, { resolve, reject, timer });
      this.send({ ...frame, id });
    });
  }

  private answered(frame: Frame): void {
    const id = frame.id;
    if (typeof id !== "number") {
      return;
    }
    const waiting = this.pending.get(id);
    if (waiting === undefined) {
      return;
    }
    this.pending.delete(id);
    clearTimeout(waiting.timer);
    if (frame.type === "error") {
      waiting.reject(new HubError(frame.code as ErrorCode, String(frame.message)));
    } else {
      waiting.resolve(frame);
    }
  }

  private send(frame: Frame): void {
    const ws = this.ws;
    if (ws === null || ws.readyState !== OPEN) {
      return;
    }
    ws.send(this.options.format === "json" ? JSON.stringify(frame) : encode(frame));
  }

  private decode(data: unknown): Frame {
    if (typeof data === "string") {
      return JSON.parse(data) as Frame;
    }
    return decode(new Uint8Array(data as ArrayBuffer)) as Frame;
  }

  private mergeSnapshot(reply: Frame): void {
    for (const p of reply.presences as Presence[]) {
      this.mergeOne(p);
    }
  }

  private mergeOne(presence: Presence): void {
    if (this.watched.has(presence.user) && mergePresence(this.contacts, presence)) {
      this.emit("presence", presence);
    }
  }

  private mergeSelf(own: SelfMap): void {
    if (this.me !== null && own.ver < this.me.ver) {
      return;
    }
    this.me = own;
    this.emit("self", own);
  }

  private emit<K extends keyof PresenceClientEvents>(kind: K, value: PresenceClientEvents[K]): void {
    for (const listener of this.listeners.get(kind) ?? []) {
      (listener as Listener<K>)(value);
    }
  }

  private setState(state: ConnectionState): void {
    if (this.state !== state) {
      this.state = state;
      this.emit("state", state);
    }
  }

  private isOpen(): boolean {
    return this.ws !== null && this.ws.readyState === OPEN && this.welcome !== null;
  }

  private failPending(error: Error): void {
    for (const [id, waiting] of this.pending) {
      clearTimeout(waiting.timer);
      waiting.reject(error);
      this.pending.delete(id);
    }
  }

  private clearTimers(): void {
    if (this.reconnectTimer !== null) {
      clearTimeout(this.reconnectTimer);
      this.reconnectTimer = null;
    }
    if (this.refreshTimer !== null) {
      clearTimeout(this.refreshTimer);
      this.refreshTimer = null;
    }
  }
}

/** The HTTP API's producer side: events in, presence (with `accepts_calls`) out. */
export class ProducerClient {
  constructor(
    readonly httpUrl: string,
    readonly token: string,
    private readonly fetchImpl: typeof fetch = globalThis.fetch,
  ) {}

  /** Up to 1,000 events in one request; one result each, in order. */
  async postEvents(events: PresenceEvent[]): Promise<(EventResult & { event_id: string })[]> {
    const body = (await this.call("POST", "/v1/events", { events })) as {
      results: (EventResult & { event_id: string })[];
    };
    return body.results;
  }

  async presence(users: string[]): Promise<(Presence & { accepts_calls: boolean })[]> {
    const query = encodeURIComponent(users.join(","));
    const body = (await this.call("GET", `/v1/presence?users=${query}`)) as {
      presences: (Presence & { accepts_calls: boolean })[];
    };
    return body.presences;
  }

  private async call(method: string, path: string, body?: unknown): Promise<unknown> {
    const response = await this.fetchImpl(new URL(path, this.httpUrl), {
      method,
      headers: {
        Authorization: `Bearer ${this.token}`,
        ...(body === undefined ? {} : { "Content-Type": "application/json" }),
      },
      body: body === undefined ? null : JSON.stringify(body),
    });
    const answer: unknown = await response.json().catch(() => ({}));
    if (!response.ok) {
      const error = (answer as { error?: unknown }).error;
      throw new HubError(httpCode(response.status), typeof error === "string" ? error : response.statusText);
    }
    return answer;
  }
}

function httpCode(status: number): ErrorCode {
  if (status === 400 || status === 413 || status === 415) return "bad_request";
  if (status === 401 || status === 403) return "forbidden";
  if (status === 429) return "rate_limited";
  if (status === 503) return "unavailable";
  return "internal";
}
