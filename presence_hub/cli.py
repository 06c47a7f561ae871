"""``presence-hub serve | token | watch``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlencode

from prometheus_client.multiprocess import mark_process_dead
from redis.asyncio import Redis

from presence_hub.auth import (
    ROLES,
    TokenVerifier,
    issue_token,
    load_or_create_secret,
    load_private_key,
    load_public_key,
)
from presence_hub.config import Settings
from presence_hub.errors import PresenceHubError
from presence_hub.jwks import JwksKeys
from presence_hub.metrics import MULTIPROCESS_DIR
from presence_hub.relay import Relay
from presence_hub.server import Node
from presence_hub.store import EmbeddedRedis
from presence_hub.store.clients import open_redis
from presence_hub.watch import watch

__all__ = ["main"]

log = logging.getLogger("presence_hub")

ENV_PREFIX = "PRESENCE_HUB_"


def _settings_parser(parser: argparse.ArgumentParser) -> None:
    defaults = Settings()
    for f in fields(Settings):
        env = ENV_PREFIX + f.name.upper()
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        help_text = f"{f.metadata['help']} (env {env}; default {default})"
        if isinstance(default, bool):
            parser.add_argument(flag, action="store_true", default=None, help=help_text)
        else:
            kind: Any = type(default) if default is not None else str
            parser.add_argument(flag, type=kind, default=None, help=help_text)


def settings_from(args: argparse.Namespace, environ: dict[str, str]) -> Settings:
    """Flags win over ``PRESENCE_HUB_*`` variables, which win over the defaults."""
    defaults = Settings()
    values: dict[str, Any] = {}
    for f in fields(Settings):
        flag = getattr(args, f.name, None)
        env = environ.get(ENV_PREFIX + f.name.upper())
        default = getattr(defaults, f.name)
        if flag is not None:
            values[f.name] = flag
        elif env not in (None, ""):
            if isinstance(default, bool):
                values[f.name] = env.lower() in ("1", "true", "yes", "on")
            elif default is None:
                values[f.name] = env
            else:
                values[f.name] = type(default)(env)
    return Settings(**values)


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def _configure_logging(settings: Settings) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(
        _JsonFormatter()
        if settings.log_json
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())
    logging.getLogger("websockets").setLevel(logging.WARNING)


def serve(settings: Settings) -> None:
    _configure_logging(settings)
    embedded: EmbeddedRedis | None = None
    url = settings.redis_url
    if not url:
        embedded = EmbeddedRedis(settings.data_dir / "redis")
        embedded.start()
        url = embedded.url
        log.info(
            "embedded Redis at %s: data in %s, AOF fsynced every second, no eviction",
            url,
            embedded.data_dir,
        )
    secrets = hub_secrets(settings)
    tokens(settings, secrets)  # a bad key file or algorithm fails here, before any worker
    try:
        if settings.workers > 1 or settings.relays:
            _serve_workers(settings, url, secrets)
        else:
            asyncio.run(_serve(settings, url, secrets))
    finally:
        if embedded is not None:
            embedded.stop()


def hub_secrets(settings: Settings) -> list[str]:
    """The HS256 secrets: as given, or, with no other keys either, the data directory's."""
    if settings.secret:
        return [s.strip() for s in settings.secret.split(",") if s.strip()]
    if settings.token_public_keys or settings.jwks_url:
        return []
    return [load_or_create_secret(settings.data_dir / "secret")]


def tokens(settings: Settings, secrets: list[str]) -> TokenVerifier:
    """The node's token verification, from its settings."""
    files = [Path(f.strip()) for f in (settings.token_public_keys or "").split(",") if f.strip()]
    return TokenVerifier(
        secrets,
        public_keys={f.name.removesuffix(".pem"): load_public_key(f) for f in files},
        jwks=JwksKeys(settings.jwks_url, settings.jwks_refresh) if settings.jwks_url else None,
        algorithms=[a.strip() for a in settings.token_algorithms.split(",") if a.strip()],
        issuer=settings.token_issuer,
        audience=settings.token_audience,
    )


def _worker(settings: Settings, url: str, secrets: list[str], relays: list[Path]) -> None:
    _configure_logging(settings)
    asyncio.run(_serve(settings, url, secrets, relays))


def _relay(settings: Settings, url: str, path: Path) -> None:
    _configure_logging(settings)
    asyncio.run(_serve_relay(url, path))


async def _serve_relay(url: str, path: Path) -> None:
    redis = open_redis(url, max_connections=4, listener=True)
    relay = asyncio.current_task()
    assert relay is not None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, relay.cancel)
    # The workers' SIGHUP (new TLS files) is not the relay's business.
    loop.add_signal_handler(signal.SIGHUP, lambda: None)
    try:
        await Relay(redis, path).run()
    except asyncio.CancelledError:
        pass
    finally:
        await redis.aclose()


def _serve_workers(settings: Settings, url: str, secrets: list[str]) -> None:
    """N processes on the same ports; the kernel spreads connections over them.

    A scrape of /metrics reaches one of them, and must count the whole node: the
    workers keep their metrics in files of one directory (prometheus_client's
    multiprocess mode), which each worker's /metrics adds up."""
    with tempfile.TemporaryDirectory(prefix="presence-hub-metrics-") as metrics_dir:
        # Read by prometheus_client when each spawned worker imports it; a directory of
        # this run's own, so that no earlier run's counts are added in.
        os.environ[MULTIPROCESS_DIR] = metrics_dir
        _run_workers(settings, url, secrets)


def _run_workers(settings: Settings, url: str, secrets: list[str]) -> None:
    """The workers, and their relays (``presence_hub.relay``) on Unix sockets of a
    directory of this run's own. A relay that dies is started again (its workers
    listen again and resync); the relays stop once every worker has."""
    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="presence-hub-relays-") as relay_dir:
        paths = [Path(relay_dir, f"relay-{n}.sock") for n in range(settings.relays)]

        def relay(path: Path) -> multiprocessing.process.BaseProcess:
            process = ctx.Process(target=_relay, args=(settings, url, path), name=path.stem)
            process.start()
            return process

        relays = {path: relay(path) for path in paths}
        _wait_for_relays(relays)
        workers = [
            ctx.Process(
                target=_worker, args=(settings, url, secrets, paths), name=f"presence-hub-{n}"
            )
            for n in range(settings.workers)
        ]
        for worker in workers:
            worker.start()
        log.info("%d workers on ws port %d, %d relays", len(workers), settings.ws_port, len(relays))

        stopping = False

        def forward(signum: int, frame: object) -> None:
            nonlocal stopping
            # Ctrl-C reaches the relays too: a node that stops restarts none of them.
            stopping = stopping or signum != signal.SIGHUP
            for worker in workers:
                if worker.pid is not None and worker.is_alive():
                    os.kill(
                        worker.pid, signal.SIGHUP if signum == signal.SIGHUP else signal.SIGTERM
                    )

        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, forward)
        running = {worker.sentinel: worker for worker in workers}
        while running:
            sentinels = [*running, *(r.sentinel for r in relays.values())]
            for sentinel in multiprocessing.connection.wait(sentinels):
                for path, process in relays.items():
                    if process.sentinel == sentinel:
                        process.join()
                        if stopping:
                            del relays[path]
                            break
                        log.error(
                            "relay %s exited with %s; starting it again",
                            path.name,
                            process.exitcode,
                        )
                        relays[path] = relay(path)
                        break
                else:
                    worker = running.pop(cast(int, sentinel))
                    worker.join()
                    # Its sockets are gone: their count leaves the node's gauges.
                    mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]
                    if running and worker.exitcode != 0:
                        log.error("worker %s exited with %s", worker.name, worker.exitcode)
        for process in relays.values():
            process.terminate()
            process.join()


def _wait_for_relays(relays: dict[Path, multiprocessing.process.BaseProcess]) -> None:
    """Until every relay listens on its socket, so that workers find them at once
    (a worker that does not retries, as after an outage)."""
    deadline = time.monotonic() + 30
    while not all(path.exists() or not p.is_alive() for path, p in relays.items()):
        if time.monotonic() > deadline:
            break
        time.sleep(0.02)


def _tune_gc() -> None:
    """A busy node holds about a million long-lived objects (its sockets' state). With
    CPython's default thresholds the short-lived objects of each pass of the event loop
    are collected young every 700 allocations, many while still in use, so they pile
    up in the oldest generation, and every few seconds a full collection walks the
    million for hundreds of milliseconds while every socket waits. Collecting young
    objects every 20,000 allocations lets them die before a collection sees them;
    full collections become rare. What exists at startup is frozen out of them."""
    gc.freeze()
    gc.set_threshold(20_000, 50, 100)


async def _serve(
    settings: Settings, url: str, secrets: list[str], relays: Sequence[Path] = ()
) -> None:
    _tune_gc()
    redis = open_redis(url)
    # The listener must see every disconnect, to resync after it: no silent retries.
    pubsub_redis = open_redis(url, max_connections=4, listener=True)
    lease_redis = open_redis(url, max_connections=2)
    relay_clients = [
        open_redis(f"unix://{path}", max_connections=4, listener=True) for path in relays
    ]
    node = Node(
        settings,
        redis,
        pubsub_redis,
        tokens(settings, secrets),
        lease_redis=lease_redis,
        relays=cast("list[Redis]", relay_clients),
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, node.reload_tls)
    await node.start()
    await stop.wait()
    log.info("shutting down")
    await node.stop()
    for client in (redis, pubsub_redis, lease_redis, *relay_clients):
        await client.aclose()


def _local_token(args: argparse.Namespace, environ: dict[str, str], tenant: str, user: str) -> str:
    return issue_token(_signing_secret(settings_from(args, environ)), tenant=tenant, user=user)


def _signing_secret(settings: Settings) -> str:
    secrets = hub_secrets(settings)
    if not secrets:
        raise ValueError("the hub verifies no HS256 secret: sign with --private-key")
    return secrets[0]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="presence-hub", description="Real-time presence hub.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve_parser = commands.add_parser(
        "serve",
        help="run a hub node",
        description="Run a hub node. Every flag can also be set by its PRESENCE_HUB_* variable.",
    )
    _settings_parser(serve_parser)
    token_parser = commands.add_parser(
        "token", help="print a token signed with the hub's (first) secret, or a private key"
    )
    token_parser.add_argument("--tenant", required=True)
    token_parser.add_argument("--user", required=True)
    token_parser.add_argument("--role", choices=ROLES, default="user")
    token_parser.add_argument("--ttl", type=float, default=3600.0, help="seconds (default 3600)")
    token_parser.add_argument("--secret", default=None, help=f"(env {ENV_PREFIX}SECRET)")
    token_parser.add_argument(
        "--private-key",
        type=Path,
        default=None,
        help="sign with this PEM private key (RSA: RS256, P-256: ES256, Ed25519: EdDSA)",
    )
    token_parser.add_argument("--kid", default=None, help="the key id the token names")
    token_parser.add_argument("--issuer", default=None, help="the token's iss")
    token_parser.add_argument("--audience", default=None, help="the token's aud")
    token_parser.add_argument(
        "--data-dir", type=Path, default=None, help=f"(env {ENV_PREFIX}DATA_DIR)"
    )
    token_parser.add_argument(
        "--page",
        nargs="?",
        const="http://127.0.0.1:8766/",
        default=None,
        metavar="URL",
        help="print a link to the hub's contact-list page that signs in with the token "
        "(the hub's HTTP address, default http://127.0.0.1:8766/); the token travels in "
        "the link's fragment, which browsers never send to a server",
    )
    token_parser.add_argument(
        "--contacts", default="", help="with --page: the contacts the page shows (a,b,c)"
    )
    watch_parser = commands.add_parser(
        "watch",
        help="a live view of some users' presence",
        description="Show users' presence in the terminal, updated as it changes.",
    )
    watch_parser.add_argument("users", nargs="+", help="the users to watch")
    watch_parser.add_argument(
        "--url", default="ws://127.0.0.1:8765/v1/ws", help="ws:// or wss:// (with --tls-cert)"
    )
    watch_parser.add_argument(
        "--ca-file", default=None, help="for wss://: the CA (or certificate) to trust"
    )
    watch_parser.add_argument(
        "--token",
        default=os.environ.get(ENV_PREFIX + "TOKEN"),
        help=f"(env {ENV_PREFIX}TOKEN); none: sign one with the local secret",
    )
    watch_parser.add_argument("--tenant", default="acme", help="with no token (default acme)")
    watch_parser.add_argument("--user", default="watcher", help="with no token (default watcher)")
    watch_parser.add_argument("--data-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    environ = dict(os.environ)
    try:
        if args.command == "serve":
            serve(settings_from(args, environ))
        elif args.command == "watch":
            token = args.token or _local_token(args, environ, args.tenant, args.user)
            with contextlib.suppress(KeyboardInterrupt):
                asyncio.run(watch(args.url, token, args.users, ca_file=args.ca_file))
        else:
            settings = settings_from(args, environ)
            key = (
                load_private_key(args.private_key)
                if args.private_key
                else _signing_secret(settings)
            )
            extra = {"iss": args.issuer, "aud": args.audience}
            token = issue_token(
                key,
                tenant=args.tenant,
                user=args.user,
                role=args.role,
                ttl=args.ttl,
                kid=args.kid,
                claims={k: v for k, v in extra.items() if v is not None},
            )
            print(token if args.page is None else page_link(args.page, token, args.contacts))
    except (PresenceHubError, ValueError, OSError) as exc:  # OSError: a port in use, say
        print(f"presence-hub: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc


def page_link(base: str, token: str, contacts: str = "") -> str:
    """The contact-list page of the hub at ``base``, signed in with ``token``."""
    fragment = {"token": token, **({"contacts": contacts} if contacts else {})}
    return f"{base.rstrip('/')}/#{urlencode(fragment)}"


if __name__ == "__main__":
    main()
