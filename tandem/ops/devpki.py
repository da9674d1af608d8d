"""A development CA, server certificates and secrets for a secure local stack (`tandem up/demo --secure`).

Guarantees:
- `ensure(folder)` returns a `DevPki` whose files all exist under `folder`: a CA (ECDSA P-256,
  valid 10 years), one server certificate signed by it for `localhost`, `127.0.0.1`, `::1` and
  this machine's host name (valid 1 year), and a client certificate for mutual TLS. Made with the
  `cryptography` package, never by shelling out to openssl.
- Files are reused while they are valid for at least another day and the server certificate
  names every host asked for; otherwise everything is made again.
- Private keys and secrets are written with mode 0600 (`tandem.security.write_secret`); the
  folder is 0700. Nothing here prints or logs a key or a secret.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tandem.security import write_secret

_DAY = dt.timedelta(days=1)


@dataclass(frozen=True)
class DevPki:
    folder: Path

    @property
    def ca_cert(self) -> Path:
        return self.folder / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.folder / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.folder / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.folder / "server.key"

    @property
    def client_cert(self) -> Path:
        return self.folder / "client.pem"

    @property
    def client_key(self) -> Path:
        return self.folder / "client.key"


def default_hosts() -> list[str]:
    names = ["localhost", "127.0.0.1", "::1"]
    try:
        names.append(socket.gethostname())
    except OSError:
        pass
    return list(dict.fromkeys(n for n in names if n))


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for host in hosts:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            entries.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(entries)


def _leaf(name: str, key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey,
          now: dt.datetime, *, hosts: list[str] | None, usage: x509.ObjectIdentifier) -> x509.Certificate:
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
               .issuer_name(ca_cert.subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + 365 * _DAY)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
    if hosts:
        builder = builder.add_extension(_san(hosts), critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def _valid(pki: DevPki, hosts: list[str], now: dt.datetime) -> bool:
    try:
        certs = [x509.load_pem_x509_certificate(p.read_bytes()) for p in (pki.ca_cert, pki.server_cert, pki.client_cert)]
        if not all(p.exists() for p in (pki.ca_key, pki.server_key, pki.client_key)):
            return False
        named = certs[1].extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, x509.ExtensionNotFound):
        return False
    have = {str(v) for v in named.get_values_for_type(x509.DNSName)} | \
        {str(v) for v in named.get_values_for_type(x509.IPAddress)}
    wanted = {str(ipaddress.ip_address(h)) if _is_ip(h) else h for h in hosts}
    return wanted <= have and all(c.not_valid_after_utc > now + _DAY for c in certs)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def ensure(folder: Path, hosts: list[str] | None = None) -> DevPki:
    """The development PKI under `folder`, made (again) when missing, expiring or short of a host."""
    hosts = hosts or default_hosts()
    pki = DevPki(Path(folder))
    now = dt.datetime.now(dt.UTC)
    if _valid(pki, hosts, now):
        return pki
    pki.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    pki.folder.chmod(0o700)
    ca_key = _key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Tandem development CA")])
    ca_cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(ca_key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + 3650 * _DAY)
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                            content_commitment=False, key_encipherment=False, data_encipherment=False,
                                            key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
               .sign(ca_key, hashes.SHA256()))
    server_key, client_key = _key(), _key()
    server = _leaf("tandem server", server_key, ca_cert, ca_key, now, hosts=hosts, usage=ExtendedKeyUsageOID.SERVER_AUTH)
    client = _leaf("tandem device", client_key, ca_cert, ca_key, now, hosts=None, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    write_secret(pki.ca_key, _pem_key(ca_key))
    write_secret(pki.server_key, _pem_key(server_key))
    write_secret(pki.client_key, _pem_key(client_key))
    for path, cert in ((pki.ca_cert, ca_cert), (pki.server_cert, server), (pki.client_cert, client)):
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return pki
