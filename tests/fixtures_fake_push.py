"""pytest fixtures for the fake push services of :mod:`devstack.fakes`.

A plugin module: ``tests/conftest.py`` lists it in ``pytest_plugins``, so every
test module can ask for these fixtures by name.  All are synchronous: the servers
run in their own threads, so any async test can use them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from devstack.fakes.apns import FakeApns
from devstack.fakes.fcm import FakeFcm
from devstack.fakes.h2server import FakeH2Server
from devstack.fakes.keys import (
    ApnsCert,
    ApnsKey,
    server_context,
    write_client_p12,
    write_p8,
    write_service_account,
)
from devstack.fakes.webpush import FakeWebPush


@pytest.fixture(scope="session")
def tls_ca() -> trustme.CA:
    """The CA that signs the fake servers' certificates."""
    return trustme.CA()


@pytest.fixture(scope="session")
def client_ca() -> trustme.CA:
    """The CA that signs APNs client certificates (the fake demands one of its certs)."""
    return trustme.CA()


@pytest.fixture(scope="session")
def ca_path(tls_ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> str:
    """PEM path of ``tls_ca``: pass it as ``verify=`` to a provider."""
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    tls_ca.cert_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture
def apns_cert(client_ca: trustme.CA, tmp_path: Path) -> ApnsCert:
    """A password-protected .p12 with a client certificate the fake APNs accepts."""
    path = tmp_path / "apns.p12"
    write_client_p12(client_ca, path, b"secret")
    return ApnsCert(path, b"secret")


@pytest.fixture
def apns_key(tmp_path: Path) -> ApnsKey:
    """An APNs .p8 signing key with its key id and team id."""
    path = tmp_path / "AuthKey_ABC123DEFG.p8"
    public_key = write_p8(path)
    return ApnsKey(path, "ABC123DEFG", "TEAM123456", public_key)


@pytest.fixture
def fake_apns_cert(tls_ca: trustme.CA, client_ca: trustme.CA) -> Iterator[FakeApns]:
    """Fake APNs that requires a client certificate from ``client_ca`` (use ``apns_cert``)."""
    with FakeApns(tls_ca, client_ca=client_ca) as server:
        yield server


@pytest.fixture
def fake_apns_jwt(tls_ca: trustme.CA, apns_key: ApnsKey) -> Iterator[FakeApns]:
    """Fake APNs that requires a JWT signed with ``apns_key``."""
    with FakeApns(
        tls_ca, jwt_key=apns_key.public_key, key_id=apns_key.key_id, team_id=apns_key.team_id
    ) as server:
        yield server


@pytest.fixture
def fake_fcm(tls_ca: trustme.CA) -> Iterator[FakeFcm]:
    """Fake FCM (send + OAuth token endpoint); ``fcm_key_path`` is wired to it."""
    with FakeFcm(tls_ca) as server:
        yield server


@pytest.fixture
def fcm_key_path(fake_fcm: FakeFcm, tmp_path: Path) -> Path:
    """A service-account key whose ``token_uri`` is ``fake_fcm``'s token endpoint."""
    path = tmp_path / "service-account.json"
    info = write_service_account(path, token_uri=fake_fcm.token_url, project_id=fake_fcm.project_id)
    fake_fcm.use_service_account(info)
    return path


@pytest.fixture
def fake_ubports(tls_ca: trustme.CA) -> Iterator[FakeH2Server]:
    """Fake UBports push server: records requests, answers scripted replies (default 200)."""
    with FakeH2Server(server_context(tls_ca)) as server:
        server.default.body = b'{"ok":true}'
        yield server


@pytest.fixture
def fake_webpush(tls_ca: trustme.CA) -> Iterator[FakeWebPush]:
    """Fake Web Push service over HTTPS/1.1; its certificate also covers push.example."""
    with FakeWebPush(tls_ca, names=("push.example",)) as server:
        yield server


@pytest.fixture
def vapid_key_path(tmp_path: Path) -> Path:
    """A VAPID key as upstream's README makes it: PKCS#8 PEM, P-256, unencrypted."""
    key = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / "vapid.pk8"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path
