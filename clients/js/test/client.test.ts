/** The client against a real hub: snapshot then live updates in both subprotocols,
 * merging by ver, typed errors, token refresh, a restarted hub, and logout. */

import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { after, before, describe, test } from "node:test";
import WebSocket from "ws";

import {
  type Format,
  HubError,
  type Presence,
  PresenceClient,
  type PresenceClientOptions,
  ProducerClient,
  backoffDelay,
  mergePresence,
  tokenExpiry,
} from "../src/index.js";
import { Hub, Redis, eventually, makeToken } from "./hub.js";

const WS = WebSocket as unknown as PresenceClientOptions["WebSocket"];

function client(hub: Hub, user: string, options: Partial<PresenceClientOptions> = {}) {
  return PresenceClient.connect({ url: hub.url, token: makeToken(user), WebSocket: WS, ...options });
}

describe("against a hub", () => {
  let hub: Hub;
  const open: PresenceClient[] = [];
  const connect = async (user: string, options: Partial<PresenceClientOptions> = {}) => {
    const c = await client(hub, user, options);
    open.push(c);
    return c;
  };

  before(async () => {
    hub = await Hub.start("--rate-limit", "20", "--rate-burst", "40", "--max-users-per-request", "100");
  });
  after(async () => {
    await Promise.all(open.map((c) => c.close()));
    await hub.close();
  });

  for (const format of ["msgpack", "json"] as Format[]) {
    test(`a snapshot, then live updates (${format})`, async () => {
      const alice = await connect(`alice-${format}`, { format });
      const bob = await connect(`bob-${format}`, { format });
      assert.equal(bob.welcome?.user, `bob-${format}`);
      assert.equal(bob.me?.manual, "available");

      const [seen, nobody] = await bob.subscribe([`alice-${format}`, "nobody"]);
      assert.equal(seen?.status, "available");
      assert.deepEqual(nobody, { user: "nobody", status: "offline", message: null, since: null, ver: 0 });

      const updates = bob.updates();
      await alice.setStatus("dnd", { until: Date.now() / 1000 + 3600 });
      await alice.setMessage("in a meeting", { expiresAt: Date.now() / 1000 + 600 });
      const changes: Presence[] = [];
      const timeout = setTimeout(() => void bob.close(), 20_000); // ends the loop if stuck
      for await (const p of updates) {
        changes.push(p);
        if (p.message === "in a meeting") break;
      }
      clearTimeout(timeout);
      assert.equal(changes.at(-1)?.status, "dnd");
      assert.equal(bob.presence.get(`alice-${format}`)?.message, "in a meeting");
      await eventually(() => alice.me?.message === "in a meeting");
      assert.equal(alice.me?.manual, "dnd");
      assert.ok((alice.me?.manual_until ?? 0) > Date.now() / 1000);

      await alice.setSettings({ autoAwayAfter: 600 });
      await eventually(() => alice.me?.auto_away_after === 600);
      assert.equal(alice.activity(), true);
      assert.equal(alice.activity(), false, "a second report within the interval is not sent");

      const [asked] = await bob.query([`alice-${format}`]);
      assert.equal(asked?.status, "dnd");
      await bob.unsubscribe([`alice-${format}`]);
      assert.equal(bob.presence.has(`alice-${format}`), false);
    });
  }

  test("every error the hub answers is a typed rejection", async () => {
    const alice = await connect("erin");
    const refused = async (call: Promise<unknown>, code: string) => {
      await assert.rejects(call, (error: unknown) => error instanceof HubError && error.code === code);
    };
    await refused(alice.setStatus("on_holiday" as "busy"), "bad_request");
    await refused(alice.setStatus("dnd", { until: -5 }), "bad_request");
    await refused(
      alice.sendEvent({ event_id: "x", kind: "call_started", user: "erin", ref: "c", at: 0 }),
      "forbidden",
    );
    const many = Array.from({ length: 101 }, (_, n) => `u${n}`);
    await refused(alice.subscribe(many), "limit_exceeded");
    // Past the burst, frames are refused until the bucket refills.
    const flood = Array.from({ length: 60 }, () => alice.query(["erin"]).then(() => "ok", (e) => e));
    const outcomes = await Promise.all(flood);
    assert.ok(outcomes.some((e) => e instanceof HubError && e.code === "rate_limited"));
    const producer = new ProducerClient(hub.httpUrl, makeToken("erin"));
    await refused(producer.presence(["erin"]), "forbidden");
  });

  test("the producer helper posts events and reads presence", async () => {
    const carol = await connect("carol");
    const producer = new ProducerClient(hub.httpUrl, makeToken("pbx", { role: "producer" }));
    const at = Date.now() / 1000;
    const results = await producer.postEvents([
      { event_id: "call-1", kind: "call_started", user: "carol", ref: "c1", at },
    ]);
    assert.deepEqual(results, [{ event_id: "call-1", result: "applied" }]);
    const [presence] = await producer.presence(["carol"]);
    assert.equal(presence?.status, "on_call");
    assert.equal(presence?.accepts_calls, true);
    const ws = await connect("pbx", { token: makeToken("pbx", { role: "producer" }) });
    const ended = await ws.sendEvent({ event_id: "call-2", kind: "call_ended", user: "carol", ref: "c1", at });
    assert.deepEqual(ended, { result: "applied" });
    await eventually(() => carol.me?.calls === 0);
  });

  test("a token source refreshes the token before it expires, on the same socket", async () => {
    let issued = 0;
    const dave = await connect("dave", {
      token: () => {
        issued += 1;
        return makeToken("dave", { ttl: 3 });
      },
      refreshBefore: 2,
    });
    let welcomes = 0;
    dave.on("welcome", () => (welcomes += 1));
    // Without the refresh the hub would close the socket when the first token expires.
    await new Promise((r) => setTimeout(r, 4500));
    assert.ok(issued >= 3, `only ${issued} tokens were asked for`);
    assert.equal(welcomes, 0);
    assert.equal(dave.state, "live");
    await dave.setMessage("still here");
    await dave.auth(makeToken("dave", { ttl: 3600 }));
    await assert.rejects(
      dave.auth(makeToken("mallory")),
      (error: unknown) => error instanceof HubError && error.code === "forbidden",
    );
  });

  test("close() is offline at once, a dropped socket only after the grace", async () => {
    const watcher = await connect("watcher");
    const leaving = await client(hub, "leaver");
    const dropping = await client(hub, "dropper");
    await watcher.subscribe(["leaver", "dropper"]);
    await eventually(() => watcher.presence.get("dropper")?.status === "available");
    await leaving.close();
    await eventually(() => watcher.presence.get("leaver")?.status === "offline", 5, "leaver offline");
    const dropped = Date.now();
    (dropping as unknown as { ws: WebSocket }).ws.terminate();
    await dropping.close();
    await eventually(() => watcher.presence.get("dropper")?.status === "offline", 20, "dropper offline");
    assert.ok(Date.now() - dropped >= 1500, "offline before the grace (2 s) ran out");
  });
});

test("a restarted hub: the client reconnects, resubscribes with known, and ends true", async () => {
  // A grace long enough for a slow machine's restart: nobody's session ends meanwhile.
  const hub = await Hub.start("--grace", "10");
  const draws: number[] = [];
  const random = () => {
    const r = Math.random();
    draws.push(r);
    return r;
  };
  // Bob's sockets, recording what he sends (JSON, to read it back).
  const sent: Record<string, unknown>[] = [];
  class Recording extends WebSocket {
    override send(data: string): void {
      sent.push(JSON.parse(data) as Record<string, unknown>);
      super.send(data);
    }
  }
  const bob = await client(hub, "bob", {
    backoff: { initial: 200, max: 2000 },
    random,
    format: "json",
    WebSocket: Recording as unknown as PresenceClientOptions["WebSocket"],
  });
  const alice = await client(hub, "alice", { backoff: { initial: 200, max: 2000 } });
  try {
    await bob.subscribe(["alice", "carol"]);
    await alice.setStatus("busy");
    await eventually(() => bob.presence.get("alice")?.status === "busy");
    const states: string[] = [];
    bob.on("state", (s) => states.push(s));
    const resubscribed: Presence[] = [];
    bob.on("presence", (p) => resubscribed.push(p));

    const held = { alice: bob.presence.get("alice")?.ver, carol: bob.presence.get("carol")?.ver };
    sent.length = 0;
    await hub.stop();
    await eventually(() => bob.state === "reconnecting");
    await hub.restart();
    await eventually(() => bob.state === "live" && alice.state === "live", 30, "both back");
    await alice.setStatus("away");
    await eventually(() => bob.presence.get("alice")?.status === "away", 20, "the change after");
    assert.ok(draws.length > 0, "the delay was drawn (full jitter)");
    assert.deepEqual(states.slice(0, 1), ["reconnecting"]);
    // Connected again, it resubscribed with the vers it held, and heard nothing it knew.
    const again = sent.find((f) => f.type === "subscribe");
    assert.deepEqual(again?.users, ["alice", "carol"]);
    assert.deepEqual(again?.known, held);
    assert.deepEqual(resubscribed.map((p) => p.status), ["away"]);
    const producer = new ProducerClient(hub.httpUrl, makeToken("ops", { role: "admin" }));
    const truth = await producer.presence(["alice", "carol"]);
    for (const p of truth) {
      assert.equal(bob.presence.get(p.user)?.ver, p.ver);
      assert.equal(bob.presence.get(p.user)?.status, p.status);
    }
  } finally {
    await bob.close();
    await alice.close();
    await hub.close();
  }
});

test("requests while the hub's Redis is away are rejected as unavailable", async () => {
  const redis = await Redis.start();
  const hub = await Hub.start("--redis-url", redis.url);
  const alice = await client(hub, "alice");
  try {
    await alice.setStatus("busy");
    await redis.stop();
    await assert.rejects(
      alice.setStatus("away"),
      (error: unknown) => error instanceof HubError && error.code === "unavailable",
    );
  } finally {
    await alice.close();
    await hub.close();
    await redis.stop();
  }
});

test("a late or duplicate frame never overwrites a newer one", () => {
  const contacts = new Map<string, Presence>();
  const at = (ver: number, status: Presence["status"]): Presence => ({
    user: "alice",
    status,
    message: null,
    since: ver,
    ver,
  });
  assert.equal(mergePresence(contacts, at(3, "busy")), true);
  assert.equal(mergePresence(contacts, at(2, "available")), false);
  assert.equal(mergePresence(contacts, at(3, "dnd")), false);
  assert.equal(contacts.get("alice")?.status, "busy");
  assert.equal(mergePresence(contacts, at(4, "away")), true);
  assert.equal(contacts.get("alice")?.ver, 4);
});

test("backoff is full jitter under a doubling bound", () => {
  const backoff = { initial: 500, max: 30_000 };
  assert.equal(backoffDelay(0, backoff, () => 0.5), 250);
  assert.equal(backoffDelay(3, backoff, () => 0.999), 0.999 * 4000);
  assert.equal(backoffDelay(20, backoff, () => 1), 30_000);
  assert.equal(backoffDelay(4, backoff, () => 0), 0);
});

test("a token's expiry is read from its claims", () => {
  const token = makeToken("alice", { ttl: 100 });
  const exp = tokenExpiry(token);
  assert.ok(exp !== null && Math.abs(exp - (Date.now() / 1000 + 100)) < 5);
  assert.equal(tokenExpiry("not-a-jwt"), null);
});

test("over wss:// with a CA of its own, in Node: a ws that trusts it", async () => {
  const hub = await Hub.startTls();
  const ca = readFileSync(hub.tls!.cert);
  class Trusting extends WebSocket {
    constructor(url: string, protocols: string[], options?: { headers: Record<string, string> }) {
      super(url, protocols, { ...options, ca });
    }
  }
  const Ws = Trusting as unknown as PresenceClientOptions["WebSocket"];
  try {
    const bob = await PresenceClient.connect({ url: hub.url, token: makeToken("bob"), WebSocket: Ws });
    const alice = await PresenceClient.connect({ url: hub.url, token: makeToken("alice"), WebSocket: Ws });
    await bob.subscribe(["alice"]);
    await alice.setStatus("busy");
    await eventually(() => bob.presence.get("alice")?.status === "busy");
    await Promise.all([alice.close(), bob.close()]);
    // The system's trust alone does not know the hub's certificate.
    const carol = new PresenceClient({ url: hub.url, token: makeToken("carol"), WebSocket: WS, requestTimeout: 2000 });
    await assert.rejects(carol.open(), (e) => e instanceof HubError && e.code === "unavailable");
    await carol.close();
  } finally {
    await hub.close();
  }
});
