"""TLS, mutual TLS and bearer tokens on a real server on loopback: who gets in, and rotation without a restart."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import logging
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pickscore.client import AsyncClient, Client
from pickscore.errors import Unauthenticated, Unavailable
from pickscore.server.app import Server, ServerThread
from pickscore.server.security import TokenSet
from tests.server.conftest import PROMPT, jpeg, settings_for
from tests.server.test_sigterm import start_server
from tests.test_cli import run

IMAGES = [jpeg(1), jpeg(2)]
# Short: a refused handshake fails at once, but a test that wrongly waits should not wait long.
TIMEOUT = 5.0


# ---- a small PKI: CAs, server certificates (SAN localhost, 127.0.0.1), client certificates ----


@dataclass
class Authority:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate
    pem: bytes


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _builder(subject: str, issuer: x509.Name, public_key) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )


def make_ca(name: str) -> Authority:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        _builder(name, subject, key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return Authority(key, cert, cert.public_bytes(serialization.Encoding.PEM))


def make_leaf(ca: Authority, name: str, server: bool) -> tuple[bytes, bytes]:
    """(certificate PEM, key PEM) signed by ``ca``: a server's for localhost and 127.0.0.1, or a client's."""
    key = ec.generate_private_key(ec.SECP256R1())
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = _builder(name, ca.cert.subject, key.public_key()).add_extension(
        x509.ExtendedKeyUsage([usage]), critical=False
    )
    if server:
        names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(ca.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM), _pem_key(key)


class Pki:
    """Files: ca1.pem, ca2.pem, other-ca.pem; server1 (by ca1), server2 (by ca2); client1 (by ca1), client2 (by
    ca2), stranger (by other-ca); each NAME.pem with NAME.key."""

    def __init__(self, root: Path):
        self.root = root
        cas = {"ca1": make_ca("ca1"), "ca2": make_ca("ca2"), "other-ca": make_ca("other-ca")}
        for name, ca in cas.items():
            (root / f"{name}.pem").write_bytes(ca.pem)
        for name, ca, server in [
            ("server1", "ca1", True),
            ("server2", "ca2", True),
            ("client1", "ca1", False),
            ("client2", "ca2", False),
            ("stranger", "other-ca", False),
        ]:
            cert, key = make_leaf(cas[ca], name, server)
            (root / f"{name}.pem").write_bytes(cert)
            (root / f"{name}.key").write_bytes(key)

    def __getitem__(self, name: str) -> str:
        return str(self.root / name)

    def client(self, address: str, ca: str, who: str | None = None, **kw) -> Client:
        certs = {} if who is None else {"tls_cert": self[f"{who}.pem"], "tls_key": self[f"{who}.key"]}
        return Client(address, timeout=TIMEOUT, tls_ca=self[f"{ca}.pem"], **certs, **kw)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


def tls_settings(model, pki: Pki, **overrides):
    return settings_for(model, tls_cert=pki["server1.pem"], tls_key=pki["server1.key"], **overrides)


@pytest.fixture(scope="module")
def tls_server(tiny_hf_dir, pki):
    with ServerThread(tls_settings(tiny_hf_dir, pki)) as s:
        yield s


@pytest.fixture(scope="module")
def mtls_server(tiny_hf_dir, pki):
    with ServerThread(tls_settings(tiny_hf_dir, pki, tls_client_ca=pki["ca1.pem"])) as s:
        yield s


@pytest.fixture(scope="module")
def token_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tokens") / "tokens"
    path.write_text("# rotated by the secret store\ntok-a\n\n  tok-b  \n")
    return path


@pytest.fixture(scope="module")
def token_server(tiny_hf_dir, token_file):
    """Plaintext, tokens from a file: also the insecure reference the TLS scores are compared with."""
    with ServerThread(settings_for(tiny_hf_dir, auth_token_file=str(token_file))) as s:
        yield s


def refused(client: Client) -> bool:
    """True when the call fails on the connection (UNAVAILABLE: the handshake was refused)."""
    try:
        client.score(PROMPT, IMAGES)
    except Unavailable:
        return True
    finally:
        client.close()
    return False


def scores(client: Client) -> list[float]:
    with client:
        return client.score(PROMPT, IMAGES)


# ---- TLS ----


def test_tls_client_trusting_the_ca_scores_like_plaintext(tls_server, token_server, pki):
    secure = scores(pki.client(tls_server.address, "ca1"))
    plain = scores(Client(token_server.address, token="tok-b"))
    np.testing.assert_allclose(secure, plain, atol=1e-6)


def test_tls_client_trusting_another_ca_is_refused(tls_server, pki):
    assert refused(pki.client(tls_server.address, "ca2"))


def test_plaintext_client_to_the_tls_port_fails(tls_server):
    assert refused(Client(tls_server.address, timeout=TIMEOUT))


def test_tls_checks_the_name_the_client_asked_for(tls_server, pki):
    """The certificate is for localhost and 127.0.0.1: another name is refused unless it is the one checked."""
    assert len(scores(pki.client(f"localhost:{tls_server.port}", "ca1"))) == 2
    assert refused(pki.client(tls_server.address, "ca1", tls_server_name="scorer.example.com"))


def test_reward_client_over_a_dns_name_checks_the_name_asked_for(tls_server, pki):
    """RewardClient's fleet dials each address a DNS name resolves to, checking the certificate for the caller's
    --tls-server-name when given (here one the certificate does not name: refused)."""
    from pickscore.client import RewardClient

    expected = scores(pki.client(tls_server.address, "ca1"))
    with RewardClient(f"dns:///localhost:{tls_server.port}", tls_ca=pki["ca1.pem"], timeout=TIMEOUT) as rewards:
        got = [rewards.submit(PROMPT, image) for image in IMAGES]
        np.testing.assert_allclose([f.result() for f in got], expected, atol=1e-5)
    other = dict(tls_ca=pki["ca1.pem"], tls_server_name="scorer.example.com", timeout=TIMEOUT)
    with RewardClient(f"dns:///localhost:{tls_server.port}", **other) as rewards:
        assert isinstance(rewards.submit(PROMPT, IMAGES[0]).exception(timeout=30), Unavailable)


def test_async_client_over_tls(tls_server, pki):
    async def score() -> list[float]:
        async with AsyncClient(tls_server.address, timeout=TIMEOUT, tls_ca=pki["ca1.pem"]) as client:
            return await client.score(PROMPT, IMAGES)

    assert len(asyncio.run(score())) == 2


# ---- mutual TLS ----


def test_mtls_refuses_a_client_without_a_certificate(mtls_server, pki):
    assert refused(pki.client(mtls_server.address, "ca1"))


def test_mtls_accepts_a_certificate_the_client_ca_signed(mtls_server, pki):
    assert len(scores(pki.client(mtls_server.address, "ca1", who="client1"))) == 2


def test_mtls_refuses_a_certificate_another_ca_signed(mtls_server, pki):
    assert refused(pki.client(mtls_server.address, "ca1", who="stranger"))


# ---- rotation ----


def test_rotated_files_serve_new_connections_without_a_restart(tiny_hf_dir, pki, tmp_path, caplog):
    """Server certificate and client CA replaced in place: the next connection uses the new ones; bad files are
    logged and the current certificate kept; reload() (SIGHUP) re-reads at once."""
    cert, key, client_ca = tmp_path / "tls.crt", tmp_path / "tls.key", tmp_path / "ca.crt"
    cert.write_bytes(Path(pki["server1.pem"]).read_bytes())
    key.write_bytes(Path(pki["server1.key"]).read_bytes())
    client_ca.write_bytes(Path(pki["ca1.pem"]).read_bytes())
    settings = settings_for(tiny_hf_dir, tls_cert=str(cert), tls_key=str(key), tls_client_ca=str(client_ca))
    with ServerThread(settings) as server:
        assert len(scores(pki.client(server.address, "ca1", who="client1"))) == 2

        # A new CA: the server's certificate from ca2, clients' certificates from ca2 too.
        cert.write_bytes(Path(pki["server2.pem"]).read_bytes())
        key.write_bytes(Path(pki["server2.key"]).read_bytes())
        client_ca.write_bytes(Path(pki["ca2.pem"]).read_bytes())
        assert len(scores(pki.client(server.address, "ca2", who="client2"))) == 2
        assert refused(pki.client(server.address, "ca1", who="client2"))  # the old server certificate is gone
        assert refused(pki.client(server.address, "ca2", who="client1"))  # and the old client CA

        # A key that is not the certificate's (a half-done rotation): logged, the current certificate kept.
        with caplog.at_level(logging.ERROR, logger="pickscore.server"):
            key.write_bytes(Path(pki["server1.key"]).read_bytes())
            assert len(scores(pki.client(server.address, "ca2", who="client2"))) == 2
            assert server.server.tls.reload() is False
        assert any("TLS files not reloaded" in r.getMessage() and str(key) in r.getMessage() for r in caplog.records)
        assert len(scores(pki.client(server.address, "ca2", who="client2"))) == 2

        # Back to ca1 through the explicit reload (what SIGHUP calls): True, and the next connection has it.
        cert.write_bytes(Path(pki["server1.pem"]).read_bytes())
        client_ca.write_bytes(Path(pki["ca1.pem"]).read_bytes())
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="pickscore.server"):
            server.server.reload_credentials()
        assert [r.changed for r in caplog.records if r.getMessage() == "TLS files re-read"] == [True]
        assert server.server.tls.reload() is False  # read already: nothing new
        assert len(scores(pki.client(server.address, "ca1", who="client1"))) == 2
        assert refused(pki.client(server.address, "ca2", who="client2"))


# ---- tokens ----


def test_token_file_tokens_are_accepted_and_rotate(token_server, token_file, pki):
    for token in ("tok-a", "tok-b"):
        assert len(scores(Client(token_server.address, token=token))) == 2
    with Client(token_server.address, token="tok-c") as wrong, pytest.raises(Unauthenticated, match="wrong"):
        wrong.score(PROMPT, IMAGES)
    with Client(token_server.address) as anonymous, pytest.raises(Unauthenticated, match="missing"):
        anonymous.score(PROMPT, IMAGES)

    token_file.write_text("tok-b\ntok-c\n")  # tok-a revoked, tok-c issued
    time.sleep(token_server.server.state.tokens.interval_s + 0.1)
    with Client(token_server.address, token="tok-a") as revoked, pytest.raises(Unauthenticated):
        revoked.score(PROMPT, IMAGES)
    for token in ("tok-b", "tok-c"):
        assert len(scores(Client(token_server.address, token=token))) == 2

    # SIGHUP's path: read at once, however long the interval.
    token_server.server.state.tokens.interval_s = 3600
    token_file.write_text("tok-b\ntok-d\n")
    token_server.server.reload_credentials()
    assert len(scores(Client(token_server.address, token="tok-d"))) == 2
    with Client(token_server.address, token="tok-c") as revoked, pytest.raises(Unauthenticated):
        revoked.score(PROMPT, IMAGES)


def test_token_set_rereads_a_changed_file_once_per_interval(tmp_path, caplog):
    path = tmp_path / "tokens"
    path.write_text("one\n# two\n")
    now = [0.0]
    tokens = TokenSet("env-token", str(path), interval_s=1.0, clock=lambda: now[0])
    assert tokens.required and len(tokens) == 2
    assert tokens.accepts("one") and tokens.accepts("env-token")
    assert not tokens.accepts("# two") and not tokens.accepts("") and not tokens.accepts("on")

    path.write_text("two\n")
    now[0] = 0.5
    assert tokens.accepts("one")  # not stat'ed again within the interval
    now[0] = 1.5
    assert tokens.accepts("two") and not tokens.accepts("one") and tokens.accepts("env-token")

    with caplog.at_level(logging.ERROR, logger="pickscore.server"):
        path.write_text("# emptied by mistake\n")
        now[0] = 3.0
        assert tokens.accepts("two")  # never opened, never emptied: the previous set stays
        path.unlink()
        now[0] = 4.5
        assert tokens.accepts("two")
    assert ["holds no token" in r.getMessage() for r in caplog.records] == [True, False]
    assert "cannot read it" in caplog.records[1].getMessage()

    path.write_text("three\n")
    assert tokens.reload() and tokens.accepts("three") and not tokens.accepts("two")  # SIGHUP: no waiting
    assert not TokenSet().required and not TokenSet().accepts("")


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        ({"tls_cert": "missing.pem", "tls_key": "missing.key"}, OSError, "--tls-cert missing.pem: cannot read it"),
        ({"tls_cert": "server1.pem", "tls_key": "server2.key"}, ValueError, "not a PEM certificate chain"),
        ({"tls_cert": "server1.pem", "tls_key": "server1.key", "tls_client_ca": "server1.key"}, ValueError, "CA"),
        ({"auth_token_file": "empty.tokens"}, ValueError, "holds no token"),
        ({"auth_token_file": "missing"}, OSError, "--auth-token-file missing: cannot read it"),
    ],
)
def test_bad_credential_files_stop_the_start_naming_the_file(tiny_hf_dir, pki, overrides, error, message):
    Path(pki["empty.tokens"]).write_text("# nothing yet\n")
    files = {name: pki[value] for name, value in overrides.items()}
    with pytest.raises(error, match="--") as info:
        Server(settings_for(tiny_hf_dir, **files))
    assert message.replace("missing", pki["missing"]) in str(info.value)


def test_sighup_rereads_the_credentials_of_a_serving_process(tiny_hf_dir, pki, tmp_path):
    """`pickscore serve` as a process: SIGHUP re-reads the TLS files and the token file, and does not stop it."""
    tokens = tmp_path / "tokens"
    tokens.write_text("tok-1\n")
    tls = ["--tls-cert", pki["server1.pem"], "--tls-key", pki["server1.key"]]
    proc, started, log = start_server(tiny_hf_dir, *tls, "--auth-token-file", str(tokens))
    try:
        address = f"127.0.0.1:{started['port']}"
        assert len(scores(pki.client(address, "ca1", token="tok-1"))) == 2
        tokens.write_text("tok-2\n")
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and "auth token file re-read" not in [e["message"] for e in log]:
            time.sleep(0.05)
        reread = {e["message"]: e for e in log}
        assert reread["auth token file re-read"]["changed"] is True
        assert reread["TLS files re-read"]["changed"] is False  # read, and unchanged
        assert proc.poll() is None
        assert len(scores(pki.client(address, "ca1", token="tok-2"))) == 2
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


# ---- the command line ----


def test_health_command_over_tls(tls_server, mtls_server, pki, capsys):
    exe = Path(sys.executable).with_name("pickscore")
    ok = subprocess.run(
        [exe, "health", "--server", tls_server.address, "--tls-ca", pki["ca1.pem"]], capture_output=True, text=True
    )
    assert (ok.returncode, ok.stdout) == (0, "SERVING\n"), ok.stderr
    code, _, err = run(capsys, "health", "--server", tls_server.address, "--timeout", "2")
    assert code == 1 and "UNAVAILABLE" in err
    mtls = ["health", "--server", mtls_server.address, "--tls-ca", pki["ca1.pem"], "--timeout", "2"]
    assert run(capsys, *mtls)[0] == 1
    assert run(capsys, *mtls, "--tls-cert", pki["client1.pem"], "--tls-key", pki["client1.key"])[:2] == (
        0,
        "SERVING\n",
    )
    inside_a_pod = ["--tls-server-name", "localhost", "--service", "liveness"]
    assert run(capsys, "health", "--server", tls_server.address, "--tls-ca", pki["ca1.pem"], *inside_a_pod)[0] == 0


def test_score_command_over_tls_and_with_a_token_file(tls_server, token_server, pki, tmp_path, capsys):
    image = tmp_path / "a.jpg"
    image.write_bytes(IMAGES[0])
    common = ["score", "--prompt", PROMPT, "--json", "--timeout", "5", image]
    code, out, err = run(capsys, *common, "--server", tls_server.address, "--tls-ca", pki["ca1.pem"])
    assert code == 0, err
    secure = json.loads(out)["results"][0]["score"]
    code, _, err = run(capsys, *common, "--server", tls_server.address)
    assert code == 1 and "UNAVAILABLE" in err

    token = tmp_path / "token"
    token.write_text("# mine\ntok-b\n")
    code, out, err = run(capsys, *common, "--server", token_server.address, "--token-file", token)
    assert code == 0, err
    assert json.loads(out)["results"][0]["score"] == pytest.approx(secure, abs=1e-6)
    code, _, err = run(capsys, *common, "--server", token_server.address, "--token", "nope")
    assert code == 1 and "UNAUTHENTICATED" in err


# ---- the HTTP port: same certificates, same rotation ----


def _https_ready(port: int, ca: str, cert: tuple[str, str] | None = None) -> int:
    import ssl
    import urllib.request

    context = ssl.create_default_context(cafile=ca)
    if cert:
        context.load_cert_chain(*cert)
    with urllib.request.urlopen(f"https://localhost:{port}/v2/health/ready", context=context, timeout=10) as r:
        return r.status


def test_http_port_serves_tls_mutual_tls_and_rotation(tiny_hf_dir, pki, tmp_path):
    import ssl
    import urllib.error

    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert.write_bytes(Path(pki["server1.pem"]).read_bytes())
    key.write_bytes(Path(pki["server1.key"]).read_bytes())
    with ServerThread(settings_for(tiny_hf_dir, tls_cert=str(cert), tls_key=str(key))) as server:
        port = server.server.http_port
        assert _https_ready(port, pki["ca1.pem"]) == 200
        with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
            _https_ready(port, pki["ca2.pem"])
        cert.write_bytes(Path(pki["server2.pem"]).read_bytes())  # rotated in place: the next connection has it
        key.write_bytes(Path(pki["server2.key"]).read_bytes())
        assert _https_ready(port, pki["ca2.pem"]) == 200
        with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
            _https_ready(port, pki["ca1.pem"])
    with ServerThread(tls_settings(tiny_hf_dir, pki, tls_client_ca=pki["ca1.pem"])) as server:
        port = server.server.http_port
        assert _https_ready(port, pki["ca1.pem"], (pki["client1.pem"], pki["client1.key"])) == 200
        with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
            _https_ready(port, pki["ca1.pem"])  # no client certificate
        with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
            _https_ready(port, pki["ca1.pem"], (pki["stranger.pem"], pki["stranger.key"]))
