"""Ed25519 keys and signatures: the consortium key signs a release, each privacy officer's key signs an approval.

Keys are PEM files: `NAME.key` (PKCS#8, unencrypted, mode 0600: keep it offline or on the officer's machine) and
`NAME.pub` (SubjectPublicKeyInfo, safe to publish). A signature is the base64 text of the 64-byte Ed25519
signature over exact bytes. A key's fingerprint is the sha256 hex of its raw 32-byte public key: short enough to
read out over the phone when a partner checks which consortium key it trusts.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from common.io import atomic_path, write_text_atomic

KEY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def generate_keypair(out_dir: Path, name: str) -> tuple[Path, Path]:
    """Write a fresh Ed25519 key pair as `out_dir/name.key` (0600) and `out_dir/name.pub`; never overwrites."""
    if not KEY_NAME.match(name or ""):
        raise ValueError(f"key name {name!r}: use letters, digits, '.', '_' or '-' (at most 100)")
    out_dir = Path(out_dir)
    key_path, pub_path = out_dir / f"{name}.key", out_dir / f"{name}.pub"
    for p in (key_path, pub_path):
        if p.exists():
            raise FileExistsError(f"{p} already exists; refusing to overwrite a key")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with atomic_path(key_path) as tmp:
        os.chmod(
            tmp, 0o600
        )  # before the secret is written: it is never readable by others, even briefly
        with open(tmp, "wb") as f:
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())
    write_text_atomic(pub_path, public_key_pem(key.public_key()))
    return key_path, pub_path


def _read(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: {what} not found") from None
    except OSError as err:
        raise ValueError(f"{path}: cannot read the {what} ({err})") from err


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """An Ed25519 private key from a PEM file (as written by `generate_keypair`)."""
    data = _read(path, "private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError as err:  # encrypted PEM
        raise ValueError(f"{path}: encrypted private keys are not supported ({err})") from err
    except ValueError as err:
        raise ValueError(f"{path}: not a PEM private key ({err})") from err
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(
            f"{path}: a {type(key).__name__.lstrip('_')}, expected an Ed25519 private key"
        )
    return key


def load_public_key(source: Path | str | bytes | Ed25519PublicKey) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM file path, PEM bytes/text, or an already-loaded key."""
    if isinstance(source, Ed25519PublicKey):
        return source
    if isinstance(source, bytes):
        data, where = source, "public key PEM"
    elif isinstance(source, str) and source.lstrip().startswith("-----BEGIN"):
        data, where = source.encode(), "public key PEM"
    else:
        data, where = _read(Path(source), "public key"), str(source)
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as err:
        raise ValueError(f"{where}: not a PEM public key ({err})") from err
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(
            f"{where}: a {type(key).__name__.lstrip('_')}, expected an Ed25519 public key"
        )
    return key


def sign(private_key: Ed25519PrivateKey, data: bytes) -> str:
    """Base64 Ed25519 signature of `data`."""
    return base64.b64encode(private_key.sign(bytes(data))).decode("ascii")


def verify(public_key: Ed25519PublicKey, signature_b64: str, data: bytes) -> bool:
    """True only if `signature_b64` is a valid signature of exactly `data` by `public_key`; never raises for a
    malformed or wrong signature."""
    try:
        signature = base64.b64decode(str(signature_b64).strip(), validate=True)
        public_key.verify(signature, bytes(data))
        return True
    except (InvalidSignature, binascii.Error, ValueError, TypeError):
        return False


def public_key_pem(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """The SubjectPublicKeyInfo PEM text of a key (of the public half, for a private key)."""
    if isinstance(key, Ed25519PrivateKey):
        key = key.public_key()
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def fingerprint(public_key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """sha256 hex of the raw 32-byte public key."""
    if isinstance(public_key, Ed25519PrivateKey):
        public_key = public_key.public_key()
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()
