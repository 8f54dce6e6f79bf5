"""Accelerators, found from driver files only (no runtime is imported).

- NVIDIA discrete GPUs: ``/proc/driver/nvidia/gpus/<bus>/information``
  (``Model:``, ``Bus Location:``), driver from ``/proc/driver/nvidia/version``.
- Jetson: ``/etc/nv_tegra_release`` or a ``nvidia,tegra*`` device-tree
  compatible; the GPU shares system RAM.
- Rockchip NPU: an NPU SoC in the device-tree compatible, the rknpu driver's
  ``/sys/kernel/debug/rknpu/version``, ``/dev/rknpu`` or a DRM card driven
  by ``RKNPU``.
- PCI GPUs: ``/sys/class/drm/cardN/device/vendor`` (0x10de NVIDIA, 0x8086
  Intel, 0x1002 AMD) with ``device/uevent`` for the driver and bus slot.
"""

from __future__ import annotations

import re
import shutil
import subprocess

from edgemesh.fingerprint.model import Accelerator
from edgemesh.fingerprint.sysroot import Sysroot

_MIB = 1024 * 1024
_JETSON_SOCS = {
    "tegra234": "Orin (Ampere)",
    "tegra194": "Xavier (Volta)",
    "tegra186": "TX2 (Pascal)",
    "tegra210": "Nano/TX1 (Maxwell)",
}
# SoC -> INT8 TOPS of its NPU, from Rockchip's datasheets.
_ROCKCHIP_NPUS = {
    "rk3588": 6,
    "rk3588s": 6,
    "rk3576": 6,
    "rk3568": 1,
    "rk3566": 1,
    "rk3562": 1,
    "rv1106": 0.5,
    "rv1103": 0.5,
}


def _fields(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out[key.strip()] = value.strip()
    return out


def _uevent(text: str | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in (text or "").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out[key.strip()] = value.strip()
    return out


def _pci_slot(text: str) -> str:
    """``00000000:01:00.0`` (nvidia-smi) and ``0000:01:00.0`` (sysfs) -> the
    sysfs form, so the same GPU is not listed twice."""
    parts = text.strip().lower().split(":")
    if len(parts) == 3:
        try:
            return f"{int(parts[0], 16):04x}:{parts[1]}:{parts[2]}"
        except ValueError:
            pass
    return text.strip().lower()


def _nvidia_smi_memory() -> dict[str, int]:
    """bus slot -> bytes of GPU memory, from nvidia-smi on the live box.

    The driver's /proc files do not state memory; nvidia-smi does. A
    missing or failing nvidia-smi only leaves ``memory_bytes`` unknown.
    """
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return {}
    try:
        out = subprocess.run(
            [exe, "--query-gpu=pci.bus_id,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    memory: dict[str, int] = {}
    for line in out.splitlines():
        bus, _, mib = line.partition(",")
        if mib.strip().isdigit():
            memory[_pci_slot(bus)] = int(mib.strip()) * _MIB
    return memory


def _nvidia(root: Sysroot) -> list[Accelerator]:
    version = root.read("/proc/driver/nvidia/version") or ""
    match = re.search(r"Kernel Module\s+(?:for\s+\S+\s+)?([0-9][0-9.]+)", version)
    driver = f"nvidia {match.group(1)}" if match else None
    memory = _nvidia_smi_memory() if root.is_live else {}
    found = []
    for info_file in root.glob("/proc/driver/nvidia/gpus", "*/information"):
        text = root.read(root.relative(info_file)) or ""
        fields = _fields(text)
        bus = _pci_slot(fields.get("Bus Location", info_file.parent.name))
        name = fields.get("Model") or "NVIDIA GPU"
        found.append(Accelerator("nvidia-gpu", name, memory.get(bus), driver, bus))
    return found


def _jetson(root: Sysroot, compat: list[str]) -> list[Accelerator]:
    release = root.read("/etc/nv_tegra_release")
    socs = [c.split(",", 1)[1] for c in compat if c.startswith("nvidia,tegra")]
    if release is None and not socs:
        return []
    driver = None
    if release:
        # "# R36 (release), REVISION: 3.0, GCID: ..., BOARD: generic, ..."
        match = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([0-9.]+)", release)
        if match:
            driver = f"L4T R{match.group(1)}.{match.group(2)}"
    soc = socs[0] if socs else None
    label = _JETSON_SOCS.get(soc or "", "Tegra")
    name = f"NVIDIA Jetson {label} GPU" + (f", {soc}" if soc else "")
    return [Accelerator("jetson-gpu", name, None, driver, soc)]


def _rockchip(root: Sysroot, compat: list[str], drm_drivers: set[str]) -> list[Accelerator]:
    socs = [c.split(",", 1)[1] for c in compat if c.startswith("rockchip,")]
    soc = next((s for s in socs if s in _ROCKCHIP_NPUS), None)
    version = root.read_strip("/sys/kernel/debug/rknpu/version")
    has_driver = (
        version is not None
        or root.exists("/dev/rknpu")
        or "rknpu" in drm_drivers
        or any(root.glob("/sys/class/devfreq", "*.npu"))
    )
    if soc is None and not has_driver:
        return []
    name = f"{soc.upper()} NPU ({_ROCKCHIP_NPUS[soc]:g} TOPS INT8)" if soc else "Rockchip NPU"
    driver = None
    if version:
        # "RKNPU driver: v0.9.6"
        driver = "rknpu " + version.split(":", 1)[-1].strip()
    elif has_driver:
        driver = "rknpu"
    return [Accelerator("rockchip-npu", name, None, driver, soc)]


def _drm_cards(root: Sysroot) -> list[tuple[str, dict[str, str], str]]:
    """(vendor id, uevent fields, card folder on the box) per DRM card."""
    cards = []
    for card in root.glob("/sys/class/drm", "card*"):
        if not re.fullmatch(r"card\d+", card.name):
            continue  # connectors (card0-HDMI-A-1) repeat their card
        where = root.relative(card)
        vendor = (root.read_strip(f"{where}/device/vendor") or "").lower()
        cards.append((vendor, _uevent(root.read(f"{where}/device/uevent")), where))
    return cards


def _pci_gpu(root: Sysroot, vendor: str, uevent: dict[str, str], where: str) -> Accelerator:
    pci_id = uevent.get("PCI_ID", "").lower() or vendor.removeprefix("0x")
    bus = uevent.get("PCI_SLOT_NAME")
    driver = uevent.get("DRIVER")
    if vendor == "0x1002":
        product = root.read_strip(f"{where}/device/product_name")
        vram = root.read_strip(f"{where}/device/mem_info_vram_total")
        memory = int(vram) if vram and vram.isdigit() else None
        return Accelerator("amd-gpu", product or f"AMD GPU [{pci_id}]", memory, driver, bus)
    if vendor == "0x8086":
        # Integrated: it shares system RAM, so no memory of its own.
        return Accelerator("intel-gpu", f"Intel GPU [{pci_id}]", None, driver, bus)
    return Accelerator("nvidia-gpu", f"NVIDIA GPU [{pci_id}]", None, driver, bus)


def read_accelerators(root: Sysroot, compat: list[str]) -> list[Accelerator]:
    """Every accelerator the box's files show, NVIDIA first."""
    found = _nvidia(root)
    known_buses = {a.bus for a in found}
    cards = _drm_cards(root)
    drm_drivers = {uevent.get("DRIVER", "").lower() for _, uevent, _ in cards}
    found += _jetson(root, compat)
    found += _rockchip(root, compat, drm_drivers)
    for vendor, uevent, where in cards:
        if vendor not in ("0x10de", "0x8086", "0x1002"):
            continue  # BMC VGA (ASPEED), SoC display engines
        if vendor == "0x10de" and _pci_slot(uevent.get("PCI_SLOT_NAME", "")) in known_buses:
            continue  # already listed from the NVIDIA driver's own files
        found.append(_pci_gpu(root, vendor, uevent, where))
    return found
