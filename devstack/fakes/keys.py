"""Test credentials made at test time: TLS certificates, APNs .p12/.p8, FCM service account."""

from __future__ import annotations

import functools
import json
import shutil
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12

SERVER_NAMES = ("127.0.0.1", "localhost")


@dataclass
class ApnsCert:
    """A client-certificate .p12 for APNs certificate mode, with its password."""

    path: Path
    password: bytes


@dataclass
class ApnsKey:
    """An APNs token-mode signing key (.p8) with the ids a JWT must carry."""

    path: Path
    key_id: str
    team_id: str
    public_key: ec.EllipticCurvePublicKey


def server_context(ca: trustme.CA, client_ca: trustme.CA | None = None) -> ssl.SSLContext:
    """A TLS server context for 127.0.0.1; with ``client_ca`` it demands a client cert (mTLS)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*SERVER_NAMES).configure_cert(ctx)
    if client_ca is not None:
        client_ca.configure_trust(ctx)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def write_client_p12(
    ca: trustme.CA, path: Path, password: bytes | None, *, legacy: str = ""
) -> x509.Certificate:
    """A client certificate signed by ``ca``, packed into ``path``.

    ``legacy``: "" (modern AES/PBES2), "3des" (cryptography's legacy
    PBESv1 SHA1/3DES bags) or "rc2" (``openssl pkcs12 -export -legacy`` with
    RC2-40 certificate bags, as old Apple Keychain exports are).
    """
    leaf = ca.issue_cert("apns-client.example", common_name="Apple Push Services: chat.delta")
    key = serialization.load_pem_private_key(leaf.private_key_pem.bytes(), None)
    cert = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes())
    if legacy == "rc2":
        if shutil.which("openssl") is None:
            raise RuntimeError("openssl binary needed for an RC2-40 .p12")
        pem = path.with_suffix(".pem")
        pem.write_bytes(leaf.private_key_pem.bytes() + leaf.cert_chain_pems[0].bytes())
        subprocess.run(
            ["openssl", "pkcs12", "-export", "-legacy", "-certpbe", "PBE-SHA1-RC2-40",
             "-keypbe", "PBE-SHA1-3DES", "-in", str(pem), "-out", str(path),
             "-passout", "stdin"],
            input=(password or b"") + b"\n",
            check=True,
            capture_output=True,
        )  # fmt: skip
        pem.unlink()
        return cert
    if password is None:
        encryption: serialization.KeySerializationEncryption = serialization.NoEncryption()
    elif legacy == "3des":
        encryption = (
            serialization.PrivateFormat.PKCS12.encryption_builder()
            .kdf_rounds(2048)
            .key_cert_algorithm(pkcs12.PBES.PBESv1SHA1And3KeyTripleDESCBC)
            .hmac_hash(hashes.SHA1())
            .build(password)
        )
    else:
        encryption = serialization.BestAvailableEncryption(password)
    path.write_bytes(pkcs12.serialize_key_and_certificates(b"apns", key, cert, None, encryption))
    return cert


def write_p8(path: Path) -> ec.EllipticCurvePublicKey:
    """An APNs-style ``AuthKey_<kid>.p8``: PKCS#8 PEM of a P-256 key."""
    key = ec.generate_private_key(ec.SECP256R1())
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return key.public_key()


@functools.cache
def _rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)  # cached: slow-ish


def write_service_account(
    path: Path, *, token_uri: str, project_id: str = "test-project"
) -> dict[str, object]:
    """A Google service-account JSON like the console's; returns it with ``public_key``."""
    key = _rsa_key()
    info = {
        "type": "service_account",
        "project_id": project_id,
        "private_key_id": "0123456789abcdef",
        "private_key": key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode(),
        "client_email": f"push@{project_id}.iam.gserviceaccount.com",
        "client_id": "1234567890",
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": token_uri,
    }
    path.write_text(json.dumps(info))
    return {**info, "public_key": key.public_key()}
