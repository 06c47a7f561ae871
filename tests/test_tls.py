"""TLS on both ports with a certificate made in the test: ``wss://`` and ``https://``
through the Python clients, and a new certificate loaded on SIGHUP while a connection
made with the old one stays open."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import io
import ipaddress
import signal
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from rich.console import Console

from presence_hub.client import HubError, PresenceClient, ProducerClient
from presence_hub.store import EmbeddedRedis
from presence_hub.watch import watch
from tests.conftest import StartNode, make_token
from tests.processes import HubProcess
from tests.utils import eventually


def make_certificate(directory: Path, name: str) -> tuple[Path, Path, int]:
    """A self-signed certificate for 127.0.0.1: its file, its key's file, its serial."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    serial = x509.random_serial_number()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / f"{name}.crt", directory / f"{name}.key"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file, serial


def served_serial(client: PresenceClient) -> int:
    """The serial of the certificate the hub showed this client's connection."""
    assert client._ws is not None
    ssl_object = client._ws.transport.get_extra_info("ssl_object")
    der = ssl_object.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der).serial_number


async def test_wss_and_https_with_the_hubs_certificate(
    start_node: StartNode, tmp_path: Path
) -> None:
    cert, key, _ = make_certificate(tmp_path, "hub")
    node = await start_node(tls_cert=str(cert), tls_key=str(key))
    url = f"wss://127.0.0.1:{node.ws_port}/v1/ws"
    async with (
        PresenceClient(url, make_token("alice"), ca_file=str(cert)) as alice,
        PresenceClient(url, make_token("bob"), ca_file=str(cert)) as bob,
    ):
        await bob.subscribe(["alice"])
        await alice.set_status("busy")
        async with ProducerClient(
            f"https://127.0.0.1:{node.http_port}",
            make_token("pbx", role="producer"),
            ca_file=str(cert),
        ) as producer:
            [presence] = await producer.presence(["alice"])
        assert presence["status"] == "busy"
        await eventually(lambda: bob.presence["alice"].status == "busy")

    # Without the certificate to trust, the client refuses the hub, and says why.
    untrusting = PresenceClient(url, make_token("carol"))
    with pytest.raises(HubError) as refused:
        await untrusting.connect()
    assert refused.value.code == "untrusted_certificate"
    assert "self-signed certificate" in str(refused.value)
    await untrusting.close()


@pytest.mark.slow
async def test_sighup_loads_a_new_certificate_under_a_live_connection(
    redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    old_cert, old_key, old_serial = make_certificate(tmp_path, "old")
    new_cert, new_key, new_serial = make_certificate(tmp_path, "new")
    cert, key = tmp_path / "hub.crt", tmp_path / "hub.key"
    cert.write_bytes(old_cert.read_bytes())
    key.write_bytes(old_key.read_bytes())
    trusted = tmp_path / "trusted.pem"
    trusted.write_bytes(old_cert.read_bytes() + new_cert.read_bytes())
    hub = HubProcess(redis_server.url, tmp_path, "--tls-cert", str(cert), "--tls-key", str(key))
    url = f"wss://127.0.0.1:{hub.port}/v1/ws"
    try:
        await hub.ready()
        async with PresenceClient(url, make_token("alice"), ca_file=str(trusted)) as before:
            assert served_serial(before) == old_serial
            # The operator replaces the files, then signals.
            cert.write_bytes(new_cert.read_bytes())
            key.write_bytes(new_key.read_bytes())
            hub.signal(signal.SIGHUP)
            await eventually(lambda: "TLS certificate reloaded" in hub.log.read_text())
            async with PresenceClient(url, make_token("bob"), ca_file=str(trusted)) as after:
                assert served_serial(after) == new_serial
                await after.subscribe(["alice"])
                await before.set_message(f"still here at {time.time():.0f}")
                await eventually(
                    lambda: (after.presence["alice"].message or "").startswith("still")
                )
            assert served_serial(before) == old_serial
            assert before.connections == 1  # never dropped
    finally:
        hub.stop()


async def test_watch_follows_a_hub_on_wss(start_node: StartNode, tmp_path: Path) -> None:
    cert, key, _ = make_certificate(tmp_path, "hub")
    node = await start_node(tls_cert=str(cert), tls_key=str(key))
    url = f"wss://127.0.0.1:{node.ws_port}/v1/ws"
    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=120)
    watching = asyncio.create_task(
        watch(url, make_token("bob"), ["alice"], console=console, ca_file=str(cert))
    )
    try:
        await eventually(lambda: "alice offline" in out.getvalue())
        async with PresenceClient(url, make_token("alice"), ca_file=str(cert)) as alice:
            await alice.set_message("on TLS")
            await eventually(lambda: "alice available on TLS" in out.getvalue())
    finally:
        watching.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watching
