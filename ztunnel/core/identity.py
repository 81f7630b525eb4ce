"""SPIFFE workload identities: `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`.

Upstream (`src/identity/manager.rs::Identity::from_str`) only checks the `spiffe://` prefix,
five `/`-separated parts and the literals `ns` / `sa`. We are stricter, because a URI SAN is
attacker-influenced input and the parsed parts feed authorization and logs: every part must
be non-empty printable ASCII without whitespace, NUL or other control characters
(ISTIO-SECURITY-2025-003: SAN matchers fooled by an embedded NUL), without URI
percent-encoding, query or fragment characters (`%`, `?`, `#`) that other components might
decode or cut, and not the dot segments `.` / `..` that path normalisation would rewrite.
The trust domain also may not carry userinfo or a port (`@`, `:`), as the SPIFFE spec says.
Such identities cannot come from Kubernetes names, so rejecting them costs no real peer.

Because parsing is strict, `str(Identity.parse(s)) == s` for every accepted `s`: comparing
identity strings and comparing parsed identities agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ztunnel.core.errors import ZtunnelError

if TYPE_CHECKING:
    from ztunnel.core.model import Workload

PREFIX = "spiffe://"
DEFAULT_TRUST_DOMAIN = "cluster.local"  # upstream `identity::manager::DEFAULT_TRUST_DOMAIN`

_FORBIDDEN = frozenset("%?#/")
_FORBIDDEN_IN_TRUST_DOMAIN = frozenset("@:")


class IdentityError(ZtunnelError):
    """A string that is not a SPIFFE identity we accept (upstream `Error::Spiffe`)."""

    reason = "identity"


def _check_part(what: str, part: str) -> None:
    if not part:
        raise IdentityError(f"empty {what}")
    if part in (".", ".."):
        raise IdentityError(f"{what} is a dot segment")
    for ch in part:
        # Printable ASCII only: rejects NUL, every control character, whitespace
        # (0x20 is the space) and non-ASCII look-alikes in one comparison.
        if not "\x21" <= ch <= "\x7e" or ch in _FORBIDDEN:
            raise IdentityError(f"{what} contains forbidden character {ch!r}")


@dataclass(frozen=True, slots=True)
class Identity:
    """A SPIFFE identity; construction validates every part."""

    trust_domain: str
    namespace: str
    service_account: str

    def __post_init__(self) -> None:
        _check_part("trust domain", self.trust_domain)
        bad = _FORBIDDEN_IN_TRUST_DOMAIN.intersection(self.trust_domain)
        if bad:
            raise IdentityError(f"trust domain contains forbidden character {min(bad)!r}")
        _check_part("namespace", self.namespace)
        _check_part("service account", self.service_account)

    @classmethod
    def parse(cls, s: str) -> Identity:
        """Parse `spiffe://td/ns/<ns>/sa/<sa>`; raises IdentityError (never echoes `s`)."""
        if not s.startswith(PREFIX):
            raise IdentityError("missing spiffe:// prefix")
        parts = s[len(PREFIX) :].split("/")
        if len(parts) != 5 or parts[1] != "ns" or parts[3] != "sa":
            raise IdentityError("not of the form spiffe://<td>/ns/<ns>/sa/<sa>")
        return cls(parts[0], parts[2], parts[4])

    @classmethod
    def from_workload(cls, w: Workload) -> Identity:
        """The identity a workload runs as (its xDS trust domain, namespace and SA)."""
        return cls(w.trust_domain, w.namespace, w.service_account)

    def __str__(self) -> str:
        return f"{PREFIX}{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"
