"""Which interface and IPv4 address a box uses for the mesh.

Default: the interface of the IPv4 default route, else the first
non-loopback interface that is up and has an IPv4 address (inside a network
namespace that is its veth), else loopback. ``--interface`` takes a name
(``eth0``) or one of the box's own addresses.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from edgemesh.errors import ConfigError


@dataclass(frozen=True)
class MeshInterface:
    name: str
    address: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "address": self.address}


def _ipv4_by_interface() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, addrs in psutil.net_if_addrs().items():
        v4 = [a.address for a in addrs if a.family == socket.AF_INET]
        if v4:
            out[name] = v4
    return out


def _default_route_interface(route_file: Path = Path("/proc/net/route")) -> str | None:
    try:
        lines = route_file.read_text().splitlines()[1:]
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        # Destination 00000000 with mask 00000000 is the default route.
        if len(fields) >= 8 and fields[1] == "00000000" and fields[7] == "00000000":
            return fields[0]
    return None


_NO_MAC = "00:00:00:00:00:00"


def primary_interface() -> str | None:
    """The name ``choose_interface()`` picks by default, without its loopback
    fallback: the box's own outward-facing interface (inside a network
    namespace, its veth), or None when it has none."""
    try:
        iface = choose_interface()
    except ConfigError:
        return None
    return None if ipaddress.IPv4Address(iface.address).is_loopback else iface.name


def mac_address(name: str | None) -> str | None:
    """The hardware address of interface ``name`` as this process's network
    namespace sees it (psutil asks the kernel, so a namespace sees its own
    veth, not the host's ``/sys``); None for loopback, all-zero or unknown."""
    if not name:
        return None
    for addr in psutil.net_if_addrs().get(name, []):
        if addr.family == psutil.AF_LINK and addr.address and addr.address != _NO_MAC:
            return addr.address.lower()
    return None


def choose_interface(wanted: str | None = None) -> MeshInterface:
    """The mesh interface for ``wanted`` (name or address), or the default."""
    addrs = _ipv4_by_interface()
    stats = psutil.net_if_stats()
    if wanted:
        if wanted in addrs:
            return MeshInterface(wanted, addrs[wanted][0])
        try:
            ipaddress.IPv4Address(wanted)
        except ValueError:
            raise ConfigError(
                f"no interface '{wanted}' with an IPv4 address",
                hint=f"choose one of: {', '.join(sorted(addrs)) or 'none'}",
            ) from None
        for name, v4 in addrs.items():
            if wanted in v4:
                return MeshInterface(name, wanted)
        raise ConfigError(f"no interface of this box has the address {wanted}")
    route = _default_route_interface()
    if route and route in addrs:
        return MeshInterface(route, addrs[route][0])
    for name in sorted(addrs):
        up = stats.get(name)
        if up and up.isup and not ipaddress.IPv4Address(addrs[name][0]).is_loopback:
            return MeshInterface(name, addrs[name][0])
    for name, v4 in addrs.items():
        if ipaddress.IPv4Address(v4[0]).is_loopback:
            return MeshInterface(name, v4[0])
    raise ConfigError("this box has no IPv4 interface", hint="pass --interface")
