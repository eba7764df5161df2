"""HTTPS for phones: the development certificate, and the server serving the page over it."""

from __future__ import annotations

import ssl
import urllib.request

from cryptography import x509

from ops import tls
from client import ServerProcess


def _names(cert_path) -> set[str]:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    alt = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return set(alt.get_values_for_type(x509.DNSName)) | {str(ip) for ip in alt.get_values_for_type(x509.IPAddress)}


def test_self_signed_certificate_is_made_once_for_the_names_in_use(tmp_path):
    cert, key = tls.self_signed_certificate("192.168.1.23", tmp_path)
    assert {"localhost", "127.0.0.1", "192.168.1.23"} <= _names(cert)
    assert key.stat().st_mode & 0o077 == 0  # the private key is the owner's alone
    first = cert.read_bytes()
    # Kept across restarts, so a phone's exception for it still holds...
    assert tls.self_signed_certificate("0.0.0.0", tmp_path) == (cert, key) and cert.read_bytes() == first
    # ...and made again when the server is reached under an address it does not name.
    tls.self_signed_certificate("10.0.0.5", tmp_path)
    assert cert.read_bytes() != first and "10.0.0.5" in _names(cert)


def test_server_serves_the_page_over_https(tmp_path):
    server = ServerProcess("--self-signed", env={"XDG_CACHE_HOME": str(tmp_path)})
    try:
        assert server.url.startswith("https://")
        # Verified in full: the certificate names the address given with --host.
        trust = ssl.create_default_context(cafile=str(tmp_path / "livestt/tls/cert.pem"))
        with urllib.request.urlopen(server.url + "/", context=trust, timeout=5) as r:
            assert r.status == 200 and b"Live transcription" in r.read()
    finally:
        assert server.stop() == 0, server.log()
