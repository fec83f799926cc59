"""What both programs need, in exactly one copy: chatmail-metadata and notifiers import it.

Each module has one job: :mod:`.systemd` (sd_notify, watchdog, socket activation),
:mod:`.logsetup` (journald-aware stderr logging), :mod:`.digest` (the token digest
every log line uses), :mod:`.hostport` (``HOST:PORT`` options), :mod:`.tls` (the
trust setting of outgoing HTTPS) and :mod:`.outcome` (the verdict of one push).
It imports neither ``chatmaild`` nor ``notifiers``.
"""
