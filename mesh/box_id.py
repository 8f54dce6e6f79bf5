"""A box's id in the mesh: unique per box without ``--box-id``, and stable.

The rule (``resolve_box_id``):

1. ``--box-id`` given: that id, for this run (nothing is written).
2. Else the id kept in the state folder's ``box_id`` file, so it never
   changes across restarts, even if the hostname or a MAC changes later.
3. Else a new one: ``<hostname>-<6 hex>`` from the machine id and the MAC
   of the box's primary interface (``edgemesh.fingerprint.default_box_id``).
   Boxes cloned from one SD-card image, and network namespaces on one host,
   share hostname and machine id; the MAC of their own interface tells
   them apart. With neither a machine id nor a MAC the suffix is random.
   The id is written to ``box_id`` before the box announces itself.

A real collision (two boxes announcing one id, e.g. the same ``--box-id``
twice, or a state folder copied along with a cloned card) is still refused
by discovery (``mesh.discovery``: mDNS probes the name first);
``collision_hint`` says which of the two it is likely to be.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgemesh.errors import ConfigError
from edgemesh.mesh.config import StatePaths, write_json

log = logging.getLogger(__name__)

EXPLICIT = "--box-id"
KEPT = "state folder"
DERIVED = "derived"
_VALID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,47}$")


@dataclass(frozen=True)
class BoxFacts:
    """What a default id is made of; kept beside it to recognise a copied folder."""

    hostname: str
    machine_id: str | None
    mac: str | None

    def digest(self) -> str:
        """12 hex chars over the machine id and MAC (the machine id stays private)."""
        return hashlib.sha256(f"{self.machine_id}/{self.mac}".encode()).hexdigest()[:12]


@dataclass(frozen=True)
class BoxIdentity:
    box_id: str
    source: str
    """``--box-id``, ``state folder`` (kept from an earlier run) or ``derived`` (new)."""
    path: Path
    """The state folder's ``box_id`` file (written unless the id is explicit)."""
    made_here: bool = True
    """False when the kept id was derived from another machine's facts (the
    state folder came along with a cloned image, or the NIC was replaced)."""


def check_box_id(box_id: str) -> str:
    """Box ids go into mDNS labels, Ray resource names and folder names."""
    if not _VALID.match(box_id):
        raise ConfigError(
            f"invalid box id '{box_id}'",
            hint="use 1-48 letters, digits, '.', '_' or '-', starting with a letter or digit",
        )
    return box_id


def live_facts() -> BoxFacts:
    from edgemesh.fingerprint import box_facts

    return BoxFacts(*box_facts())


def derive_box_id(facts: BoxFacts) -> str:
    from edgemesh.fingerprint import default_box_id

    box_id = default_box_id(facts.hostname, facts.machine_id, facts.mac)
    if not facts.machine_id and not facts.mac:
        box_id = f"{box_id}-{secrets.token_hex(3)}"  # nothing stable to hash: kept instead
    return box_id


def resolve_box_id(
    paths: StatePaths, explicit: str | None = None, facts: BoxFacts | None = None
) -> BoxIdentity:
    """This box's id by the rule in the module docstring; writes ``box_id`` when new."""
    path = paths.box_id
    if explicit:
        return BoxIdentity(check_box_id(explicit), EXPLICIT, path)
    facts = facts or live_facts()
    kept = _read(path)
    if kept is not None:
        made_here = kept.get("facts") in (None, facts.digest())
        if not made_here:
            log.warning(
                "the box id '%s' in %s was made on another machine (cloned image?); keeping it",
                kept["box_id"],
                path,
            )
        return BoxIdentity(kept["box_id"], KEPT, path, made_here)
    box_id = check_box_id(derive_box_id(facts))
    paths.ensure()
    write_json(path, {"box_id": box_id, "facts": facts.digest(), "created": time.time()})
    log.info("box id %s (new; kept in %s)", box_id, path)
    return BoxIdentity(box_id, DERIVED, path)


def _read(path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"cannot read the box id in {path}: {exc}", hint="delete it to derive a new id"
        ) from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("box_id"), str):
        raise ConfigError(f"{path} holds no box id", hint="delete it to derive a new id")
    check_box_id(doc["box_id"])
    return doc


def collision_hint(identity: BoxIdentity) -> str:
    """What to do when another box already announces ``identity.box_id``."""
    if identity.source == EXPLICIT:
        return "give each box its own --box-id, or drop --box-id to use the default"
    if not identity.made_here:
        return (
            f"this box's state folder was copied from another box (its id was made on "
            f"another machine): delete {identity.path} to derive a new id, or pass --box-id"
        )
    return f"delete {identity.path} on one of the two boxes to derive a new id, or pass --box-id"
