"""TLS certificates for the SuperLink and authentication keys for SuperNodes, in Python.

Written with the `cryptography` package (a Flower dependency), so nothing else is needed
(no openssl, no ssh-keygen). What it writes is what Flower 1.41 reads:

- `tls`: a certificate authority `ca.crt` (+ `ca.key`, keep it private) and the
  SuperLink's `server.pem` / `server.key`, signed by that CA, valid for the given host
  names and IP addresses (subject alternative names; clients check them). SuperNodes and
  the `flwr` CLI trust `ca.crt`.
- `node-keys`: per SuperNode an ECDSA P-384 key pair in OpenSSH format, as
  `ssh-keygen -t ecdsa -b 384 -N '' -f NAME` writes it: `NAME` (private, for
  `flower-supernode --auth-supernode-private-key`) and `NAME.pub` (for
  `flwr supernode register`).

    python -m deploy.credentials tls --out certificates --host superlink.example.org
    python -m deploy.credentials node-keys --out keys --count 3
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import sys
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


def _write(path: Path, data: bytes, private: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if private:
        # Created readable by the owner only (ssh refuses group/world readable keys, and
        # so should we).
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(path, 0o600)
    else:
        path.write_bytes(data)
    return path


def _pem_key(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def _san(hosts: Iterable[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):  # unique, in order
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def generate_tls(out_dir: Path, hosts: Iterable[str] = LOOPBACK_HOSTS, days: int = 365):
    """Write ca.crt, ca.key, server.pem, server.key under `out_dir`; return their paths.

    `hosts` are the names and addresses SuperNodes and the CLI use to reach the SuperLink.
    """
    out_dir = Path(out_dir)
    hosts = list(hosts)
    if not hosts:
        raise ValueError("give at least one host name or address for the server certificate")
    now = dt.datetime.now(dt.UTC)
    not_before, not_after = now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)

    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedprune federation CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    server_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=True,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(_san(hosts), critical=False)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    return {
        "ca_cert": _write(out_dir / "ca.crt", ca_cert.public_bytes(pem)),
        "ca_key": _write(out_dir / "ca.key", _pem_key(ca_key), private=True),
        "server_cert": _write(out_dir / "server.pem", server_cert.public_bytes(pem)),
        "server_key": _write(out_dir / "server.key", _pem_key(server_key), private=True),
    }


def generate_node_key(path: Path, comment: str = "") -> tuple[Path, Path]:
    """Write an ECDSA P-384 key pair in OpenSSH format: `path` (private) and `path`.pub."""
    path = Path(path)
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    if comment:
        public += b" " + comment.encode()
    return _write(path, private, private=True), _write(
        path.with_name(path.name + ".pub"), public + b"\n"
    )


def generate_node_keys(out_dir: Path, count: int, prefix: str = "supernode") -> list[Path]:
    """Key pairs `<prefix>-1` ... `<prefix>-<count>` under `out_dir`; the private key paths."""
    return [
        generate_node_key(Path(out_dir) / f"{prefix}-{i}", comment=f"{prefix}-{i}")[0]
        for i in range(1, count + 1)
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    tls = sub.add_parser("tls", help="CA and SuperLink server certificate")
    tls.add_argument("--out", type=Path, default=Path("certificates"))
    tls.add_argument(
        "--host",
        action="append",
        default=[],
        help="host name or IP address of the SuperLink as SuperNodes reach it (repeatable); "
        "localhost, 127.0.0.1 and ::1 are always included",
    )
    tls.add_argument("--days", type=int, default=365)
    keys = sub.add_parser("node-keys", help="ECDSA P-384 key pairs for SuperNodes")
    keys.add_argument("--out", type=Path, default=Path("keys"))
    keys.add_argument("--count", type=int, default=1)
    keys.add_argument("--prefix", default="supernode")
    args = parser.parse_args(argv)
    if args.command == "tls":
        paths = generate_tls(args.out, [*args.host, *LOOPBACK_HOSTS], args.days)
        for name, path in paths.items():
            print(f"{name:12s} {path}")
    else:
        for private in generate_node_keys(args.out, args.count, args.prefix):
            print(f"private {private}    public {private}.pub")
    return 0


if __name__ == "__main__":
    sys.exit(main())
