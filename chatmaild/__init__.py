"""chatmail-metadata: Dovecot dict server, token store and push notifier of a chatmail relay."""

__version__ = "0.1.0"
