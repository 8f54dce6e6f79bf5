"""The board's name: device tree on ARM boards, DMI (SMBIOS) on x86."""

from __future__ import annotations

from edgemesh.fingerprint.sysroot import Sysroot

# Firmware fills unused SMBIOS strings with these; they name nothing.
_DMI_PLACEHOLDERS = {
    "",
    "default string",
    "to be filled by o.e.m.",
    "system product name",
    "system manufacturer",
    "not applicable",
    "none",
    "o.e.m.",
    "oem",
    "unknown",
}


def _dmi(root: Sysroot, name: str) -> str | None:
    value = root.read_strip(f"/sys/class/dmi/id/{name}")
    if value is None or value.lower() in _DMI_PLACEHOLDERS:
        return None
    return " ".join(value.split())


def read_board(root: Sysroot, cpuinfo_extra: dict[str, str]) -> str | None:
    """``"Raspberry Pi 5 Model B Rev 1.0"``, ``"Intel(R) Client Systems
    NUC12WSHi7"``, or None when the box does not say."""
    for path in ("/proc/device-tree/model", "/sys/firmware/devicetree/base/model"):
        model = root.read_strip(path)
        if model:
            return model
    # Raspberry Pi kernels also print the model at the end of cpuinfo.
    if cpuinfo_extra.get("model"):
        return cpuinfo_extra["model"]
    product = _dmi(root, "product_name")
    vendor = _dmi(root, "sys_vendor")
    if product is None:
        product, vendor = _dmi(root, "board_name"), _dmi(root, "board_vendor")
    if product is None:
        return None
    if vendor and not product.lower().startswith(vendor.lower()):
        return f"{vendor} {product}"
    return product


def compatible(root: Sysroot) -> list[str]:
    """The device tree's ``compatible`` list, most specific first."""
    return root.read_nul_list("/proc/device-tree/compatible") or root.read_nul_list(
        "/sys/firmware/devicetree/base/compatible"
    )
