"""Keys and ``openpgp:`` tokens made exactly the way Delta Chat clients make them.

Why: the proxy must decrypt what chatmail core sends, byte format included, and
tests and benchmarks must not depend on a hand-made approximation.  Core
(``src/push.rs``, rPGP) pads the token with ASCII spaces to 512 bytes and
encrypts it to the first subkey of the proxy's key as one v6 PKESK (X25519)
plus a SEIPD v2 packet (AES-128, OCB, chunk-size octet 7 = 8 KiB) around a
literal packet with an empty file name, then base64 (standard, padded, no
armour) behind ``openpgp:``.  rpgp-py binds the same rPGP, so these are the
same builder steps (reference/openpgp-tokens.md §4, client-core.md §1.4).

The keys are shaped like ``rsop generate-key --profile rfc9580``: a v6 Ed25519
primary (certify + sign), one X25519 encryption subkey, no user ID, no expiry,
unprotected unless a passphrase is given.  Used by ``tests/`` and ``bench/``;
the programs never import this module.
"""

from __future__ import annotations

import base64
from pathlib import Path

from openpgp.composed import (
    EncryptionCaps,
    KeyType,
    MessageBuilder,
    SecretKeyParamsBuilder,
    SignedPublicKey,
    SignedSecretKey,
    SubkeyParamsBuilder,
)
from openpgp.types import PacketHeaderVersion

PREFIX = "openpgp:"
#: core pads every token to this many bytes, so APNs and FCM tokens look alike
PADDED_LENGTH = 512


def generate_key(passphrase: str | None = None) -> SignedSecretKey:
    """A new rsop-like v6 key (Ed25519 primary, X25519 subkey), unprotected by default."""
    subkey = (
        SubkeyParamsBuilder()
        .version(6)
        .key_type(KeyType.x25519())
        .packet_version(PacketHeaderVersion.new())
        .can_encrypt(EncryptionCaps.all())
    )
    primary = (
        SecretKeyParamsBuilder()
        .version(6)
        .key_type(KeyType.ed25519())
        .packet_version(PacketHeaderVersion.new())
        .can_certify(True)
        .can_sign(True)
        .feature_seipd_v2(True)
    )
    if passphrase is not None:
        subkey = subkey.passphrase(passphrase)
        primary = primary.passphrase(passphrase)
    return primary.subkey(subkey.build()).generate()


def pad(token: str) -> bytes:
    """The plaintext core encrypts: the token, space-padded to 512 bytes (never truncated)."""
    return token.encode("utf-8").ljust(PADDED_LENGTH, b" ")


def encrypt_raw(plaintext: bytes, key: SignedSecretKey | SignedPublicKey) -> bytes:
    """The binary message core's ``encrypt_device_token`` makes of ``plaintext``."""
    public = key.to_public_key() if isinstance(key, SignedSecretKey) else key
    return (
        MessageBuilder.from_bytes("", plaintext)
        .seipd_v2("aes128", "ocb", 7)
        .encrypt_to_key(public.public_subkeys[0])
        .to_vec()
    )


def wrap(raw: bytes) -> str:
    """``openpgp:`` + standard padded base64 of a binary message."""
    return PREFIX + base64.b64encode(raw).decode("ascii")


def encrypt_token(token: str, key: SignedSecretKey | SignedPublicKey) -> str:
    """``token`` as a Delta Chat client uploads it for the proxy holding ``key``."""
    return wrap(encrypt_raw(pad(token), key))


def write_keyring(path: Path, *blocks: str) -> Path:
    """Write armored blocks (keys, or anything else) into one keyring file; returns ``path``."""
    Path(path).write_text("\n".join(block.rstrip("\n") + "\n" for block in blocks))
    return Path(path)
