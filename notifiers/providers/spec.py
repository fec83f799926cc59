"""What a provider module declares to join the registry (like a Sygnal pushkin's config).

Each provider module (``apns.py``, ``fcm.py``, ...) ends with one
:class:`ProviderSpec` named ``PROVIDER``; :mod:`notifiers.providers.registry`
lists them.  From the specs the proxy derives its command line and
``[notifiers]`` keys, its per-provider limit options, its metric labels and
success counters, the failure reason for tokens no provider serves, and the
providers it builds at start.

Two roles: a *push service* (``label`` set) owns its token kinds: it names
their metrics, limits and "not configured" reason.  A *stand-in* (no
``label``, e.g. the log provider) owns nothing; when configured it serves
other providers' kinds under their labels and limits.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..options import Option
from ..tokens import Kind
from .base import Provider

if TYPE_CHECKING:
    from ..settings import ProxySettings


@dataclass(frozen=True, slots=True)
class Built:
    """A configured provider and what the startup log says about it."""

    provider: Provider
    detail: str  # e.g. "key /etc/fcm.json": never a secret
    level: int = logging.INFO


#: Builds the provider from the parsed options, or None when it is not configured.
#: Raises ProviderConfigError (one line, naming the file) for a broken key file.
Factory = Callable[["ProxySettings"], Built | None]


@dataclass(frozen=True, slots=True)
class ProviderSpec:
    """One provider's declaration.

    ``name``: shown in the startup log and as the ``--help`` section title;
    ``kinds``: the token kinds it can serve; ``options``: its own options
    (the registry adds the limit options of a push service); ``build``: its
    factory; ``disabled``: why it is off when ``build`` returns None.
    A push service also gives ``label`` (the ``provider`` metric label and
    the limit options' prefix), ``success`` (name and HELP text of its
    upstream success counter) and ``not_configured`` (upstream's failure
    reason for its tokens when it is off).
    """

    name: str
    kinds: tuple[Kind, ...]
    options: tuple[Option, ...]
    build: Factory
    description: str = ""
    disabled: str = ""
    label: str | None = None
    success: tuple[str, str] | None = None
    not_configured: str | None = None

    def __post_init__(self) -> None:
        service = (self.label, self.success, self.not_configured)
        if any(service) and not all(service):
            raise TypeError(f"{self.name}: a push service needs label, success and not_configured")

    @property
    def is_service(self) -> bool:
        return self.label is not None
