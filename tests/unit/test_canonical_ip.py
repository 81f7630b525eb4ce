"""`sockets.canonical_ip`: what the kernel reports, as upstream's `to_canonical` spells it."""

from __future__ import annotations

import pytest

from ztunnel.sockets import canonical_ip


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        ("10.0.0.1", "10.0.0.1"),
        ("::ffff:10.0.0.1", "10.0.0.1"),
        ("::FFFF:127.0.0.1", "127.0.0.1"),
        ("2001:DB8:0::1", "2001:db8::1"),
        ("fe80::1%eth0", "fe80::1"),
        ("::1", "::1"),
    ],
)
def test_canonical_ip(raw: str, canonical: str) -> None:
    assert canonical_ip(raw) == canonical
    assert canonical_ip(raw) == canonical  # again, from the cache
