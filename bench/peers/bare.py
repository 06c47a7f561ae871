"""The bare peer of bench/bench.py's side-by-side scenario: a websockets server that
only relays, no Redis, no rules. A client subscribes with the users it watches; a
change of its message is broadcast to their watchers and acknowledged.

    python bare.py PORT [--keepalive]

With --keepalive it pings every socket every 20 s, websockets' default and the
hub's; without, it pings nobody.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections import defaultdict

from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.exceptions import ConnectionClosed

watchers: defaultdict[str, set[ServerConnection]] = defaultdict(set)


async def handle(ws: ServerConnection) -> None:
    user = ws.request.path.rsplit("user=", 1)[-1] if ws.request else ""
    watched: list[str] = []
    ver = 0
    try:
        async for raw in ws:
            frame = json.loads(raw)
            if frame["type"] == "subscribe":
                watched = frame["users"]
                for u in watched:
                    watchers[u].add(ws)
                await ws.send(json.dumps({"type": "snapshot", "id": frame["id"]}))
            elif frame["type"] == "set_message":
                ver += 1
                update = {"type": "presence", "user": user, "message": frame["text"], "ver": ver}
                broadcast(watchers[user], json.dumps(update))
                await ws.send(json.dumps({"type": "ok", "id": frame["id"]}))
    except ConnectionClosed:
        pass  # the load generator ends its sockets without a close frame
    finally:
        for u in watched:
            watchers[u].discard(ws)


async def main(port: int, keepalive: bool) -> None:
    ping_interval = 20.0 if keepalive else None
    async with serve(handle, "127.0.0.1", port, compression=None, ping_interval=ping_interval):
        print(f"bare peer on {port}", flush=True)
        await asyncio.Future()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), "--keepalive" in sys.argv[2:]))
