"""The providers the proxy knows, in one list; everything per provider is derived from it.

Adding a provider is one new module that ends with a
:class:`~notifiers.providers.spec.ProviderSpec` named ``PROVIDER`` (its token
kinds, options, metric label and success counter, "not configured" reason and
factory) and one line in :data:`PROVIDERS`.  The command line, the
``[notifiers]`` ini keys, the limit options, the metrics and the startup all
follow.  (A provider for a new token prefix also extends the grammar in
:mod:`notifiers.tokens`, which is the wire format clients produce.)

The order of :data:`PROVIDERS` matters twice: a token kind is served by the
first provider in the list that is configured for it (so the log provider,
first, stands in for all when it is on), and the push services' success
counters are registered in this order, which is upstream's.
"""

from __future__ import annotations

from ..options import Option
from ..ratelimit import limit_options
from ..tokens import Kind
from . import apns, fcm, log, ubports, webpush
from .spec import ProviderSpec

PROVIDERS: tuple[ProviderSpec, ...] = (
    log.PROVIDER,
    apns.PROVIDER,
    fcm.PROVIDER,
    ubports.PROVIDER,
    webpush.PROVIDER,
)

#: The push services: each owns its token kinds, their metric label and limits.
SERVICES: tuple[ProviderSpec, ...] = tuple(spec for spec in PROVIDERS if spec.is_service)

#: Token kind -> the push service that owns it.
OWNER: dict[Kind, ProviderSpec] = {kind: spec for spec in SERVICES for kind in spec.kinds}

#: Token kind -> ``provider`` metric label (both APNs environments count as APNS).
LABEL: dict[Kind, str] = {kind: str(spec.label) for kind, spec in OWNER.items()}

#: Token kind -> upstream's failure reason when no provider serves it.
NOT_CONFIGURED: dict[Kind, str] = {kind: str(spec.not_configured) for kind, spec in OWNER.items()}

#: Label -> (name, HELP text) of the service's success counter, in registration order.
SUCCESS_METRICS: dict[str, tuple[str, str]] = {
    str(spec.label): spec.success for spec in SERVICES if spec.success
}


def options_of(spec: ProviderSpec) -> tuple[Option, ...]:
    """A provider's options, followed by its limit options if it is a push service."""
    return spec.options + (limit_options(spec.label) if spec.label else ())


def _check() -> None:
    """Refuse an inconsistent registry at import, not at the first push of a kind."""
    owners = [kind for spec in SERVICES for kind in spec.kinds]
    if sorted(owners, key=str) != sorted(Kind, key=str):
        raise RuntimeError("every token kind needs exactly one push service in the registry")
    names = [option.name for spec in PROVIDERS for option in options_of(spec)]
    if len(names) != len(set(names)):
        raise RuntimeError("two providers declare an option of the same name")


_check()
