"""The semantic memory service over TLS, as a real process on 127.0.0.1 (TLS is forced on loopback by giving it
a certificate): a client with the CA and the token works, a plain-text client and a client without the token are
refused, and off loopback the service refuses to start without both TLS and a token. The self-signed
certificate is made in the test with the `cryptography` package (a dev dependency)."""

import datetime
import ipaddress
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mantis_jax.config import default_config
from mantis_jax.memory.semantic import Payload, SemanticMemory, Unauthenticated, Unavailable
from mantis_jax.memory.semantic.service import check_exposure
from mantis_jax.memory.server import launch

D = 8
TOKEN = "tls-test-token"


def self_signed(directory, name="localhost"):
    """A self-signed certificate for `name` and 127.0.0.1 (its own CA) and its key, as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    certs, data = tmp_path_factory.mktemp("certs"), tmp_path_factory.mktemp("tls_data")
    cert, key = self_signed(str(certs))
    proc, address = launch(str(data), D, "--tls-cert", cert, "--tls-key", key, "--threads", "1",
                           env=dict(os.environ, MANTIS_SEMANTIC_TOKEN=TOKEN))
    yield address, cert
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)


def test_tls_client_with_ca_and_token_works(tls_server, monkeypatch):
    address, ca = tls_server
    sem = default_config().memory.semantic
    sem.address, sem.tls_ca, sem.dim = address, ca, D
    monkeypatch.setenv(sem.token_env, TOKEN)
    mem = SemanticMemory.from_config(sem)  # the config's keys, as the engine builds it
    x = np.random.default_rng(0).normal(size=(5, D)).astype(np.float32)
    ids = mem.add(x, [Payload(f"secret {i}") for i in range(5)])
    r = mem.search(x, 1)
    np.testing.assert_array_equal(r.ids[:, 0], ids)
    assert [row[0].text for row in r.payloads] == [f"secret {i}" for i in range(5)]
    assert mem.health() == "SERVING"


def test_plain_client_wrong_ca_and_missing_token_are_refused(tls_server, tmp_path):
    address, ca = tls_server
    x = np.ones((1, D), np.float32)
    with pytest.raises(Unavailable):  # plain text never reaches the service
        SemanticMemory.connect(address, token=TOKEN, timeout_s=5).search(x, 1)
    other_ca, _ = self_signed(str(tmp_path), name="someone-else")
    with pytest.raises(Unavailable):  # a certificate the client's CA did not sign
        SemanticMemory.connect(address, token=TOKEN, tls_ca=other_ca, timeout_s=5).search(x, 1)
    for token, words in (("", "missing token"), ("wrong", "wrong token")):
        with pytest.raises(Unauthenticated, match=words):
            SemanticMemory.connect(address, token=token, tls_ca=ca, timeout_s=5).search(x, 1)


def test_off_loopback_needs_tls_and_token(tmp_path):
    env = dict(os.environ, MANTIS_SEMANTIC_TOKEN=TOKEN)  # a token alone is not enough: it would travel in clear
    out = subprocess.run([sys.executable, "-m", "mantis_jax.memory.server", "--data-dir", str(tmp_path), "--dim", "4",
                          "--host", "0.0.0.0"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "refusing to bind 0.0.0.0 without TLS: off loopback the service needs TLS (--tls-cert" in out.stderr
    for token, cert, key, words in (
            ("", "c.pem", "k.pem", "without a token"), ("", "", "", "without TLS and a token"),
            (TOKEN, "c.pem", "", "--tls-cert and --tls-key go together")):
        with pytest.raises(SystemExit, match=words):
            check_exposure("10.0.0.1", token, cert, key)
    check_exposure("10.0.0.1", TOKEN, "c.pem", "k.pem")  # both: allowed
    check_exposure("127.0.0.1", "", "", "")  # loopback: plain text allowed
