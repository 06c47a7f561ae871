"""The load tester, as its users run it: a short, bounded run against a real hub."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from presence_hub.store.embedded import free_port
from tests.conftest import SECRET, StartNode, ws_url
from tests.utils import timeout

LOADTEST = Path(__file__).resolve().parent.parent / "scripts" / "loadtest.py"


@pytest.mark.slow
@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
async def test_a_short_load_run_is_complete_and_reported(
    start_node: StartNode, tmp_path: Path, loop: str
) -> None:
    # Keepalive rounds every 0.3 s: its clients must answer pings, or the hub closes them
    # as dead and their views (and their own presence) go stale.
    node = await start_node(rate_limit=1000.0, rate_burst=1000, keepalive=0.3)
    report, picture = tmp_path / "report.json", tmp_path / "plot.png"
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(LOADTEST),
        "--url", ws_url(node), "--http-url", f"http://127.0.0.1:{node.http_port}",
        "--secret", SECRET, "--clients", "60", "--contacts", "10", "--rate", "100",
        "--duration", "2", "--workers", "2", "--settle", "0.5", "--quiet",
        "--hub-pid", str(os.getpid()), "--json", str(report), "--plot", str(picture),
        "--loop", loop, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    output, _ = await asyncio.wait_for(process.communicate(), timeout(120))
    assert process.returncode == 0, output.decode()[-3000:]
    result = json.loads(report.read_text())
    assert result["event_loop"] == loop
    assert result["connected"] == 60
    assert result["errors"] == {}
    assert result["contact_views_checked"] == 600
    assert result["contact_views_stale"] == 0
    # 100 changes/s for 2 s, as they fall due: neither short nor over (2 workers may
    # each send one at the last moment).
    assert 150 <= result["changes_sent"] <= 202
    assert result["deliveries"] > 0
    assert result["latency_ms"]["samples"] > 0
    # And the hub's own view of that latency, read from its /metrics.
    hub_latency = result["hub_latency_ms_at_most"]
    assert hub_latency["updates"] > 0
    assert hub_latency["p50"] <= hub_latency["p99"]
    # Which side worked how hard: one share of a core per worker.
    assert len(result["load_generator_cpu_share"]) == 2
    assert all(share > 0 for share in result["load_generator_cpu_share"])
    assert len(result["load_generator_cpu_seconds_connecting"]) == 2
    assert all(cpu > 0 for cpu in result["load_generator_cpu_seconds_connecting"])
    assert picture.stat().st_size > 0


def _loadtest_module() -> Any:
    sys.path.insert(0, str(LOADTEST.parent))
    try:
        import loadtest
    finally:
        sys.path.remove(str(LOADTEST.parent))
    return loadtest


def test_the_hubs_own_quantiles_are_the_buckets_that_hold_them() -> None:
    quantiles = _loadtest_module().bucket_quantiles
    inf = float("inf")
    # Cumulative counts by upper bound, as /metrics gives them: 100 updates since the
    # first scrape, which had 5 (all under 1 ms).
    before = {0.001: 5.0, 0.005: 5.0, 0.025: 5.0, 0.1: 5.0, inf: 5.0}
    after = {0.001: 15.0, 0.005: 65.0, 0.025: 103.0, 0.1: 105.0, inf: 105.0}
    assert quantiles(before, after) == {"updates": 100, "p50": 5.0, "p95": 25.0, "p99": 100.0}
    # A quantile beyond the last finite bucket is unknown, not the last bound.
    late = {0.001: 0.0, 0.1: 90.0, inf: 100.0}
    assert quantiles({}, late) == {"updates": 100, "p50": 100.0, "p95": None, "p99": None}
    assert quantiles(after, after) == {"updates": 0, "p50": None, "p95": None, "p99": None}
    assert quantiles({}, {}) == {"updates": 0, "p50": None, "p95": None, "p99": None}


class ChangingMetrics:
    """A /metrics endpoint whose update latency histogram takes one more observation at
    each of its first ``changes`` scrapes, as a hub still handing out a backlog would."""

    def __init__(self, changes: int) -> None:
        self.changes = changes
        self.scrapes = 0
        self.registry = CollectorRegistry()
        self.histogram = Histogram(
            "presence_hub_update_latency_seconds", "latency", registry=self.registry
        )

    async def metrics(self, request: web.Request) -> web.Response:
        self.scrapes += 1
        if self.scrapes <= self.changes:
            self.histogram.observe(0.002)
        return web.Response(body=generate_latest(self.registry), content_type="text/plain")


@pytest.fixture
async def serve_metrics() -> AsyncIterator[Callable[[ChangingMetrics], Awaitable[str]]]:
    runners: list[web.AppRunner] = []

    async def serve(endpoint: ChangingMetrics) -> str:
        app = web.Application()
        app.router.add_get("/metrics", endpoint.metrics)
        runner = web.AppRunner(app)
        await runner.setup()
        runners.append(runner)
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        return f"http://127.0.0.1:{port}"

    yield serve
    for runner in runners:
        await runner.cleanup()


async def test_the_hubs_latency_is_read_once_its_backlog_is_handed_out(
    serve_metrics: Callable[[ChangingMetrics], Awaitable[str]],
) -> None:
    settled = _loadtest_module().hub_settled_buckets
    endpoint = ChangingMetrics(changes=4)
    url = await serve_metrics(endpoint)
    buckets = await asyncio.wait_for(settled(url, quiet=0.05, at_most=60), timeout(30))
    # Every observation made before the histogram stopped changing is in the reading.
    assert buckets[float("inf")] == 4
    assert endpoint.scrapes == 5  # four that found a change, then one that found none


async def test_the_wait_for_a_settled_hub_is_bounded(
    serve_metrics: Callable[[ChangingMetrics], Awaitable[str]],
) -> None:
    settled = _loadtest_module().hub_settled_buckets
    endpoint = ChangingMetrics(changes=10**9)  # a hub that never catches up
    url = await serve_metrics(endpoint)
    buckets = await asyncio.wait_for(settled(url, quiet=0.05, at_most=0.5), timeout(30))
    # It gives up with the latest reading instead of waiting for ever.
    assert buckets[float("inf")] == endpoint.scrapes


async def test_a_hub_without_metrics_gives_no_latency_reading() -> None:
    settled = _loadtest_module().hub_settled_buckets
    silent = f"http://127.0.0.1:{free_port()}"
    assert await asyncio.wait_for(settled(silent, quiet=0.05, at_most=0.5), timeout(30)) == {}


@pytest.mark.parametrize("content", [None, "not json", '{"u0": 5}', '["u1"]'])
def test_a_bad_contact_graph_is_refused_before_any_load(
    tmp_path: Path, content: str | None
) -> None:
    graph = tmp_path / "graph.json"
    if content is not None:
        graph.write_text(content)
    done = subprocess.run(
        [sys.executable, str(LOADTEST), "--secret", SECRET, "--graph", str(graph), "--quiet"],
        capture_output=True,
        text=True,
        timeout=timeout(60),
    )
    assert done.returncode == 2
    assert "--graph" in done.stderr
    assert "Traceback" not in done.stderr
