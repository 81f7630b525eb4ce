"""Build information, printed by `ztunnel version` in upstream's `version.BuildInfo{...}` shape."""

from __future__ import annotations

import os
import platform
import ssl
from dataclasses import dataclass

from ztunnel import __version__


@dataclass(frozen=True, slots=True)
class BuildInfo:
    version: str
    git_revision: str
    rust_version: str  # upstream's key; here the Python runtime that runs us
    build_profile: str
    build_status: str
    istio_version: str
    crypto_provider: str

    @classmethod
    def current(cls, env: dict[str, str] | None = None) -> BuildInfo:
        env = dict(os.environ) if env is None else env
        return cls(
            version=__version__,
            git_revision=env.get("ZTUNNEL_BUILD_GIT_REVISION", "unknown"),
            rust_version=f"python-{platform.python_version()}",
            build_profile="release",
            build_status=env.get("ZTUNNEL_BUILD_STATUS", "Clean"),
            istio_version=env.get("ISTIO_META_ISTIO_VERSION", "unknown"),
            crypto_provider=ssl.OPENSSL_VERSION,
        )

    def __str__(self) -> str:
        return (
            f'version.BuildInfo{{Version:"{self.version}", GitRevision:"{self.git_revision}", '
            f'RustVersion:"{self.rust_version}", BuildProfile:"{self.build_profile}", '
            f'BuildStatus:"{self.build_status}", IstioVersion:"{self.istio_version}", '
            f'CryptoProvider:"{self.crypto_provider}"}}'
        )

    def to_dump(self) -> dict[str, str]:
        return {
            "version": self.version,
            "gitRevision": self.git_revision,
            "rustVersion": self.rust_version,
            "buildProfile": self.build_profile,
            "buildStatus": self.build_status,
            "istioVersion": self.istio_version,
            "cryptoProvider": self.crypto_provider,
        }
