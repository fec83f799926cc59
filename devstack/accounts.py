"""The mail domain and users of every dev-stack Dovecot (the passwd file it is given)."""

from __future__ import annotations

MAIL_DOMAIN = "example.org"
USERS = {
    "alice@example.org": "alicepass",
    "bob@example.org": "bobpass",
}
