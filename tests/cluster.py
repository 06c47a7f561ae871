"""A real Redis Cluster of three masters on local ports, for the tests to run, stop and restart."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import redis

from presence_hub.ids import TenantId, UserId
from presence_hub.store import EmbeddedRedis, keys
from presence_hub.store.embedded import free_port

#: Short, so that a stopped master is noticed and a returning one accepted within seconds.
NODE_TIMEOUT_MS = 1000


class LocalCluster:
    """Three masters made one cluster with ``redis-cli --cluster create``; replicas
    are added on demand."""

    def __init__(self, base: Path, binary: str, masters: int = 3) -> None:
        self.base = base
        self.binary = binary
        self.options = (
            "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
        )  # fmt: skip
        self.servers = [self._server(f"master{n}") for n in range(masters)]
        self.cli = str(Path(binary).with_name("redis-cli"))
        if not Path(self.cli).exists():
            self.cli = shutil.which("redis-cli") or self.cli

    def _server(self, name: str) -> EmbeddedRedis:
        # The cluster bus port is given too: by default it is the port + 10,000, which a
        # free port may not leave room for.
        return EmbeddedRedis(
            self.base / name,
            port=free_port(),
            binary=self.binary,
            extra_args=(*self.options, "--cluster-port", str(free_port())),
        )

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.servers[0].port}"

    def start(self) -> None:
        for server in self.servers:
            server.start()
        addresses = [f"127.0.0.1:{s.port}" for s in self.servers]
        subprocess.run(
            [
                self.cli,
                "--cluster",
                "create",
                *addresses,
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        self.wait_healthy()

    def stop(self) -> None:
        for server in self.servers:
            server.stop()

    def restart(self, n: int, *, kill: bool = True) -> None:
        """Stop master ``n`` (a crash when ``kill``) and start it again on its files."""
        self.servers[n].stop(kill=kill)
        self.servers[n].start()
        self.wait_healthy()

    def add_replica(self, of: int) -> int:
        """Start a replica of master ``of``; returns its index once it is in sync."""
        server = self._server(f"replica{len(self.servers)}")
        server.start()
        self.servers.append(server)
        n = len(self.servers) - 1
        new, existing = f"127.0.0.1:{server.port}", f"127.0.0.1:{self.servers[of].port}"
        add = [self.cli, "--cluster", "add-node", new, existing, "--cluster-slave"]
        add += ["--cluster-master-id", self.node_id(of)]
        subprocess.run(add, check=True, capture_output=True, timeout=60)
        self._until(lambda: self._replication(n).get("master_link_status") == "up")
        self.wait_healthy()
        return n

    def failover(self, replica: int) -> None:
        """A manual failover: the replica takes its master's slots."""
        with self.client(replica) as c:
            c.execute_command("CLUSTER", "FAILOVER")
        self._until(lambda: self._replication(replica).get("role") == "master")
        self.wait_healthy()

    def _replication(self, n: int) -> dict[str, object]:
        with self.client(n) as c:
            return dict(c.info("replication"))

    def _until(self, condition: Callable[[], bool], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError("the Redis Cluster did not get there in time")
            time.sleep(0.1)

    def client(self, n: int) -> redis.Redis:
        port = self.servers[n].port
        assert port is not None
        return redis.Redis(port=port, socket_timeout=5)

    def node_id(self, n: int) -> str:
        with self.client(n) as c:
            return str(c.execute_command("CLUSTER", "MYID").decode())

    def master_of(self, slot: int) -> int:
        """Which of the masters serves ``slot``."""
        with self.client(0) as c:
            for start, end, (_, port, *_), *_ in c.execute_command("CLUSTER", "SLOTS"):
                if start <= slot <= end:
                    return next(n for n, s in enumerate(self.servers) if s.port == port)
        raise LookupError(slot)

    def move_slot(self, slot: int, to: int) -> None:
        """Migrate ``slot`` and its keys to master ``to``, as `redis-cli --cluster reshard` does."""
        source = self.master_of(slot)
        src_id, dst_id = self.node_id(source), self.node_id(to)
        with self.client(source) as src, self.client(to) as dst:
            dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
            src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
            while names := src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
                src.execute_command(
                    "MIGRATE", "127.0.0.1", self.servers[to].port, "", 0, 5000, "KEYS", *names
                )
        for n in range(len(self.servers)):
            with self.client(n) as c:
                c.execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)
        self.wait_healthy()

    def flush(self) -> None:
        for n in range(len(self.servers)):
            with self.client(n) as c:
                c.flushall()

    def wait_healthy(self, timeout: float = 60) -> None:
        """Until every master says the cluster is up, with every slot served, and
        agrees with the others on who serves which slot."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self._healthy():
                    return
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("the Redis Cluster did not become healthy")
            time.sleep(0.1)

    def _healthy(self) -> bool:
        views = []
        for n in range(len(self.servers)):
            with self.client(n) as c:
                info = c.execute_command("CLUSTER", "INFO").decode()
                if "cluster_state:ok" not in info or "cluster_slots_ok:16384" not in info:
                    return False
                views.append(
                    sorted((s[0], s[1], s[2][1]) for s in c.execute_command("CLUSTER", "SLOTS"))
                )
        return all(v == views[0] for v in views)


def users_on_every_shard(count: int = 24, tenant: str = "acme") -> list[str]:
    """``count`` user ids of ``tenant`` whose keys fall on each of the three masters
    (which split the slots in thirds), asserted so."""
    users = [f"u{n}" for n in range(count)]
    tags = [keys.state_key(TenantId(tenant), UserId(u)).split("{")[1].split("}")[0] for u in users]
    assert {min(keys.key_slot(t) * 3 // keys.CLUSTER_SLOTS, 2) for t in tags} == {0, 1, 2}
    return users
