"""``openpgp:`` tokens: keyring loading, recipient choice, decryption policy, cache, metrics.

Tokens are made the way chatmail core makes them (devstack/openpgp_tokens.py:
v6 PKESK to an X25519 subkey, SEIPD v2 AES-128/OCB, 512-byte space padding).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer
from helpers_proxy import APNS, Recording, fake_apns_options, sample

from devstack.openpgp_tokens import (
    encrypt_raw,
    encrypt_token,
    generate_key,
    pad,
    wrap,
    write_keyring,
)
from notifiers.app import make_app
from notifiers.build import build_service
from notifiers.embedded import EmbeddedProxy
from notifiers.openpgp import (
    BASE64,
    DECRYPT,
    INVALID_TOKEN,
    UNKNOWN_RECIPIENT,
    UTF8,
    DecryptionError,
    Keyring,
    KeyringError,
    OpenPgpDecryptor,
    TokenCache,
    UnknownRecipient,
    pkesk_recipient,
)
from notifiers.providers.base import Outcome
from notifiers.service import NotifyService
from notifiers.settings import ProxySettings, settings_from_mapping
from notifiers.tokens import Kind

FCM = "fcm-chat.delta:cXXXX:APA91bSecretFcmTokenValue"


@pytest.fixture(scope="module")
def key():
    return generate_key()


@pytest.fixture(scope="module")
def old_key():
    return generate_key()


@pytest.fixture(scope="module")
def stranger():
    """A key this proxy does not hold (like notifications.delta.chat's)."""
    return generate_key()


@pytest.fixture
def keyring_path(tmp_path, key) -> Path:
    return write_keyring(tmp_path / "keyring.asc", key.to_armored())


def run_app(service: NotifyService, test) -> None:
    async def main():
        async with TestClient(TestServer(make_app(service), host="127.0.0.1")) as client:
            await test(client)

    asyncio.run(main())


# -- the client format ------------------------------------------------------------------


def test_fixture_tokens_have_the_client_format(key):
    token = encrypt_token(APNS, key)
    assert token.startswith("openpgp:") and len(token) == 924  # as observed from clients
    raw = base64.b64decode(token[8:], validate=True)
    assert len(raw) == 687
    # v6 PKESK, 93 bytes, X25519 (25), to the X25519 subkey by its v6 fingerprint
    assert raw[0] == 0xC1 and raw[1] == 93
    pkesk = raw[2 : 2 + 93]
    assert pkesk[0] == 6 and pkesk[1] == 33 and pkesk[2] == 6 and pkesk[35] == 25
    assert pkesk[3:35].hex().upper() == key.secret_subkeys[0].key.fingerprint.upper()
    # SEIPD v2 (tag 18): AES-128 (7), OCB (2), chunk-size octet 7
    seipd = raw[2 + 93 :]
    assert seipd[0] == 0xD2
    body = seipd[3:] if seipd[1] >= 192 else seipd[2:]
    assert body[:4] == bytes([2, 7, 2, 7])
    assert pad(APNS) == APNS.encode() + b" " * (512 - len(APNS))


def test_pkesk_recipient_forms():
    fpr = bytes(range(32))
    v6 = bytes([0xC1, 40, 6, 33, 6]) + fpr + b"\x19rest"
    assert pkesk_recipient(v6) == fpr
    assert pkesk_recipient(bytes([0xC1, 10, 6, 0, 25, 1, 2])) == b""  # anonymous
    key_id = b"\x01\x02\x03\x04\x05\x06\x07\x08"
    assert pkesk_recipient(bytes([0xC1, 12, 3]) + key_id + b"\x12") == key_id
    assert pkesk_recipient(bytes([0x84, 12, 3]) + key_id + b"\x12") == key_id  # old format
    assert pkesk_recipient(bytes([0xC1, 12, 3]) + bytes(8) + b"\x12") == b""  # wildcard
    assert pkesk_recipient(b"\xd2\x05abc") is None  # not a PKESK
    assert pkesk_recipient(bytes([0xC1, 40, 6, 33, 6]) + fpr[:10]) is None  # truncated
    assert pkesk_recipient(b"") is None


# -- keyring and decryption -------------------------------------------------------------


def test_single_key_decrypts_and_strips_the_padding(keyring_path, key):
    keyring = Keyring.load(keyring_path)
    assert keyring.fingerprints == [key.fingerprint.upper()]
    assert keyring.decrypt(encrypt_token(APNS, key)) == APNS
    assert keyring.decrypt(encrypt_token(FCM, key)) == FCM
    long = "fcm-chat.delta:" + "x" * 600  # longer than 512: not padded, not truncated
    assert keyring.decrypt(encrypt_token(long, key)) == long


def test_rotated_keyring_with_public_and_junk_blocks(tmp_path, key, old_key, stranger, caplog):
    junk = (
        "-----BEGIN PGP PRIVATE KEY BLOCK-----\n\nbm90IGEga2V5\n-----END PGP PRIVATE KEY BLOCK-----"
    )
    path = write_keyring(
        tmp_path / "ring.asc",
        old_key.to_armored(),
        stranger.to_public_key().to_armored(),
        "some notes that are not armor at all",
        junk,
        key.to_armored(),
    )
    keyring = Keyring.load(path)
    assert keyring.fingerprints == [old_key.fingerprint.upper(), key.fingerprint.upper()]
    assert keyring.decrypt(encrypt_token(APNS, old_key)) == APNS
    assert keyring.decrypt(encrypt_token(FCM, key)) == FCM
    assert "block 2 is a public key block: skipped" in caplog.text
    assert "block 3 unreadable" in caplog.text
    with pytest.raises(UnknownRecipient):  # the public block's key is not usable
        keyring.decrypt(encrypt_token(APNS, stranger))


def test_the_key_is_picked_by_recipient_not_by_trying(tmp_path, key, old_key, monkeypatch):
    keyring = Keyring.load(write_keyring(tmp_path / "r", old_key.to_armored(), key.to_armored()))
    tried = []
    from openpgp.composed import Message

    real = Message.decrypt

    def spy(self, password, secret):
        tried.append(secret.fingerprint)
        return real(self, password, secret)

    monkeypatch.setattr(Message, "decrypt", spy)
    assert keyring.decrypt(encrypt_token(APNS, key)) == APNS
    assert tried == [key.fingerprint]


@pytest.mark.parametrize(
    ("make", "exc_type", "reason", "ours"),
    [
        (lambda k, s: encrypt_token(APNS, s), UnknownRecipient, UNKNOWN_RECIPIENT, False),
        (lambda k, s: encrypt_token(APNS, k)[:-2], DecryptionError, BASE64, False),
        (lambda k, s: encrypt_token(APNS, k)[:-12], DecryptionError, DECRYPT, True),
        (lambda k, s: "openpgp:" + "not base64 at all!", DecryptionError, BASE64, False),
        (lambda k, s: "openpgp:" + base64.urlsafe_b64encode(b"\xfb" * 30).decode(), None, BASE64,
         False),
        (lambda k, s: wrap(encrypt_raw(b"\xff\xfe" + pad(APNS)[2:], k)), None, UTF8, True),
        (lambda k, s: encrypt_token("fcm-no-colon", k), None, INVALID_TOKEN, True),
        (lambda k, s: encrypt_token("", k), None, INVALID_TOKEN, True),
    ],
    ids=["wrong-key", "truncated-base64", "truncated-message", "not-base64", "urlsafe",
         "not-utf8", "invalid-token", "only-padding"],
)  # fmt: skip
def test_tokens_that_do_not_open(keyring_path, key, stranger, make, exc_type, reason, ours):
    keyring = Keyring.load(keyring_path)
    with pytest.raises(exc_type or DecryptionError) as info:
        keyring.decrypt(make(key, stranger))
    assert info.value.reason == reason
    assert info.value.key == (key.fingerprint.upper() if ours else "")
    assert "\n" not in str(info.value)


def test_errors_are_one_line_with_rust_backtrace(keyring_path, key):
    truncated = encrypt_token(APNS, key)[:-12]
    code = (
        "import sys; from notifiers.openpgp import Keyring, DecryptionError\n"
        f"k = Keyring.load({str(keyring_path)!r})\n"
        "try:\n    k.decrypt(sys.argv[1])\n"
        "except DecryptionError as e:\n    print(repr(str(e)))\n"
    )
    env = {**os.environ, "RUST_BACKTRACE": "full", "RUST_LIB_BACKTRACE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code, truncated], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    message = eval(out.stdout)  # the repr printed above
    assert message and "\n" not in message and "backtrace" not in message.lower()


# -- startup errors ---------------------------------------------------------------------


def _bad_keyrings(tmp_path: Path, key, stranger):
    protected = generate_key(passphrase="secret")
    yield "missing", tmp_path / "nope.asc", "No such file or directory"
    yield "empty", write_keyring(tmp_path / "empty.asc"), "no secret key in it"
    yield (
        "public only",
        write_keyring(tmp_path / "pub.asc", stranger.to_public_key().to_armored()),
        "no secret key in it",
    )
    yield (
        "protected",
        write_keyring(tmp_path / "prot.asc", key.to_armored(), protected.to_armored()),
        f"key {protected.fingerprint.upper()} is passphrase-protected",
    )
    binary = tmp_path / "binary.gpg"
    binary.write_bytes(b"\x95\xff\xfe" * 10)
    yield "binary", binary, "not an armored (text) keyring"
    if os.geteuid() != 0:
        unreadable = write_keyring(tmp_path / "unreadable.asc", key.to_armored())
        unreadable.chmod(0)
        yield "unreadable", unreadable, "Permission denied"


def test_bad_keyrings_are_startup_errors_naming_the_file(tmp_path, key, stranger):
    cases = list(_bad_keyrings(tmp_path, key, stranger))
    for _name, path, reason in cases:
        with pytest.raises(KeyringError) as info:
            build_service(ProxySettings(log_provider=True, openpgp_keyring_path=path))
        message = str(info.value)
        assert message.startswith(f"openpgp keyring {path}: ") and reason in message
        assert "\n" not in message


def test_bad_keyring_cli_exits_1_with_one_line(tmp_path, key, stranger):
    path = write_keyring(tmp_path / "empty.asc")
    notifiers = str(Path(sys.executable).with_name("notifiers"))
    proc = subprocess.run(
        [notifiers, "--log-provider", "--port", "0", "--openpgp-keyring-path", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last == f"notifiers: error: openpgp keyring {path}: no secret key in it"
    assert "Traceback" not in proc.stderr


def test_fingerprints_are_logged_at_start(keyring_path, key, caplog):
    caplog.set_level("INFO")
    build_service(ProxySettings(log_provider=True, openpgp_keyring_path=keyring_path))
    assert key.fingerprint.upper() in caplog.text
    assert key.secret_subkeys[0].key.fingerprint.upper() in caplog.text


def test_keyring_without_upstream_warns_that_foreign_tokens_are_gone(keyring_path, caplog):
    caplog.set_level("INFO")
    build_service(ProxySettings(log_provider=True, openpgp_keyring_path=keyring_path))
    assert "answered 410" in caplog.text and "--upstream-url" in caplog.text
    caplog.clear()
    with_upstream = ProxySettings(
        log_provider=True,
        openpgp_keyring_path=keyring_path,
        upstream_url="http://127.0.0.1:9/notify",
    )
    build_service(with_upstream)
    assert "answered 410" not in caplog.text


def test_keyring_option_from_ini(keyring_path):
    settings = settings_from_mapping({"openpgp_keyring_path": str(keyring_path)}, env={})
    assert settings.openpgp_keyring_path == keyring_path
    assert settings.openpgp_cache_entries == 100_000


# -- cache ------------------------------------------------------------------------------


def test_cache_serves_resent_ciphertexts_without_decrypting(keyring_path, key, monkeypatch):
    decryptor = OpenPgpDecryptor(Keyring.load(keyring_path), TokenCache(2))
    a, b, c = (encrypt_token(t, key) for t in (APNS, FCM, "sandbox:" + "cd" * 32))
    assert decryptor.decrypt(a) == APNS
    calls = []
    real = decryptor.keyring.decrypt
    monkeypatch.setattr(decryptor.keyring, "decrypt", lambda t: calls.append(t) or real(t))
    assert decryptor.decrypt(a) == APNS  # hit
    assert calls == []
    decryptor.decrypt(b)
    decryptor.decrypt(c)  # evicts a (least recently used)
    assert len(decryptor.cache) == 2
    assert decryptor.decrypt(b) == FCM  # still cached
    assert calls == [b, c]
    decryptor.decrypt(a)
    assert calls == [b, c, a]
    assert decryptor.cache.hits == 2
    # keyed by a digest of the ciphertext: no token is kept as a key
    assert all(len(k) == 16 for k in decryptor.cache._entries)


def test_failures_are_not_cached(keyring_path, stranger):
    decryptor = OpenPgpDecryptor(Keyring.load(keyring_path))
    token = encrypt_token(APNS, stranger)
    for _ in range(2):
        with pytest.raises(UnknownRecipient):
            decryptor.decrypt(token)
    assert len(decryptor.cache) == 0


# -- through the service and the HTTP API -----------------------------------------------


def _service(keyring_path, **kw) -> tuple[NotifyService, Recording]:
    apns = Recording("APNS")
    decryptor = OpenPgpDecryptor(Keyring.load(keyring_path))
    return NotifyService({Kind.APNS: apns, Kind.FCM: apns}, decryptor=decryptor, **kw), apns


def test_notify_policy_and_metrics(keyring_path, key, stranger, caplog):
    service, apns = _service(keyring_path)
    fingerprint = key.fingerprint.upper()
    good = encrypt_token(APNS, key)

    async def test(client):
        assert (await client.post("/notify", data=good)).status == 200
        assert (await client.post("/notify", data=encrypt_token(FCM, key))).status == 200
        assert apns.sent == [APNS, FCM]
        # no upstream: a token for somebody else's key can never be delivered here
        assert (await client.post("/notify", data=encrypt_token(APNS, stranger))).status == 410
        assert (await client.post("/notify", data=good[:-12])).status == 410
        assert (await client.post("/notify", data="openpgp:%%%")).status == 410
        bad_utf8 = wrap(encrypt_raw(b"\xc3\x28" + pad(APNS)[2:], key))
        assert (await client.post("/notify", data=bad_utf8)).status == 410
        assert (await client.post("/notify", data=encrypt_token("nothex", key))).status == 410

    run_app(service, test)
    m = service.metrics
    assert sample(m, "openpgp_decryption_failures_total") == 5
    by_key = "openpgp_decryption_failures_by_key_total"
    assert sample(m, by_key, key="", reason=UNKNOWN_RECIPIENT) == 1
    assert sample(m, by_key, key="", reason=BASE64) == 1
    assert sample(m, by_key, key=fingerprint, reason=DECRYPT) == 1
    assert sample(m, by_key, key=fingerprint, reason=UTF8) == 1
    assert sample(m, by_key, key=fingerprint, reason=INVALID_TOKEN) == 1
    for secret in (APNS, FCM, good[8:40], "nothex"):
        assert secret not in caplog.text


def test_decrypted_tokens_are_debounced_on_the_plaintext(keyring_path, key):
    service, apns = _service(keyring_path)
    two_ciphertexts = [encrypt_token(APNS, key), encrypt_token(APNS, key)]  # a reinstall

    async def test(client):
        for token in two_ciphertexts:
            assert (await client.post("/notify", data=token)).status == 200
        assert apns.sent == [APNS]

    run_app(service, test)
    assert sample(service.metrics, "debounced_notifications_total") == 1
    assert service.decryptor.cache.misses == 2


def test_register_answers_4xx_for_tokens_that_do_not_open(keyring_path, key, stranger):
    service, _ = _service(keyring_path)

    async def test(client):
        def body(token):
            return json.dumps({"token": token})

        assert (await client.post("/register", data=body(encrypt_token(APNS, key)))).status == 200
        resp = await client.post("/register", data=body(encrypt_token(APNS, stranger)))
        assert resp.status == 400
        assert await resp.text() == "cannot decrypt openpgp token: unknown_recipient"
        resp = await client.post("/register", data=body("openpgp:x"))
        assert resp.status == 400

    run_app(service, test)
    assert sample(service.metrics, "heartbeat_registrations_total") == 1
    assert sample(service.metrics, "openpgp_decryption_failures_total") == 0  # as upstream


def test_client_token_reaches_fake_apns_as_the_device_token(
    tmp_path, keyring_path, key, fake_apns_jwt, apns_key, ca_path
):
    device = "ef" * 32
    options = {
        **fake_apns_options(fake_apns_jwt, apns_key, ca_path),
        "openpgp_keyring_path": str(keyring_path),
    }
    with EmbeddedProxy(settings_from_mapping(options, env={})) as proxy:
        result = proxy.notify(encrypt_token(device, key), timeout=10)
        assert result.outcome is Outcome.SENT, result
        deadline = time.monotonic() + 10
        while not fake_apns_jwt.requests and time.monotonic() < deadline:
            time.sleep(0.02)
    request = fake_apns_jwt.requests[0]
    assert request.path == f"/3/device/{device}"
    assert request.header("apns-topic") == "chat.delta"
