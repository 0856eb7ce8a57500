"""Security helpers without a broker: heartbeat senders, settings, and TLS contexts built from
settings, checked against a throw-away CA (made with the openssl command) and a local TLS server
that demands a client certificate (mutual TLS)."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from modelfleet.config import AmqpSettings, load_settings, settings_from_mapping
from modelfleet.connections import connect, connect_plain
from modelfleet.errors import BrokerError, ConfigError
from modelfleet.security import amqp_user, heartbeat_sender_allowed, ssl_context

AMQP_HEADER = b"AMQP\x00\x00\x09\x01"


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _leaf(directory: Path, name: str, cn: str, extensions: str) -> None:
    (directory / f"{name}.ext").write_text(extensions)
    _openssl(
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.csr",
        "-subj",
        f"/CN={cn}",
        cwd=directory,
    )
    _openssl(
        "x509",
        "-req",
        "-in",
        f"{name}.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-out",
        f"{name}.pem",
        "-extfile",
        f"{name}.ext",
        cwd=directory,
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all throw-away."""
    d = tmp_path_factory.mktemp("pki")
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=modelfleet test CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
        cwd=d,
    )
    common = (
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
        "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n"
    )
    _leaf(d, "server", "127.0.0.1", common + "extendedKeyUsage=serverAuth\n"
          "subjectAltName=IP:127.0.0.1,DNS:localhost\n")  # fmt: skip
    _leaf(d, "client", "mf-client", common + "extendedKeyUsage=clientAuth\n")
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-out", "other.key", cwd=d)  # fmt: skip
    return Pki(
        ca=d / "ca.pem",
        server_cert=d / "server.pem",
        server_key=d / "server.key",
        client_cert=d / "client.pem",
        client_key=d / "client.key",
        other_key=d / "other.key",
    )


# --- heartbeat senders ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "user"),
    [
        ("amqp://guest:guest@127.0.0.1:5672/", "guest"),
        ("amqps://fleet-worker:s3cret@rabbit:5671/prod", "fleet-worker"),
        ("amqp://team%40a:pw@rabbit/", "team@a"),  # percent-encoded in the URL
        ("amqp://rabbit/", None),  # no user named: do not guess one
        ("amqps://rabbit/?auth=external", None),
    ],
)
def test_amqp_user_is_the_urls_login(url: str, user: str | None) -> None:
    assert amqp_user(url) == user


def test_heartbeat_sender_allowed() -> None:
    assert heartbeat_sender_allowed("anyone", [])  # empty list: everyone
    assert heartbeat_sender_allowed(None, [])
    assert heartbeat_sender_allowed("mf-worker", ["mf-worker", "gpu-worker"])
    assert not heartbeat_sender_allowed("mf-producer", ["mf-worker"])
    assert not heartbeat_sender_allowed(None, ["mf-worker"])  # no user_id: unknown sender
    assert not heartbeat_sender_allowed("", ["mf-worker"])


# --- settings -------------------------------------------------------------------------------


def test_security_heartbeat_users_default_is_empty() -> None:
    assert settings_from_mapping({}).security.heartbeat_users == []


def test_settings_with_heartbeat_users_stay_hashable() -> None:
    a = settings_from_mapping({"security": {"heartbeat_users": ["w"]}})
    assert hash(a) == hash(settings_from_mapping({"security": {"heartbeat_users": ["w"]}}))
    assert hash(a) != hash(settings_from_mapping({}))


def test_security_heartbeat_users_from_env_list_or_commas(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MODELFLEET_SECURITY__HEARTBEAT_USERS", '["a-worker", "b-worker"]')
    assert load_settings().security.heartbeat_users == ["a-worker", "b-worker"]
    monkeypatch.setenv("MODELFLEET_SECURITY__HEARTBEAT_USERS", "a-worker, b-worker")
    assert load_settings().security.heartbeat_users == ["a-worker", "b-worker"]


def test_password_variables_are_not_settings(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # They share the MODELFLEET_ prefix but are read by `modelfleet permissions` only.
    monkeypatch.chdir(tmp_path)
    for role in ("CONTROLLER", "WORKER", "PRODUCER"):
        monkeypatch.setenv(f"MODELFLEET_PASSWORD_{role}", "pw-" + role.lower())
    assert load_settings().namespace == "modelfleet"


def test_tls_files_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^amqp\.ca_file: no such file"):
        settings_from_mapping({"amqp": {"ca_file": str(tmp_path / "missing.pem")}})


def test_tls_key_without_cert_is_refused(pki: Pki) -> None:
    with pytest.raises(ConfigError, match=r"key_file is set without amqp\.cert_file"):
        settings_from_mapping({"amqp": {"key_file": str(pki.client_key)}})


# --- the TLS context ----------------------------------------------------------------------------


def test_no_tls_for_amqp_urls(pki: Pki) -> None:
    assert ssl_context(AmqpSettings()) is None
    assert ssl_context(AmqpSettings(ca_file=str(pki.ca)), "amqp://u:p@host/") is None


def test_amqps_without_files_verifies_against_the_system_cas() -> None:
    context = ssl_context(AmqpSettings(url="amqps://u:p@rabbit.example:5671/"))
    assert context is not None
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname


def test_ssl_context_is_built_from_settings(pki: Pki) -> None:
    amqp = AmqpSettings(
        url="amqps://u:p@127.0.0.1:5671/",
        ca_file=str(pki.ca),
        cert_file=str(pki.client_cert),
        key_file=str(pki.client_key),
    )
    context = ssl_context(amqp)
    assert context is not None
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname
    subjects = [dict(part[0] for part in ca["subject"]) for ca in context.get_ca_certs()]
    assert {"commonName": "modelfleet test CA"} in subjects


def test_a_key_that_does_not_match_the_certificate_is_a_config_error(pki: Pki) -> None:
    amqp = AmqpSettings(
        url="amqps://u:p@127.0.0.1:5671/",
        cert_file=str(pki.client_cert),
        key_file=str(pki.other_key),
    )
    with pytest.raises(ConfigError, match=r"amqp\.cert_file/key_file"):
        ssl_context(amqp)


def test_a_file_that_is_no_ca_is_a_config_error(tmp_path: Path) -> None:
    bogus = tmp_path / "ca.pem"
    bogus.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=r"amqp\.ca_file"):
        ssl_context(AmqpSettings(url="amqps://u:p@h/", ca_file=str(bogus)))


def test_no_verify_ssl_in_the_url_is_refused(pki: Pki) -> None:
    with pytest.raises(ConfigError, match="no_verify_ssl"):
        ssl_context(AmqpSettings(url="amqps://u:p@h/?no_verify_ssl=1", ca_file=str(pki.ca)))


class TlsServer:
    """A local TLS server that demands a client certificate and records what it got."""

    def __init__(self, pki: Pki) -> None:
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki.ca))
        self.context.load_cert_chain(str(pki.server_cert), str(pki.server_key))
        self.context.verify_mode = ssl.CERT_REQUIRED
        self.peers: list[dict[str, str]] = []
        self.headers: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        cert = writer.get_extra_info("peercert") or {}
        self.peers.append(dict(part[0] for part in cert.get("subject", ())))
        with contextlib.suppress(asyncio.IncompleteReadError, TimeoutError, ConnectionError):
            self.headers.append(await asyncio.wait_for(reader.readexactly(8), timeout=5))
        writer.close()  # not a broker: hang up after the protocol header
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()

    async def __aenter__(self) -> TlsServer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.context)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])


@pytest.mark.parametrize("robust", [True, False])
async def test_connect_speaks_mutual_tls_with_the_configured_files(pki: Pki, robust: bool) -> None:
    async with TlsServer(pki) as server:
        amqp = AmqpSettings(
            url=f"amqps://u:p@127.0.0.1:{server.port}/",
            ca_file=str(pki.ca),
            cert_file=str(pki.client_cert),
            key_file=str(pki.client_key),
            connect_timeout_s=5,
        )
        with pytest.raises(BrokerError):  # the fake broker hangs up after the header
            if robust:
                await connect(amqp, role="test")
            else:
                await connect_plain(amqp, role="test")
    # The handshake succeeded both ways: the client verified our CA-signed server certificate
    # and presented its own, then spoke AMQP over the encrypted channel.
    assert server.peers and server.peers[0] == {"commonName": "mf-client"}
    assert server.headers and server.headers[0] == AMQP_HEADER


async def test_connect_refuses_a_broker_its_ca_did_not_sign(pki: Pki, tmp_path: Path) -> None:
    # Trust only a different CA: the real server certificate must be refused.
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        "other-ca.key",
        "-out",
        "other-ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=someone else",
        cwd=tmp_path,
    )
    async with TlsServer(pki) as server:
        amqp = AmqpSettings(
            url=f"amqps://u:p@127.0.0.1:{server.port}/",
            ca_file=str(tmp_path / "other-ca.pem"),
            cert_file=str(pki.client_cert),
            key_file=str(pki.client_key),
            connect_timeout_s=5,
        )
        with pytest.raises(BrokerError, match=r"CERTIFICATE_VERIFY_FAILED|certificate verify"):
            await connect_plain(amqp, role="test")
    assert server.headers == []  # nothing was sent to an unverified peer
