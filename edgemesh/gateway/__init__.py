"""The OpenAI-compatible HTTP gateway, shared by the single box and the mesh."""

from edgemesh.gateway.app import create_app
from edgemesh.gateway.service import ModelService

__all__ = ["ModelService", "create_app"]
