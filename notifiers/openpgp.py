"""``openpgp:`` tokens: the keyring, picking the key by recipient, decrypting, and a cache.

Why this exists: every stock Delta Chat client uploads its push token as
``openpgp:`` + base64 of an RFC 9580 message (reference client-core.md §1.4):
the token, space-padded to 512 bytes, encrypted to the proxy's X25519 subkey
(v6 PKESK, SEIPD v2 AES-128/OCB).  The proxy holds one or more unprotected
secret keys (several = rotation) in one armored keyring file.

The library is rpgp-py (import name ``openpgp``), the same rPGP that chatmail
core encrypts with; bench/bench_openpgp.py measured it against pysequoia here
(the numbers are in its docstring).  Its errors are plain one-line
``ValueError`` subclasses, and only the first line of any error is ever used.

The policy is what keeps a misconfiguration from making relays delete every
token (a GONE verdict makes the relay delete the token):

* a keyring file that is missing, unreadable, holds a protected key or no
  usable secret key at all is a startup error (:class:`KeyringError`, one line
  naming the file); public blocks and unparsable blocks are skipped with a
  warning, as upstream does; the fingerprints are logged at start;
* the key is picked by the recipient in the first PKESK packet (read here,
  sans-I/O, which also works on a truncated message), not by trying every key;
* a message for a recipient none of our keys is (or that has no readable PKESK
  at all) raises :class:`UnknownRecipient`: the service forwards it upstream if
  one is configured, else answers GONE;
* a message for one of our keys that does not decrypt, is not UTF-8 or does not
  follow the token grammar raises :class:`DecryptionError` (GONE), with the key
  and the reason for the metrics.

Decrypted tokens are cached in a bounded LRU (:class:`TokenCache`) keyed by a
digest of the ciphertext, because clients resend the byte-identical ciphertext
on every connect.  The cache lives in memory only and nothing here logs a token.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from openpgp.composed import Message, SignedSecretKey
from openpgp.errors import Error

from .options import Option, integer, path
from .providers.base import ProviderConfigError
from .tokens import TokenError, parse_token

if TYPE_CHECKING:
    from .settings import ProxySettings

log = logging.getLogger(__name__)

PREFIX = "openpgp:"
DEFAULT_CACHE_ENTRIES = 100_000

OPTIONS: tuple[Option, ...] = (
    Option(
        "openpgp_keyring_path",
        path,
        help="file of one or more armored, unprotected OpenPGP secret keys that decrypt "
        "openpgp: tokens (several keys: rotation)",
        metavar="PATH",
    ),
    Option(
        "openpgp_cache_entries",
        integer(0),
        DEFAULT_CACHE_ENTRIES,
        "decrypted openpgp: tokens kept in memory (0: no cache)",
        metavar="N",
    ),
)

# Reasons, the ``reason`` label of the failure metric.
BASE64 = "base64"
UNKNOWN_RECIPIENT = "unknown_recipient"
MALFORMED = "malformed"
DECRYPT = "decrypt"
UTF8 = "utf8"
INVALID_TOKEN = "invalid_token"
#: not a failure of the token: the proxy has no keyring (RETRY, or forwarded)
NO_KEYRING = "no_keyring"


class KeyringError(ProviderConfigError):
    """The keyring file is missing, unreadable, protected or holds no usable key."""


class DecryptionError(Exception):
    """This ``openpgp:`` token cannot be opened (answered GONE on ``/notify``).

    ``key`` is the primary fingerprint of our key it was for ("" when none);
    ``reason`` one of the module's reason constants.
    """

    def __init__(self, message: str, *, reason: str = DECRYPT, key: str = "") -> None:
        super().__init__(message)
        self.reason = reason
        self.key = key


class UnknownRecipient(DecryptionError):
    """None of our keys is the recipient: another proxy (upstream) may hold the key."""


# -- the PKESK recipient, sans-I/O ------------------------------------------------------


def pkesk_recipient(raw: bytes) -> bytes | None:
    """The recipient of the message's first packet, if it is a PKESK (RFC 9580 §5.1).

    A v6 PKESK names the key by fingerprint (32 bytes for a v6 key, 20 for v4),
    a v3 PKESK by its 8-byte key ID.  ``b""`` means an anonymous recipient;
    None means the message does not start with a readable PKESK.
    """
    if len(raw) < 3:
        return None
    first = raw[0]
    if first & 0xC0 == 0xC0:  # new format: tag 1 is 0xC1
        if first != 0xC1:
            return None
        octet = raw[1]
        if octet < 192:
            start = 2
        elif octet < 224:
            start = 3
        elif octet == 255:
            start = 6
        else:
            return None  # partial body lengths are not allowed for a PKESK
    elif first & 0xC0 == 0x80:  # old format: tag in bits 5..2, length type in 1..0
        if (first >> 2) & 0x0F != 1 or first & 3 == 3:
            return None
        start = 2 + (1, 2, 4)[first & 3] - 1
    else:
        return None
    body = raw[start:]
    if len(body) >= 2 and body[0] == 6:
        size = body[1]  # key version octet + fingerprint; 0 = anonymous
        if size == 0:
            return b""
        fingerprint = body[3 : 2 + size]
        return fingerprint if len(fingerprint) == size - 1 and size > 1 else None
    if len(body) >= 9 and body[0] == 3:
        key_id = body[1:9]
        return b"" if key_id == bytes(8) else key_id
    return None


# -- the keyring ------------------------------------------------------------------------

_BLOCK = re.compile(
    r"-----BEGIN PGP (?P<kind>[A-Z ]+?)-----.*?-----END PGP (?P=kind)-----", re.DOTALL
)
_PRIVATE = "PRIVATE KEY BLOCK"


@dataclass(frozen=True, slots=True)
class KeyringKey:
    """One usable secret key: its primary fingerprint (the metric label) and its key."""

    fingerprint: str
    subkeys: tuple[str, ...]
    secret: SignedSecretKey = field(repr=False)  # never in a log line


class Keyring:
    """The proxy's secret keys, by every fingerprint and key ID a PKESK may name."""

    def __init__(self, keys: list[KeyringKey], source: str = "") -> None:
        self.keys = tuple(keys)
        self.source = source
        self._by_recipient: dict[bytes, KeyringKey] = {}
        for key in self.keys:
            for fingerprint in (key.fingerprint, *key.subkeys):
                raw = bytes.fromhex(fingerprint)
                self._by_recipient[raw] = key
                # a v6 key ID is the fingerprint's first 8 bytes, a v4 one its last 8
                self._by_recipient[raw[:8] if len(raw) == 32 else raw[-8:]] = key

    @property
    def fingerprints(self) -> list[str]:
        return [key.fingerprint for key in self.keys]

    @classmethod
    def load(cls, keyring_path: Path) -> Keyring:
        """Read the keyring file; :class:`KeyringError` (one line, naming it) if unusable."""
        try:
            text = Path(keyring_path).read_text("utf-8")
        except OSError as exc:
            raise KeyringError(f"openpgp keyring {keyring_path}: {exc.strerror or exc}") from None
        except UnicodeDecodeError:
            raise KeyringError(
                f"openpgp keyring {keyring_path}: not an armored (text) keyring"
            ) from None
        return cls.parse(text, str(keyring_path))

    @classmethod
    def parse(cls, text: str, source: str = "keyring") -> Keyring:
        keys: list[KeyringKey] = []
        for number, match in enumerate(_BLOCK.finditer(text), 1):
            if match["kind"] != _PRIVATE:
                log.warning(
                    "openpgp keyring %s: block %d is a %s: skipped",
                    source,
                    number,
                    match["kind"].lower(),
                )
                continue
            try:
                secret, _headers = SignedSecretKey.from_armor(match[0])
            except Error as exc:
                log.warning(
                    "openpgp keyring %s: block %d unreadable (%s): skipped",
                    source,
                    number,
                    one_line(exc),
                )
                continue
            fingerprint = secret.fingerprint.upper()
            s2ks = [secret.primary_secret_s2k(), *secret.secret_subkey_s2ks()]
            if any(s2k.usage_id != 0 for s2k in s2ks):
                raise KeyringError(
                    f"openpgp keyring {source}: key {fingerprint} is passphrase-protected; "
                    "the proxy needs unprotected keys"
                )
            subkeys = tuple(sub.key.fingerprint.upper() for sub in secret.secret_subkeys)
            keys.append(KeyringKey(fingerprint, subkeys, secret))
        if not keys:
            raise KeyringError(f"openpgp keyring {source}: no secret key in it")
        return cls(keys, source)

    def key_for(self, raw: bytes) -> KeyringKey | None:
        """The key the message's PKESK names; raises UnknownRecipient if none of ours."""
        recipient = pkesk_recipient(raw)
        if recipient is None:
            raise UnknownRecipient("no readable PKESK", reason=MALFORMED)
        if recipient == b"":
            return None  # anonymous: try every key
        key = self._by_recipient.get(recipient)
        if key is None:
            raise UnknownRecipient("for a key this proxy does not hold", reason=UNKNOWN_RECIPIENT)
        return key

    def decrypt(self, token: str) -> str:
        """The plaintext token of ``openpgp:<base64>``: stripped, UTF-8, grammatical.

        Raises :class:`UnknownRecipient` or :class:`DecryptionError` (see the module).
        """
        try:
            raw = base64.b64decode(token.removeprefix(PREFIX), validate=True)
        except (binascii.Error, ValueError):
            raise DecryptionError("not standard base64", reason=BASE64) from None
        key = self.key_for(raw)
        candidates = self.keys if key is None else (key,)
        data = None
        for candidate in candidates:
            try:
                data = Message.from_bytes(raw).decrypt(None, candidate.secret).as_data_vec()
                key = candidate
                break
            except Error as exc:
                error = exc
        if data is None:
            if key is None:  # anonymous and no key opened it
                raise UnknownRecipient("anonymous, no key opens it", reason=UNKNOWN_RECIPIENT)
            raise DecryptionError(one_line(error), reason=DECRYPT, key=key.fingerprint)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise DecryptionError("not UTF-8", reason=UTF8, key=key.fingerprint) from None
        plaintext = text.strip(WHITE_SPACE)
        try:
            parse_token(plaintext)
        except TokenError as exc:
            raise DecryptionError(str(exc), reason=INVALID_TOKEN, key=key.fingerprint) from None
        return plaintext


#: Unicode White_Space, what core's Rust ``trim()`` strips (str.strip() also strips \x1c-\x1f).
WHITE_SPACE = (
    "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008"
    "\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)


def one_line(exc: BaseException) -> str:
    """An error's first line (a Rust error may carry a backtrace after it)."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


# -- the cache and the decryptor the service calls ---------------------------------------


class TokenCache:
    """A bounded LRU from a digest of the ciphertext to the plaintext token (memory only)."""

    __slots__ = ("max_entries", "_entries", "hits", "misses")

    def __init__(self, max_entries: int = DEFAULT_CACHE_ENTRIES) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[bytes, str] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def key(ciphertext: str) -> bytes:
        return hashlib.blake2b(ciphertext.encode("utf-8", "surrogatepass"), digest_size=16).digest()

    def get(self, key: bytes) -> str | None:
        plaintext = self._entries.get(key)
        if plaintext is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(key)
        return plaintext

    def put(self, key: bytes, plaintext: str) -> None:
        if self.max_entries <= 0:
            return
        self._entries[key] = plaintext
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)


class OpenPgpDecryptor:
    """The ``decryptor`` of :class:`~notifiers.service.NotifyService`: keyring + cache."""

    def __init__(self, keyring: Keyring, cache: TokenCache | None = None) -> None:
        self.keyring = keyring
        self.cache = cache if cache is not None else TokenCache()

    def decrypt(self, token: str) -> str:
        key = TokenCache.key(token)
        plaintext = self.cache.get(key)
        if plaintext is None:
            plaintext = self.keyring.decrypt(token)
            self.cache.put(key, plaintext)
        return plaintext

    async def __call__(self, token: str) -> str:
        # Inline on the event loop: ~60 µs of CPU that holds the GIL anyway.
        return self.decrypt(token)


def build(settings: ProxySettings) -> OpenPgpDecryptor | None:
    """The decryptor for ``--openpgp-keyring-path``, None without one; logs the fingerprints."""
    if settings.openpgp_keyring_path is None:
        return None
    keyring = Keyring.load(settings.openpgp_keyring_path)
    for key in keyring.keys:
        log.info(
            "openpgp keyring %s: key %s (subkeys %s)",
            keyring.source,
            key.fingerprint,
            ", ".join(key.subkeys) or "none",
        )
    return OpenPgpDecryptor(keyring, TokenCache(settings.openpgp_cache_entries))
