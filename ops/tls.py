"""HTTPS for phones: browsers open the microphone only on a secure page, and a LAN address is not one."""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import socket
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from asr.models import cache_dir
from config import Config

log = logging.getLogger(__name__)

_VALID_DAYS = 365
_RENEW_BEFORE = datetime.timedelta(days=7)


def ssl_context(config: Config) -> ssl.SSLContext | None:
    """The server's TLS context, or None to serve plain HTTP."""
    if config.self_signed:
        certfile, keyfile = self_signed_certificate(config.host)
    elif config.certfile:
        certfile, keyfile = Path(config.certfile), Path(config.keyfile) if config.keyfile else None
    else:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certfile, keyfile)
    return context


def self_signed_certificate(host: str, folder: Path | None = None) -> tuple[Path, Path]:
    """A development certificate for this machine's names. It is kept and reused, so that the
    exception a phone's browser was given for it survives a restart of the server."""
    folder = folder or cache_dir() / "tls"
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    names = _names(host)
    if _reusable(cert_path, key_path, names):
        return cert_path, key_path
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "livestt development certificate")])
    now = datetime.datetime.now(datetime.timezone.utc)
    alt_names = [x509.IPAddress(ipaddress.ip_address(n)) if _is_ip(n) else x509.DNSName(n) for n in sorted(names)]
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=_VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    folder.mkdir(parents=True, exist_ok=True)
    key_bytes = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption())
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_bytes)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    log.info("made a self-signed certificate for %s in %s", ", ".join(sorted(names)), folder)
    return cert_path, key_path


def _names(host: str) -> set[str]:
    """Names a browser may use for this machine. A LAN address is only known when it is --host."""
    hostname = socket.gethostname()
    names = {"localhost", "127.0.0.1", "::1", hostname, hostname + ".local"}
    if host not in ("", "0.0.0.0", "::"):
        names.add(host)
    return names


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _reusable(cert_path: Path, key_path: Path, names: set[str]) -> bool:
    if not (cert_path.is_file() and key_path.is_file()):
        return False
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        alt = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound):
        return False
    covered = {str(ip) for ip in alt.get_values_for_type(x509.IPAddress)}
    covered |= set(alt.get_values_for_type(x509.DNSName))
    fresh = cert.not_valid_after_utc - datetime.datetime.now(datetime.timezone.utc) > _RENEW_BEFORE
    return fresh and names <= covered
