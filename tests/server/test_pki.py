"""The consortium PKI: a CA that verifies the SuperLink certificate, and SuperNode keys Flower can load."""

from __future__ import annotations

import ipaddress
import stat
import subprocess
import sys

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from server.pki import make_pki


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_server_certificate_chains_to_the_ca_for_localhost_and_loopback_ip(tmp_path):
    paths = make_pki(tmp_path / "pki", 2, hosts=("localhost", "127.0.0.1", "link.example.org"))
    ca = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(paths.server_cert.read_bytes())
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "link.example.org"}
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for name in (x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))):
        verifier = PolicyBuilder().store(Store([ca])).build_server_verifier(name)
        chain = verifier.verify(server, [])
        assert chain[-1] == ca
    other_ca = x509.load_pem_x509_certificate(make_pki(tmp_path / "other", 0).ca_cert.read_bytes())
    with pytest.raises(VerificationError):
        PolicyBuilder().store(Store([other_ca])).build_server_verifier(
            x509.DNSName("localhost")
        ).verify(server, [])
    server_key = serialization.load_pem_private_key(paths.server_key.read_bytes(), None)
    assert server_key.public_key().public_numbers() == server.public_key().public_numbers()


def test_private_keys_are_0600_and_node_keys_load_as_flower_does(tmp_path):
    paths = make_pki(tmp_path / "pki", 3)
    assert len(paths.node_keys) == 3 and len(set(paths.node_keys)) == 3
    for key in (paths.ca_key, paths.server_key, *paths.node_keys):
        assert _mode(key) == 0o600, key
    assert _mode(paths.ca_cert) == 0o644
    for private, public in zip(paths.node_keys, paths.node_public_keys, strict=False):
        key = serialization.load_ssh_private_key(private.read_bytes(), None)  # flower-supernode
        pub = serialization.load_ssh_public_key(public.read_bytes())  # flwr supernode register
        assert isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(
            pub, ec.EllipticCurvePublicKey
        )
        assert key.public_key().public_numbers() == pub.public_numbers()
        assert public.read_text().startswith("ecdsa-sha2-nistp384 ")
    assert not list((tmp_path / "pki").rglob("*.tmp*"))  # atomic writes leave no temporaries


def test_an_existing_ca_is_not_replaced_without_overwrite(tmp_path):
    first = make_pki(tmp_path, 1)
    ca = first.ca_cert.read_bytes()
    with pytest.raises(FileExistsError, match="ca.key"):
        make_pki(tmp_path, 1)
    assert first.ca_cert.read_bytes() == ca
    assert make_pki(tmp_path, 1, overwrite=True).ca_cert.read_bytes() != ca


def test_command_line_entry_point_writes_the_pki(tmp_path):
    out = tmp_path / "consortium"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "server.pki",
            "--out",
            str(out),
            "--nodes",
            "2",
            "--host",
            "10.0.0.5",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (out / "nodes").iterdir()) == [
        "node-0",
        "node-0.pub",
        "node-1",
        "node-1.pub",
    ]
    server = x509.load_pem_x509_certificate((out / "superlink.crt").read_bytes())
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("10.0.0.5") in san.get_values_for_type(x509.IPAddress)
    again = subprocess.run(
        [sys.executable, "-m", "server.pki", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode != 0 and "refusing to replace" in again.stderr
