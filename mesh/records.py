"""The record each box announces over mDNS, and its HMAC.

A record is a flat str->str TXT map. ``sig`` is an HMAC-SHA256, keyed by a
key derived from the mesh secret, over every other key=value (sorted) and
the service type, so a box without the secret can neither forge a record
nor alter one in flight. The secret itself never leaves the box.

Keys are short because every TXT entry travels in each mDNS answer:

    v   protocol version        ev  edgemesh version     rv  Ray version
    m   mesh name               id  box id               r   role
    ip  box address             ray head's Ray address   ok  1 once Ray is up
    t0  start time (ms)         n   sequence number      fp  fingerprint digest
    fs  fingerprint summary (compact JSON)               sig HMAC (hex)
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass, field, replace
from typing import Any

from edgemesh.errors import DiscoveryError

SERVICE_TYPE = "_edgemesh._tcp.local."
PROTOCOL = "1"

CANDIDATE = "candidate"
HEAD = "head"
WORKER = "worker"
ROLES = (CANDIDATE, HEAD, WORKER)


class RecordRejected(DiscoveryError):
    """A record that is ignored; ``reason`` is one of signature, mesh,
    version, malformed."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"record rejected ({reason}): {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class BoxRecord:
    """What one box tells the others about itself."""

    mesh: str
    box_id: str
    role: str
    address: str
    started: float
    version: str
    ray_version: str
    ray_address: str = ""
    ready: bool = False
    seq: int = 0
    fp_digest: str = ""
    summary: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    @property
    def key(self) -> tuple[float, str]:
        """Election order: the earliest-started box wins, box id breaks ties."""
        return (self.started, self.box_id)

    @property
    def incarnation(self) -> tuple[str, float]:
        """One run of one box: a restarted box is a new incarnation."""
        return (self.box_id, self.started)

    def evolve(self, **changes: Any) -> BoxRecord:
        """A copy with ``changes`` and the next sequence number."""
        return replace(self, seq=self.seq + 1, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "mesh": self.mesh,
            "id": self.box_id,
            "role": self.role,
            "address": self.address,
            "ray_address": self.ray_address,
            "ready": self.ready,
            "started": self.started,
            "seq": self.seq,
            "version": self.version,
            "ray_version": self.ray_version,
            "fingerprint": {"digest": self.fp_digest, **self.summary},
        }


def compact_summary(summary: dict[str, Any]) -> str:
    """Fingerprint summary as compact JSON under the 255-byte TXT limit."""
    small = {
        "arch": summary.get("arch"),
        "cores": summary.get("cores_effective"),
        "mem": summary.get("memory_limit_bytes"),
        "board": summary.get("board"),
        "acc": summary.get("accelerators") or [],
        "be": summary.get("backends") or [],
        "prec": summary.get("precision"),
    }
    text = json.dumps(small, separators=(",", ":"))
    while len(text.encode()) > 250 and small["be"]:
        small["be"] = small["be"][:-1]  # backends are the least needed part
        text = json.dumps(small, separators=(",", ":"))
    if len(text.encode()) > 250:
        small["board"] = (small["board"] or "")[:40]
        text = json.dumps(small, separators=(",", ":"))
    return text


def _expand_summary(text: str) -> dict[str, Any]:
    small = json.loads(text) if text else {}
    return {
        "arch": small.get("arch"),
        "cores_effective": small.get("cores"),
        "memory_limit_bytes": small.get("mem"),
        "board": small.get("board"),
        "accelerators": small.get("acc") or [],
        "backends": small.get("be") or [],
        "precision": small.get("prec"),
    }


def _canonical(props: dict[str, str]) -> bytes:
    body = "\n".join(f"{k}={props[k]}" for k in sorted(props) if k != "sig")
    return f"{SERVICE_TYPE}\n{body}".encode()


def sign(props: dict[str, str], key: bytes) -> str:
    return hmac.new(key, _canonical(props), hashlib.sha256).hexdigest()


def verify(props: dict[str, str], key: bytes) -> bool:
    """Constant-time check of ``props["sig"]``."""
    given = props.get("sig", "")
    return hmac.compare_digest(given, sign(props, key))


def encode(record: BoxRecord, key: bytes) -> dict[str, str]:
    """The signed TXT properties of ``record``."""
    props = {
        "v": PROTOCOL,
        "ev": record.version,
        "rv": record.ray_version,
        "m": record.mesh,
        "id": record.box_id,
        "r": record.role,
        "ip": record.address,
        "ray": record.ray_address,
        "ok": "1" if record.ready else "0",
        "t0": str(round(record.started * 1000)),
        "n": str(record.seq),
        "fp": record.fp_digest,
        "fs": compact_summary(record.summary),
    }
    for k, v in props.items():
        if len(k) + 1 + len(v.encode()) > 255:
            raise DiscoveryError(f"TXT entry '{k}' is longer than 255 bytes")
    props["sig"] = sign(props, key)
    return props


def _text(raw: dict[Any, Any]) -> dict[str, str]:
    """zeroconf hands properties as bytes (values may be None)."""
    out: dict[str, str] = {}
    for k, v in raw.items():
        key = k.decode() if isinstance(k, bytes) else str(k)
        if v is None:
            val = ""
        elif isinstance(v, bytes):
            val = v.decode()
        else:
            val = str(v)
        out[key] = val
    return out


def compatible(version: str, ours: str) -> bool:
    """Boxes interoperate when their edgemesh major.minor match."""
    return version.split(".")[:2] == ours.split(".")[:2]


def parse(
    raw: dict[Any, Any], key: bytes, *, mesh: str, version: str, ray_version: str
) -> BoxRecord:
    """Verify and decode TXT properties; raises RecordRejected.

    A record naming another mesh is rejected before its signature is
    checked (the key is derived per mesh, so it could never verify; naming
    the mesh makes the log useful). Everything else must verify before any
    field, versions included, is read as more than a log message.
    """
    try:
        props = _text(raw)
    except UnicodeDecodeError as exc:
        raise RecordRejected("malformed", "TXT is not UTF-8") from exc
    if "sig" not in props:
        raise RecordRejected("malformed", "no signature")
    if props.get("m") and props["m"] != mesh:
        raise RecordRejected("mesh", f"box '{props.get('id', '?')}' is in mesh '{props['m']}'")
    if not verify(props, key):
        raise RecordRejected(
            "signature", f"box '{props.get('id', '?')}' did not sign with this mesh's secret"
        )
    if props.get("v") != PROTOCOL:
        raise RecordRejected("version", f"protocol {props.get('v')!r}, expected {PROTOCOL}")
    if not compatible(props.get("ev", ""), version):
        raise RecordRejected("version", f"edgemesh {props.get('ev')!r}, this box runs {version}")
    if props.get("rv") != ray_version:
        raise RecordRejected("version", f"Ray {props.get('rv')!r}, this box runs {ray_version}")
    try:
        role = props["r"]
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}")
        return BoxRecord(
            mesh=props["m"],
            box_id=props["id"],
            role=role,
            address=props["ip"],
            started=int(props["t0"]) / 1000,
            version=props["ev"],
            ray_version=props["rv"],
            ray_address=props.get("ray", ""),
            ready=props.get("ok") == "1",
            seq=int(props.get("n", "0")),
            fp_digest=props.get("fp", ""),
            summary=_expand_summary(props.get("fs", "")),
        )
    except (KeyError, ValueError, TypeError) as exc:
        raise RecordRejected("malformed", str(exc)) from exc
