"""mDNS announce and browse of ``_edgemesh._tcp.local.`` (python-zeroconf).

Each box registers one service instance ``<box id>@<mesh>`` whose TXT
record is a signed ``BoxRecord`` (see ``edgemesh.mesh.records``) and browses
for the others. Records that fail the HMAC, name another mesh or run an
incompatible version are ignored and logged (once per box and reason).
zeroconf is pinned to the mesh interface's address: outside namespaces it
would otherwise answer on every interface of the host.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from edgemesh.errors import ConfigError, DiscoveryError, MissingExtraError
from edgemesh.mesh.records import SERVICE_TYPE, BoxRecord, RecordRejected, encode, parse

log = logging.getLogger(__name__)

# Short TTLs so a box that vanished without a goodbye leaves every cache
# within a minute even if nothing else notices.
_HOST_TTL = 30
_OTHER_TTL = 60


def _zeroconf() -> Any:
    try:
        import zeroconf
    except ImportError as exc:
        raise MissingExtraError("zeroconf", "mesh") from exc
    return zeroconf


def instance_name(box_id: str, mesh: str) -> str:
    """``<box id>@<mesh>``, shortened with a hash to fit a 63-byte DNS label."""
    label = f"{box_id}@{mesh}"
    if len(label.encode()) > 63:
        tag = hashlib.sha256(label.encode()).hexdigest()[:8]
        label = f"{box_id[: 62 - len(mesh) - 10]}-{tag}@{mesh}"
    return f"{label}.{SERVICE_TYPE}"


@dataclass(frozen=True)
class Rejection:
    """A record this box ignores, for logs and ``edgemesh status``."""

    name: str
    reason: str
    detail: str
    address: str
    at: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "reason": self.reason,
            "detail": self.detail,
            "address": self.address,
            "at": self.at,
        }


class Discovery:
    """Announce one box and report the verified records of the others.

    ``on_record(record)`` runs for every verified record (this box's own
    included) when it appears or changes; ``on_remove(box_id)`` when a box
    says goodbye or its record expires. Both run on a resolver thread.
    """

    def __init__(
        self,
        *,
        mesh: str,
        key: bytes,
        address: str,
        version: str,
        ray_version: str,
        on_record: Callable[[BoxRecord], None],
        on_remove: Callable[[str], None],
        collision_hint: str = "give this box its own --box-id",
    ) -> None:
        self.mesh = mesh
        self._collision_hint = collision_hint
        self.address = address
        self._key = key
        self._versions = (version, ray_version)
        self._on_record = on_record
        self._on_remove = on_remove
        self._zc: Any = None
        self._browser: Any = None
        self._info: Any = None
        self._names: dict[str, str] = {}  # instance name -> box id
        self._rejected: dict[str, Rejection] = {}
        self._lock = threading.Lock()
        self._todo: queue.Queue[tuple[str, str] | None] = queue.Queue()
        self._resolver = threading.Thread(
            target=self._resolve_loop, name="mdns-resolve", daemon=True
        )

    # -- lifecycle -------------------------------------------------------

    def start(self, record: BoxRecord) -> None:
        """Register ``record`` (probing for a name clash) and start browsing."""
        zc_mod = _zeroconf()
        try:
            self._zc = zc_mod.Zeroconf(interfaces=[self.address])
        except OSError as exc:
            raise DiscoveryError(
                f"cannot open mDNS on {self.address}: {exc}",
                hint="check --interface and that UDP 5353 multicast is allowed",
            ) from exc
        self._info = self._service_info(record)
        try:
            self._zc.register_service(self._info)
        except zc_mod.NonUniqueNameException as exc:
            self.close()
            raise ConfigError(
                f"another box already announces the id '{record.box_id}' in mesh '{self.mesh}'",
                hint=self._collision_hint,
            ) from exc
        except Exception as exc:
            self.close()
            raise DiscoveryError(f"mDNS registration failed: {exc}") from exc
        self._resolver.start()
        self._browser = zc_mod.ServiceBrowser(self._zc, SERVICE_TYPE, handlers=[self._on_change])

    def announce(self, record: BoxRecord) -> None:
        """Send the updated record (role, readiness, head address)."""
        if self._zc is None:
            return
        self._info = self._service_info(record)
        try:
            self._zc.update_service(self._info)
        except Exception as exc:
            raise DiscoveryError(f"mDNS update failed: {exc}") from exc

    def close(self) -> None:
        """Say goodbye (TTL-0 records, so peers drop this box at once) and stop."""
        zc, self._zc = self._zc, None
        if zc is None:
            return
        self._todo.put(None)
        try:
            if self._browser is not None:
                self._browser.cancel()
            if self._info is not None:
                zc.unregister_service(self._info)
        except Exception:
            log.exception("mDNS goodbye failed")
        finally:
            zc.close()

    def rejected(self) -> list[Rejection]:
        with self._lock:
            return list(self._rejected.values())

    # -- internals -------------------------------------------------------

    def _service_info(self, record: BoxRecord) -> Any:
        zc_mod = _zeroconf()
        name = instance_name(record.box_id, self.mesh)
        host = hashlib.sha256(name.encode()).hexdigest()[:12]
        port = int(record.ray_address.rsplit(":", 1)[1]) if ":" in record.ray_address else 0
        return zc_mod.ServiceInfo(
            SERVICE_TYPE,
            name,
            port=port,
            properties=encode(record, self._key),
            server=f"em-{host}.local.",
            host_ttl=_HOST_TTL,
            other_ttl=_OTHER_TTL,
            parsed_addresses=[record.address],
        )

    def _on_change(self, zeroconf: Any, service_type: str, name: str, state_change: Any) -> None:
        # Runs on zeroconf's thread: hand off, never block it.
        self._todo.put((state_change.name, name))

    def _resolve_loop(self) -> None:
        while True:
            item = self._todo.get()
            if item is None:
                return
            change, name = item
            try:
                if change == "Removed":
                    self._removed(name)
                else:
                    self._resolve(name)
            except Exception:
                log.exception("handling mDNS change for %s failed", name)

    def _removed(self, name: str) -> None:
        with self._lock:
            box_id = self._names.pop(name, None)
            self._rejected.pop(name, None)
        if box_id is not None:
            self._on_remove(box_id)

    def _resolve(self, name: str) -> None:
        zc = self._zc
        if zc is None:
            return
        info = zc.get_service_info(SERVICE_TYPE, name, timeout=2000)
        if info is None or not info.properties:
            return
        try:
            record = parse(
                info.properties,
                self._key,
                mesh=self.mesh,
                version=self._versions[0],
                ray_version=self._versions[1],
            )
        except RecordRejected as exc:
            self._reject(name, exc, info)
            return
        with self._lock:
            self._names[name] = record.box_id
            self._rejected.pop(name, None)
        self._on_record(record)

    def _reject(self, name: str, exc: RecordRejected, info: Any) -> None:
        addrs = info.parsed_addresses() if hasattr(info, "parsed_addresses") else []
        with self._lock:
            known = self._rejected.get(name)
            self._rejected[name] = Rejection(
                name, exc.reason, exc.detail, addrs[0] if addrs else "", time.time()
            )
        if known is None or known.reason != exc.reason:
            log.warning("ignoring mDNS record %s from %s: %s", name, addrs, exc)


def browse_once(
    *,
    mesh: str,
    key: bytes,
    address: str,
    version: str,
    ray_version: str,
    seconds: float = 3.0,
) -> tuple[list[BoxRecord], list[Rejection]]:
    """Listen for ``seconds`` without announcing; verified records and rejections."""
    zc_mod = _zeroconf()
    found: dict[str, BoxRecord] = {}
    lock = threading.Lock()

    def keep(record: BoxRecord) -> None:
        with lock:
            old = found.get(record.box_id)
            if old is None or record.seq >= old.seq:
                found[record.box_id] = record

    def drop(box_id: str) -> None:
        found.pop(box_id, None)

    disc = Discovery(
        mesh=mesh,
        key=key,
        address=address,
        version=version,
        ray_version=ray_version,
        on_record=keep,
        on_remove=drop,
    )
    try:
        disc._zc = zc_mod.Zeroconf(interfaces=[address])
    except OSError as exc:
        raise DiscoveryError(f"cannot open mDNS on {address}: {exc}") from exc
    disc._resolver.start()
    disc._browser = zc_mod.ServiceBrowser(disc._zc, SERVICE_TYPE, handlers=[disc._on_change])
    try:
        time.sleep(seconds)
    finally:
        disc.close()
    with lock:
        return sorted(found.values(), key=lambda r: r.box_id), disc.rejected()
