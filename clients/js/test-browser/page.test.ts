/** The contact-list page in a real browser (headless Chromium): two users who watch
 * each other see each other's status, message, call and logout within seconds. */

import assert from "node:assert/strict";
import { mkdirSync } from "node:fs";
import { dirname, join } from "node:path";
import { after, before, test } from "node:test";
import { fileURLToPath } from "node:url";
import puppeteer, { type Browser, type Page } from "puppeteer-core";

import { ProducerClient } from "../src/index.js";
import { Hub, makeToken } from "../test/hub.js";

const RESULTS = join(dirname(fileURLToPath(import.meta.url)), "..", "..", "test-results");
const CHROMIUM = process.env.CHROMIUM ?? "/usr/bin/chromium";
const SECONDS = 15_000;

let hub: Hub;
let browser: Browser;

before(async () => {
  mkdirSync(RESULTS, { recursive: true });
  hub = await Hub.start();
  browser = await puppeteer.launch({
    executablePath: CHROMIUM,
    headless: true,
    protocolTimeout: 30_000,
    // Two pages side by side: neither may be throttled as a background tab.
    args: [
      "--no-sandbox",
      "--disable-dev-shm-usage",
      "--disable-gpu",
      "--disable-background-timer-throttling",
      "--disable-renderer-backgrounding",
      "--disable-backgrounding-occluded-windows",
    ],
  });
});

after(async () => {
  await browser?.close();
  await hub?.close();
});

async function signIn(user: string, contact: string): Promise<Page> {
  // A context each: two people, two separate browsers' worth of storage.
  const page = await (await browser.createBrowserContext()).newPage();
  await page.setViewport({ width: 900, height: 620 });
  const fragment = new URLSearchParams({ token: makeToken(user), contacts: contact });
  await page.goto(`${hub.httpUrl}/#${fragment}`);
  await page.waitForSelector("#state[data-state=live]", { timeout: SECONDS });
  await page.waitForSelector(`li[data-user=${contact}]`, { timeout: SECONDS });
  return page;
}

async function rowOf(page: Page, user: string): Promise<{ status: string; message: string }> {
  return await page.$eval(`li[data-user=${user}]`, (row) => ({
    status: row.querySelector(".status")?.textContent ?? "",
    message: row.querySelector(".message")?.textContent ?? "",
  }));
}

test("two pages watch each other: dnd with a message, a call, a logout", async () => {
  const alice = await signIn("alice", "bob");
  const bob = await signIn("bob", "alice");
  await alice.waitForSelector("li[data-user=bob][data-status=available]", { timeout: SECONDS });
  await bob.waitForSelector("li[data-user=alice][data-status=available]", { timeout: SECONDS });

  await alice.bringToFront();
  await alice.select("#status", "dnd");
  await alice.select("#status-until", "3600");
  await alice.click("#status-form button");
  await alice.type("#message", "writing the quarterly report");
  await alice.click("#message-form button");
  await bob.waitForFunction(
    () => document.querySelector("li[data-user=alice] .message")?.textContent === "writing the quarterly report",
    { timeout: SECONDS },
  );
  assert.deepEqual(await rowOf(bob, "alice"), { status: "Do not Disturb", message: "writing the quarterly report" });
  assert.match((await alice.$eval("#own", (e) => e.textContent)) ?? "", /Do not Disturb until \d/);

  const producer = new ProducerClient(hub.httpUrl, makeToken("pbx", { role: "producer" }));
  await producer.postEvents([
    { event_id: "browser-call", kind: "call_started", user: "bob", ref: "c1", at: Date.now() / 1000 },
  ]);
  await alice.waitForSelector("li[data-user=bob][data-status=on_call]", { timeout: SECONDS });
  assert.equal((await rowOf(alice, "bob")).status, "On Call");

  await alice.screenshot({ path: join(RESULTS, "page-alice.png") });
  await bob.screenshot({ path: join(RESULTS, "page-bob.png") });

  await bob.close({ runBeforeUnload: true });
  await alice.waitForSelector("li[data-user=bob][data-status=offline]", { timeout: SECONDS });
  assert.equal((await rowOf(alice, "bob")).status, "Offline");
  await alice.screenshot({ path: join(RESULTS, "page-alice-after-bob-left.png") });
});

test("without a token the page asks for one", async () => {
  const page = await browser.newPage();
  await page.goto(`${hub.httpUrl}/`);
  await page.waitForSelector("#signin:not([hidden])", { timeout: SECONDS });
  assert.equal(await page.$eval("#state", (e) => e.textContent), "closed");
  await page.close();
});
