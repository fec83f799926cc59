"""Typed sentinels (as h11 has them): markers that are their own type, never ``None``.

``type(NEED_DATA) is NEED_DATA``, so a sentinel can be dispatched on by type like any
other value (the reply encoder looks up ``type(reply)`` in one table for all replies).
"""

from __future__ import annotations


class Sentinel(type):
    """Metaclass of a sentinel: ``class FOO(Sentinel, metaclass=Sentinel)``."""

    def __new__(mcs, name, bases, namespace, **kwds):
        assert bases == (Sentinel,)
        cls = super().__new__(mcs, name, bases, namespace, **kwds)
        cls.__class__ = cls  # the sentinel is an instance of itself
        return cls

    def __repr__(cls) -> str:
        return cls.__name__


class NEED_DATA(Sentinel, metaclass=Sentinel):
    """No complete line is buffered: feed more bytes with ``receive_data``."""
