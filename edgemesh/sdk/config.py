"""Where the client talks to, and with which key. The SDK's one reader of the
environment: ``EDGEMESH_URL`` and ``EDGEMESH_API_KEY`` (the gateway's own
variable) fill in what the caller leaves out."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from edgemesh.errors import ConfigError

DEFAULT_URL = "http://127.0.0.1:8000"
"""Where `edgemesh serve` listens by default."""


@dataclass(frozen=True)
class ClientConfig:
    """Connection settings; ``repr`` never shows the API key."""

    base_url: str = DEFAULT_URL
    """The gateway's root (``http://host:port``); a trailing ``/v1`` is dropped."""
    api_key: str | None = field(default=None, repr=False)
    timeout_s: float = 600.0
    """Per request: long enough for a slow box's first token."""
    poll_s: float = 0.5
    """How often a waited-for job is polled."""

    def __post_init__(self) -> None:
        url = self.base_url.rstrip("/")
        url = url.removesuffix("/v1")
        if not url.startswith(("http://", "https://")):
            raise ConfigError(
                f"base_url '{self.base_url}' is not an http(s) URL",
                hint="e.g. http://127.0.0.1:8000 (the gateway's root)",
            )
        object.__setattr__(self, "base_url", url)
        if self.timeout_s <= 0 or self.poll_s <= 0:
            raise ConfigError("timeout_s and poll_s must be > 0 seconds")

    def __repr__(self) -> str:
        key = "None" if self.api_key is None else "'***'"
        return (
            f"ClientConfig(base_url={self.base_url!r}, api_key={key}, "
            f"timeout_s={self.timeout_s}, poll_s={self.poll_s})"
        )

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    @classmethod
    def resolve(
        cls,
        base_url: str | None = None,
        *,
        api_key: str | None = None,
        timeout_s: float = 600.0,
        poll_s: float = 0.5,
    ) -> ClientConfig:
        """The given values, else ``$EDGEMESH_URL`` / ``$EDGEMESH_API_KEY``, else defaults."""
        return cls(
            base_url=base_url or os.environ.get("EDGEMESH_URL") or DEFAULT_URL,
            api_key=api_key if api_key is not None else os.environ.get("EDGEMESH_API_KEY"),
            timeout_s=timeout_s,
            poll_s=poll_s,
        )
