"""How much one served model may take on: the serving limits, one object.

``ServingLimits`` is built once, from the CLI flags (``edgemesh serve``) or
from a deployment record (the mesh), and handed down: the engine reads its
admission and prefill knobs, the backends their thread count, context and
sequence slots (``BackendOptions.for_limits``), the gateway its default
``max_tokens``. Every other place takes its default from here, so a knob has
one default and one home.

The defaults are what ``edgemesh serve`` gives a user who passes no flags.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from edgemesh.errors import ConfigError

LIMITS_VERSION = 1
"""Version of the ``to_dict`` form (a deployment record carries it)."""


@dataclass(frozen=True)
class ServingLimits:
    """The serving knobs of one model; frozen (``replace`` makes a changed copy)."""

    context_length: int = 4096
    """Tokens per sequence (prompt plus generated), capped by the model's."""
    max_sequences: int = 8
    """Sequences decoded together; each holds a KV cache of ``context_length``."""
    max_queue: int = 32
    """Requests waiting for a slot; beyond it a request gets 429 (``OverloadedError``)."""
    prefill_chunk: int = 256
    """Prompt tokens one sequence feeds per step, so long prompts do not stall others."""
    prefill_budget: int = 128
    """Prompt tokens fed per step across all prefilling sequences (decode rows always
    go): new prompts cost the running streams at most this much per token."""
    threads: int | None = None
    """CPU threads per backend; None lets the runtime choose (all cores)."""
    default_max_tokens: int = 256
    """Tokens a chat request that names no ``max_tokens`` may generate (a base
    model may never stop)."""

    def __post_init__(self) -> None:
        for name in (
            "context_length",
            "max_sequences",
            "prefill_chunk",
            "prefill_budget",
            "default_max_tokens",
        ):
            _check_int(name, getattr(self, name), 1)
        _check_int("max_queue", self.max_queue, 0)
        if self.threads is not None:
            _check_int("threads", self.threads, 1)

    def replace(self, **changes: Any) -> ServingLimits:
        """A copy with ``changes`` applied (checked like a new object)."""
        return dataclasses.replace(self, **changes)

    def capped(
        self, *, context_length: int | None = None, max_sequences: int | None = None
    ) -> ServingLimits:
        """A copy that asks for no more than a model's context or a plan's
        sequence slots (None: no cap)."""
        changes: dict[str, int] = {}
        if context_length is not None:
            changes["context_length"] = min(self.context_length, context_length)
        if max_sequences is not None:
            changes["max_sequences"] = min(self.max_sequences, max_sequences)
        return self.replace(**changes) if changes else self

    def to_dict(self) -> dict[str, Any]:
        """The wire form (JSON-safe), with a version."""
        return {"version": LIMITS_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ServingLimits:
        """Read ``to_dict``'s form. A field missing takes its default (a record
        written before the field existed); an unknown field or version is a
        ``ConfigError``, so a newer writer's record is not half understood."""
        if not isinstance(data, dict):
            raise ConfigError(
                f"serving limits must be a JSON object, got {type(data).__name__}",
                hint="the deployment record's 'limits' field is damaged; deploy again",
            )
        body = dict(data)
        version = body.pop("version", LIMITS_VERSION)
        if version != LIMITS_VERSION:
            raise ConfigError(
                f"serving limits of version {version}; this edgemesh reads {LIMITS_VERSION}",
                hint="upgrade edgemesh on this box to the deploying box's version",
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(body) - known)
        if unknown:
            raise ConfigError(
                f"unknown serving limits {unknown}; known: {sorted(known)}",
                hint="upgrade edgemesh on this box to the deploying box's version",
            )
        return cls(**body)


def _check_int(name: str, value: Any, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ConfigError(
            f"{name} must be an integer >= {least}, got {value!r}",
            hint=f"give {name} a whole number of at least {least}",
        )


DEFAULT_LIMITS = ServingLimits()
"""The defaults, for the option types below the serving layer that carry a
limit of their own (``BackendOptions``, a mesh ``StageSpec``)."""
