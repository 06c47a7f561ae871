"""The contact-list page: served by the hub from the Python package, the same bytes
that its sources in clients/js/page/ build to, and linked by ``token --page``."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import aiohttp

from presence_hub.auth import verify_token
from presence_hub.cli import page_link
from tests.conftest import SECRET, StartNode, make_token

JS = Path(__file__).resolve().parent.parent / "clients" / "js"


def test_the_shipped_page_is_the_build_of_its_sources() -> None:
    node = shutil.which("node")
    assert node is not None, "node is needed to check the page (scripts/test installs it)"
    assert (JS / "node_modules").is_dir(), "run npm ci in clients/js (scripts/test does)"
    checked = subprocess.run(
        [node, "page/build.mjs", "--check"], cwd=JS, capture_output=True, text=True, timeout=120
    )
    assert checked.returncode == 0, checked.stderr


async def test_the_hub_serves_the_page_and_where_its_socket_is(start_node: StartNode) -> None:
    node = await start_node()
    base = f"http://127.0.0.1:{node.http_port}"
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/") as r:
            assert r.status == 200
            assert r.content_type == "text/html"
            assert '<script type="module" src="page.js">' in await r.text()
        async with http.get(f"{base}/page.js") as r:
            assert r.status == 200
            assert r.content_type == "text/javascript"
            assert "presence.v1.msgpack" in await r.text()
        async with http.get(f"{base}/page/config") as r:
            assert await r.json() == {"ws_port": node.ws_port, "ws_path": "/v1/ws"}


def test_a_page_link_carries_the_token_in_its_fragment() -> None:
    token = make_token("alice")
    link = urlsplit(page_link("http://hub.example:8766/", token, "bob,carol"))
    assert (link.scheme, link.netloc, link.path, link.query) == (
        "http",
        "hub.example:8766",
        "/",
        "",
    )
    fragment = parse_qs(link.fragment)
    assert fragment["contacts"] == ["bob,carol"]
    assert verify_token(fragment["token"][0], SECRET).user == "alice"
