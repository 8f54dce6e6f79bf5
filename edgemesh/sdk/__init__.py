"""The Python SDK: ``Client`` / ``AsyncClient`` for an edgemesh gateway (docs/SDK.md).

Imported lazily by ``edgemesh.Client``, so ``import edgemesh`` never loads
httpx or numpy.
"""

from edgemesh.sdk.client import AsyncClient, Client
from edgemesh.sdk.config import ClientConfig
from edgemesh.sdk.errors import (
    GatewayError,
    GatewayUnreachableError,
    JobFailedError,
    JobTimeoutError,
)
from edgemesh.sdk.types import Chunk, Completion, Job, Model, Status, Usage

__all__ = [
    "AsyncClient",
    "Chunk",
    "Client",
    "ClientConfig",
    "Completion",
    "GatewayError",
    "GatewayUnreachableError",
    "Job",
    "JobFailedError",
    "JobTimeoutError",
    "Model",
    "Status",
    "Usage",
]
