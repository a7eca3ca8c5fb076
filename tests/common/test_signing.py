"""Ed25519 keys and signatures: private keys stay private, signatures bind exact bytes, bad input is named."""

import stat

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from common.signing import (
    fingerprint,
    generate_keypair,
    load_private_key,
    load_public_key,
    public_key_pem,
    sign,
    verify,
)


@pytest.fixture()
def pair(tmp_path):
    return generate_keypair(tmp_path, "consortium")


def test_keypair_files(tmp_path, pair):
    key, pub = pair
    assert (key.name, pub.name) == ("consortium.key", "consortium.pub")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert key.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    assert pub.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "consortium.key",
        "consortium.pub",
    ]  # no temp files left
    with pytest.raises(FileExistsError, match="consortium.key"):
        generate_keypair(tmp_path, "consortium")
    with pytest.raises(ValueError, match="key name"):
        generate_keypair(tmp_path, "../evil")


def test_signatures_bind_exact_bytes_and_key(tmp_path, pair):
    key, pub = load_private_key(pair[0]), load_public_key(pair[1])
    sig = sign(key, b"release.json bytes")
    assert verify(pub, sig, b"release.json bytes")
    assert not verify(pub, sig, b"release.json bytes ")
    other = load_public_key(generate_keypair(tmp_path, "other")[1])
    assert not verify(other, sig, b"release.json bytes")
    for garbage in ("", "not base64 !!", "AAAA", sig[:-4] + "AAA=", None):
        assert verify(pub, garbage, b"release.json bytes") is False


def test_public_key_forms_and_fingerprint(pair):
    key, pub = load_private_key(pair[0]), load_public_key(pair[1])
    pem = public_key_pem(key)
    assert pem == pair[1].read_text() == public_key_pem(pub)
    assert (
        fingerprint(load_public_key(pem))
        == fingerprint(load_public_key(pem.encode()))
        == fingerprint(key)
    )
    assert len(fingerprint(pub)) == 64 and int(fingerprint(pub), 16) >= 0


def test_bad_keys_are_named(tmp_path, pair):
    with pytest.raises(ValueError, match="consortium.pub.*not a PEM private key"):
        load_private_key(pair[1])
    with pytest.raises(ValueError, match="consortium.key.*not a PEM public key"):
        load_public_key(pair[0])
    with pytest.raises(FileNotFoundError, match="missing.pub"):
        load_public_key(tmp_path / "missing.pub")
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = tmp_path / "rsa.key"
    path.write_bytes(
        rsa_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(ValueError, match="rsa.key.*expected an Ed25519 private key"):
        load_private_key(path)
    with pytest.raises(ValueError, match="expected an Ed25519 public key"):
        load_public_key(
            rsa_key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
    (tmp_path / "junk.pub").write_text("hello")
    with pytest.raises(ValueError, match="junk.pub.*not a PEM public key"):
        load_public_key(tmp_path / "junk.pub")
