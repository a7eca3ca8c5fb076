"""PKI for a fedsynth consortium: a CA, the SuperLink's TLS certificate, and SuperNode authentication keys.

    python -m server.pki --out DIR --nodes N        (or `fedsynth pki`, or deploy/make_pki.sh)

Writes DIR/ca.crt + ca.key, DIR/superlink.crt + superlink.key (SAN: localhost, 127.0.0.1 and any --host given),
and DIR/nodes/node-K(.pub): EC P-384 keys in OpenSSH format, the format `flower-supernode
--auth-supernode-private-key` and `flwr supernode register` expect. Private keys are written 0600, atomically.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.io import write_bytes_atomic


@dataclass(frozen=True)
class PkiPaths:
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    node_keys: list[Path]  # private keys; the public key is the same path + ".pub"

    @property
    def node_public_keys(self) -> list[Path]:
        return [p.with_name(p.name + ".pub") for p in self.node_keys]


def _write_private(path: Path, data: bytes) -> None:
    write_bytes_atomic(path, data)
    os.chmod(path, 0o600)


def _write_public(path: Path, data: bytes) -> None:
    write_bytes_atomic(path, data)
    os.chmod(path, 0o644)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make_pki(
    out_dir: Path,
    n_nodes: int,
    hosts: tuple[str, ...] = ("localhost", "127.0.0.1"),
    days: int = 365,
    overwrite: bool = False,
) -> PkiPaths:
    """Write a CA, a SuperLink certificate for `hosts` signed by it, and `n_nodes` SuperNode key pairs.

    Refuses to replace an existing CA unless `overwrite` (a new CA silently invalidates every certificate).
    """
    out_dir = Path(out_dir)
    if n_nodes < 0 or not hosts:
        raise ValueError(
            f"make_pki needs n_nodes >= 0 and at least one host, got {n_nodes} and {hosts}"
        )
    if (out_dir / "ca.key").exists() and not overwrite:
        raise FileExistsError(
            f"{out_dir / 'ca.key'} already exists; refusing to replace the consortium's CA"
        )
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedsynth consortium"),
            x509.NameAttribute(NameOID.COMMON_NAME, "fedsynth consortium CA"),
        ]
    )
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=False,
                crl_sign=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )
    paths = PkiPaths(
        out_dir / "ca.crt",
        out_dir / "ca.key",
        out_dir / "superlink.crt",
        out_dir / "superlink.key",
        [out_dir / "nodes" / f"node-{i}" for i in range(n_nodes)],
    )
    _write_public(paths.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(paths.ca_key, _pem_key(ca_key))
    _write_public(paths.server_cert, server_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(paths.server_key, _pem_key(server_key))
    for path in paths.node_keys:
        key = ec.generate_private_key(ec.SECP384R1())
        _write_private(
            path,
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.OpenSSH,
                serialization.NoEncryption(),
            ),
        )
        _write_public(
            path.with_name(path.name + ".pub"),
            key.public_key().public_bytes(
                serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
            )
            + b"\n",
        )
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m server.pki",
        description=__doc__,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    ap.add_argument("--out", required=True)
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument(
        "--host",
        action="append",
        default=[],
        help="extra DNS name or IP for the SuperLink certificate",
    )
    ap.add_argument("--days", type=int, default=365, help="validity of the certificates")
    ap.add_argument("--force", action="store_true", help="replace an existing CA in --out")
    args = ap.parse_args(argv)
    try:
        paths = make_pki(
            Path(args.out),
            args.nodes,
            hosts=("localhost", "127.0.0.1", *args.host),
            days=args.days,
            overwrite=args.force,
        )
    except (FileExistsError, ValueError) as e:
        ap.error(str(e))
    print(f"CA: {paths.ca_cert}\nSuperLink: {paths.server_cert} {paths.server_key}")
    for p in paths.node_keys:
        print(f"SuperNode key: {p} (register {p}.pub)")
    print(f"keep {paths.ca_key} offline: it signs SuperLink certificates")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
