/** The contact-list page the hub serves at `/`: one's own status and message, and the
 * live presence of one's contacts, on the JavaScript client. The token comes in the
 * URL's fragment (`#token=...`, never sent to a server) or is pasted in. */

import {
  type ConnectionState,
  type ManualStatus,
  type Presence,
  PresenceClient,
  type SelfMap,
  type Status,
} from "../src/index.js";

const LABELS: Record<Status | "invisible", string> = {
  available: "Available",
  busy: "Busy",
  dnd: "Do not Disturb",
  on_call: "On Call",
  away: "Away",
  offline: "Offline",
  invisible: "Invisible",
};
const CONTACTS_KEY = "presence-hub.contacts";

function element<T extends HTMLElement>(id: string): T {
  return document.getElementById(id) as T;
}

/** "just now", "5 min ago", "2 h ago", "3 days ago". */
export function ago(since: number | null, now: number): string {
  if (since === null) return "never seen";
  const seconds = Math.max(0, Math.floor(now - since));
  if (seconds < 60) return "just now";
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ago`;
  if (seconds < 86400) return `${Math.floor(seconds / 3600)} h ago`;
  const days = Math.floor(seconds / 86400);
  return days === 1 ? "yesterday" : `${days} days ago`;
}

/** Seconds from now as chosen in a select ("" none, "today" end of day), as a time. */
function endTime(choice: string): number | null {
  if (choice === "") return null;
  if (choice === "today") {
    const tonight = new Date();
    tonight.setHours(23, 59, 0, 0);
    return tonight.getTime() / 1000;
  }
  return Date.now() / 1000 + Number(choice);
}

function clock(at: number): string {
  return new Date(at * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
}

function fragment(): URLSearchParams {
  return new URLSearchParams(location.hash.replace(/^#/, ""));
}

function savedContacts(): string[] {
  const fromLink = fragment().get("contacts");
  const saved = fromLink ?? localStorage.getItem(CONTACTS_KEY) ?? "";
  return saved.split(",").map((u) => u.trim()).filter(Boolean);
}

async function wsUrl(): Promise<string> {
  const response = await fetch("page/config");
  const config = (await response.json()) as { ws_port: number; ws_path: string };
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  return `${scheme}://${location.hostname}:${config.ws_port}${config.ws_path}`;
}

function showState(state: ConnectionState): void {
  const badge = element("state");
  badge.dataset.state = state;
  badge.textContent = state;
}

function renderContacts(client: PresenceClient, contacts: string[]): void {
  const now = Date.now() / 1000;
  const list = element<HTMLUListElement>("contacts");
  const rows = contacts.map((user) => {
    const p: Presence | undefined = client.presence.get(user);
    const status = p?.status ?? "offline";
    const row = document.createElement("li");
    row.dataset.user = user;
    row.dataset.status = status;
    const cells: [string, string][] = [
      [`dot ${status}`, ""],
      ["user", user],
      ["status", LABELS[status]],
      ["message", p?.message ?? ""],
      ["since", ago(p?.since ?? null, now)],
    ];
    for (const [cls, text] of cells) {
      const cell = document.createElement("span");
      cell.className = cls;
      cell.textContent = text;
      row.append(cell);
    }
    return row;
  });
  list.replaceChildren(...rows);
}

function renderSelf(me: SelfMap | null, user: string): void {
  element("me").textContent = user;
  if (me === null) return;
  const until = me.manual_until === null ? "" : ` until ${clock(me.manual_until)}`;
  const shown = me.manual === "invisible" ? "Invisible (others see Offline)" : LABELS[me.effective];
  element("own").textContent = `${shown}${until}${me.message ? ` · ${me.message}` : ""}`;
  element<HTMLSelectElement>("status").value = me.manual;
}

async function start(token: string): Promise<void> {
  element("signin").hidden = true;
  element("app").hidden = false;
  const client = new PresenceClient({ url: await wsUrl(), token, device: "web" });
  const contacts = savedContacts();
  const error = element("error");
  const report = (e: unknown) => {
    error.textContent = e instanceof Error ? e.message : String(e);
  };
  const redraw = () => renderContacts(client, contacts);
  client.on("state", showState);
  client.on("presence", redraw);
  client.on("self", (me) => renderSelf(me, client.welcome?.user ?? ""));
  client.on("welcome", (w) => renderSelf(w.self, w.user));
  await client.open();
  await client.subscribe(contacts).catch(report);
  redraw();
  setInterval(redraw, 15_000); // the "since" column

  element("status-form").addEventListener("submit", (event) => {
    event.preventDefault();
    error.textContent = "";
    const status = element<HTMLSelectElement>("status").value as ManualStatus;
    const until = endTime(element<HTMLSelectElement>("status-until").value);
    client.setStatus(status, { until }).catch(report);
  });
  element("message-form").addEventListener("submit", (event) => {
    event.preventDefault();
    error.textContent = "";
    const text = element<HTMLInputElement>("message").value.trim() || null;
    const expiresAt = endTime(element<HTMLSelectElement>("message-expiry").value);
    client.setMessage(text, { expiresAt }).catch(report);
  });
  element("add-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const input = element<HTMLInputElement>("add");
    const added = input.value.split(",").map((u) => u.trim()).filter((u) => u && !contacts.includes(u));
    input.value = "";
    contacts.push(...added);
    localStorage.setItem(CONTACTS_KEY, contacts.join(","));
    client.subscribe(added).then(redraw, report);
  });
  for (const kind of ["keydown", "pointerdown", "pointermove"]) {
    document.addEventListener(kind, () => client.activity(), { passive: true });
  }
  // Leaving the page logs out at once instead of waiting out the grace period.
  window.addEventListener("pagehide", () => void client.close());
}

function main(): void {
  const token = fragment().get("token");
  if (token) {
    start(token).catch((e) => {
      showState("closed");
      element("error").textContent = e instanceof Error ? e.message : String(e);
    });
    return;
  }
  showState("closed");
  element("signin").hidden = false;
  element("signin-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const pasted = element<HTMLInputElement>("signin-token").value.trim();
    if (pasted) {
      location.hash = new URLSearchParams({ token: pasted }).toString();
      location.reload();
    }
  });
}

main();
