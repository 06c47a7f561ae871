"""`presence-hub serve` and `presence-hub token` as an operator runs them."""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from websockets.exceptions import InvalidStatus

from presence_hub.auth import issue_token, verify_token
from presence_hub.cli import settings_from
from presence_hub.config import Settings
from presence_hub.store import EmbeddedRedis
from presence_hub.store.embedded import free_port
from tests.processes import HubProcess
from tests.utils import eventually, timeout, wait_for_port
from tests.wsclient import Client


def run_cli(*args: str, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "presence_hub", *args],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **(env or {})},
        timeout=timeout(60),
    )
    return done.stdout.strip()


def start(args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(args, env=env)


@pytest.mark.slow
async def test_serve_with_no_configuration_keeps_state_across_restarts(tmp_path: Path) -> None:
    data = tmp_path / "data"
    port = free_port()
    env = {**os.environ, "PRESENCE_HUB_DATA_DIR": str(data)}
    serve = [sys.executable, "-m", "presence_hub", "serve", "--ws-port", str(port)]
    serve += ["--http-port", str(free_port())]
    url = f"ws://127.0.0.1:{port}/v1/ws"

    hub = start(serve, env)
    try:
        await wait_for_port(port, hub)
        token = run_cli("token", "--tenant", "acme", "--user", "alice", env=env)
        alice = await Client.connect(url, token)
        await alice.request({"type": "set_status", "status": "dnd"})
        await alice.request({"type": "set_message", "text": "heads down"})
        await alice.close()
    finally:
        hub.send_signal(signal.SIGTERM)
        assert hub.wait(timeout(30)) == 0

    assert (data / "secret").stat().st_mode & 0o077 == 0, "the secret must be private"
    hub = start(serve, env)
    try:
        await wait_for_port(port, hub)
        # A token made before the restart still works: the secret was kept.
        alice = await Client.connect(url, token)
        assert alice.welcome["self"]["manual"] == "dnd"
        assert alice.welcome["self"]["message"] == "heads down"
        await alice.close()
    finally:
        hub.send_signal(signal.SIGTERM)
        assert hub.wait(timeout(30)) == 0


def test_token_carries_the_claims(tmp_path: Path) -> None:
    token = run_cli(
        "token", "--tenant", "acme", "--user", "pbx-1", "--role", "producer", "--ttl", "60",
        env={"PRESENCE_HUB_SECRET": "s3cret-s3cret-s3cret-s3cret-s3cret"},
    )  # fmt: skip
    claims = verify_token(token, "s3cret-s3cret-s3cret-s3cret-s3cret")
    assert (claims.tenant, claims.user, claims.role) == ("acme", "pbx-1", "producer")


@pytest.mark.slow
async def test_serve_verifies_rotated_secrets_and_public_keys_that_token_signs_with(
    redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    private = ed25519.Ed25519PrivateKey.generate()
    key_file = tmp_path / "k1-private.pem"
    key_file.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    public_file = tmp_path / "k1.pem"
    public_file.write_bytes(
        private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    new, old = "new-secret-new-secret-new-secret-1", "old-secret-old-secret-old-secret-0"
    signed = run_cli(
        "token", "--tenant", "acme", "--user", "alice", "--private-key", str(key_file),
        "--kid", "k1",
    )  # fmt: skip
    first = run_cli(
        "token", "--tenant", "acme", "--user", "bob", env={"PRESENCE_HUB_SECRET": f"{new},{old}"}
    )
    assert verify_token(first, new).user == "bob"
    hub = HubProcess(
        redis_server.url,
        tmp_path,
        "--secret",
        f"{new},{old}",
        "--token-public-keys",
        str(public_file),
    )
    try:
        await hub.ready()
        for token in (signed, first, issue_token(old, tenant="acme", user="carol")):
            await Client.connect(hub.url, token)
        with pytest.raises(InvalidStatus):
            await Client.connect(hub.url, issue_token("x" * 40, tenant="acme", user="dave"))
    finally:
        await Client.close_all()
        hub.stop()


def test_token_refuses_bad_ids() -> None:
    with pytest.raises(subprocess.CalledProcessError) as failed:
        run_cli(
            "token", "--tenant", "acme", "--user", "not valid", env={"PRESENCE_HUB_SECRET": "x"}
        )
    assert "tenant and user must match" in (failed.value.stderr or "")


def test_flags_win_over_environment_over_defaults() -> None:
    args = argparse.Namespace(grace=5.0, lease=None, log_json=None, redis_url=None)
    env = {
        "PRESENCE_HUB_GRACE": "20",
        "PRESENCE_HUB_LEASE": "45",
        "PRESENCE_HUB_LOG_JSON": "true",
        "PRESENCE_HUB_REDIS_URL": "redis://example:6379",
    }
    settings = settings_from(args, env)
    assert settings.grace == 5.0
    assert settings.lease == 45.0
    assert settings.log_json is True
    assert settings.redis_url == "redis://example:6379"
    assert settings.max_subscriptions == 10_000


@pytest.mark.slow
async def test_a_redis_outage_is_logged_one_line_a_retry(
    own_redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    hub = HubProcess(own_redis_server.url, tmp_path)
    try:
        await hub.ready()
        own_redis_server.stop(kill=True)
        await eventually(lambda: hub.log.read_text().count("cannot listen on Redis") >= 3)
        own_redis_server.start()
        await eventually(lambda: "listening again" in hub.log.read_text(), wait=30)
    finally:
        hub.stop()
    log = hub.log.read_text()
    assert "Traceback" not in log, log[-3000:]
    assert "never retrieved" not in log, log[-3000:]


def test_the_readme_lists_every_setting_with_its_default() -> None:
    """The README's table of settings names every flag of ``serve`` and no other, with
    the default of each number."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    table = readme.split("## Configuration", 1)[1].split("\n\n")[2]
    listed: dict[str, str] = {}
    for row in table.splitlines()[2:]:
        flags, defaults, _ = row.strip("|").split("|", 2)
        names = re.findall(r"`--([a-z-]+)`", flags)
        values = [v.strip(" `") for v in defaults.split(",")]
        if len(values) != len(names):  # one default shown for several flags
            values = [""] * len(names)
        listed.update(zip(names, values, strict=True))
    settings = {f.name.replace("_", "-"): f for f in fields(Settings)}
    assert sorted(listed) == sorted(settings)
    default_settings = Settings()
    for name, shown in listed.items():
        default = getattr(default_settings, settings[name].name)
        if isinstance(default, int | float) and not isinstance(default, bool):
            assert float(shown) == default, name
