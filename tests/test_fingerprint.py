"""The fingerprint read from snapshots of real boards' /proc and /sys.

Each folder under tests/data/sysroots holds the files one kind of box
exposes, written in the kernel's and drivers' own formats.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgemesh.backends import registry
from edgemesh.backends.base import BoxFacts
from edgemesh.errors import ConfigError, FingerprintError
from edgemesh.fingerprint import Accelerator, Fingerprint, collect, default_box_id
from edgemesh.fingerprint.cpu import parse_cpu_list
from edgemesh.fingerprint.policy import default_precision

SYSROOTS = Path(__file__).parent / "data" / "sysroots"
GIB = 1024**3
KIB = 1024

# What each snapshot must fingerprint as: the fields the planner relies on.
EXPECTED: dict[str, dict] = {
    "rpi5": {
        "id": "pi5-kitchen-5a4d18",
        "arch": "aarch64",
        "cpu_model": "ARM Cortex-A76",
        "cores_online": 4,
        "cores_effective": 4.0,
        "limit_bytes": 8245360 * KIB,
        "board": "Raspberry Pi 5 Model B Rev 1.0",
        "accelerators": [],
        "backends": ["llamacpp", "onnxruntime"],
        "precision": "int4",
        "cgroup": "v2",
        "features": {"asimd", "asimddp", "fphp"},
    },
    "jetson-agx-orin": {
        "id": "orin-agx-01-c92e60",
        "arch": "aarch64",
        "cpu_model": "ARM Cortex-A78AE",
        "cores_online": 12,
        "cores_effective": 12.0,
        "limit_bytes": 64335836 * KIB,
        "board": "NVIDIA Jetson AGX Orin Developer Kit",
        "accelerators": [("jetson-gpu", "NVIDIA Jetson Orin (Ampere) GPU, tegra234")],
        "backends": ["tensorrt", "llamacpp", "onnxruntime"],
        "precision": "fp16",
        "cgroup": "v2",
        "features": {"asimd", "asimddp", "paca"},
    },
    "rock5b-rk3588": {
        "id": "rock-5b-c6493d",
        "arch": "aarch64",
        "cpu_model": "ARM Cortex-A55 x4 + Cortex-A76 x4",
        "cores_online": 8,
        "cores_effective": 8.0,
        "limit_bytes": 16101008 * KIB,
        "board": "Radxa ROCK 5 Model B",
        "accelerators": [("rockchip-npu", "RK3588 NPU (6 TOPS INT8)")],
        "backends": ["rknn", "llamacpp", "onnxruntime"],
        "precision": "int8",
        "cgroup": None,
        "features": {"asimd", "asimddp"},
    },
    "nuc12-i7": {
        "id": "nuc-office-a92c51",
        "arch": "x86_64",
        "cpu_model": "12th Gen Intel(R) Core(TM) i7-1260P",
        "cores_online": 16,
        "cores_effective": 16.0,
        "limit_bytes": 32567644 * KIB,
        "board": "Intel(R) Client Systems NUC12WSHi7",
        "accelerators": [("intel-gpu", "Intel GPU [8086:46a6]")],
        "backends": ["openvino", "onnxruntime"],
        "precision": "int8",
        "cgroup": "v2",
        "features": {"avx2", "avx_vnni", "fma"},
    },
    "server-epyc-a10": {
        "id": "gpu-node-3-2ae101",
        "arch": "x86_64",
        "cpu_model": "AMD EPYC 7313 16-Core Processor",
        "cores_online": 32,
        "cores_effective": 32.0,
        "limit_bytes": 131899412 * KIB,
        "board": "Supermicro AS -2014CS-TR",
        "accelerators": [("nvidia-gpu", "NVIDIA A10")],
        "backends": ["tensorrt", "onnxruntime"],
        "precision": "fp16",
        "cgroup": "v2",
        "features": {"avx2", "sha_ni"},
    },
    "container-cgroup-v1": {
        "id": "3f5c2a1b9d7e",
        "arch": "x86_64",
        "cpu_model": "Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz",
        "cores_online": 16,
        "cores_effective": 1.5,
        "limit_bytes": 2 * GIB,
        "board": None,
        "accelerators": [],
        "backends": ["openvino", "onnxruntime"],
        "precision": "int4",
        "cgroup": "v1",
        "features": {"avx512f", "avx512_vnni"},
    },
    "container-cgroup-v2": {
        "id": "llm-worker-7d9f8c6b5-x2k4q",
        "arch": "x86_64",
        "cpu_model": "AMD EPYC 9354 32-Core Processor",
        "cores_online": 64,
        "cores_effective": 0.5,
        "limit_bytes": 12 * GIB,
        "board": None,
        "accelerators": [],
        "backends": ["onnxruntime"],
        "precision": "int8",
        "cgroup": "v2",
        "features": {"avx512f", "avx512_vnni", "avx512_bf16"},
    },
}


def snapshot(tmp_path: Path, name: str) -> Path:
    """A writable copy of a snapshot, for tests that remove a file."""
    dest = tmp_path / name
    shutil.copytree(SYSROOTS / name, dest)
    return dest


def test_every_snapshot_has_an_expectation() -> None:
    assert sorted(p.name for p in SYSROOTS.iterdir()) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_snapshot_fingerprints_as_expected(name: str) -> None:
    want = EXPECTED[name]
    d = collect(SYSROOTS / name).to_dict()
    assert d["id"] == want["id"]
    assert d["arch"] == want["arch"]
    assert d["cpu"]["model"] == want["cpu_model"]
    assert d["cpu"]["cores_online"] == want["cores_online"]
    assert d["cpu"]["cores_effective"] == want["cores_effective"]
    assert want["features"] <= set(d["cpu"]["features"])
    assert d["memory"]["limit_bytes"] == want["limit_bytes"]
    assert (
        d["memory"]["available_bytes"] <= d["memory"]["limit_bytes"] <= d["memory"]["total_bytes"]
    )
    assert d["board"] == want["board"]
    assert [(a["kind"], a["name"]) for a in d["accelerators"]] == want["accelerators"]
    assert d["backends"] == want["backends"]
    assert d["precision"] == want["precision"]
    assert d["cgroup"]["version"] == want["cgroup"]
    assert "profile" not in d and "measure" not in d


def test_x86_flags_and_arm_features_are_kernel_names() -> None:
    nuc = collect(SYSROOTS / "nuc12-i7").cpu.features
    pi = collect(SYSROOTS / "rpi5").cpu.features
    assert "avx512f" not in nuc  # Alder Lake has AVX-VNNI but no AVX-512
    assert "avx2" not in pi and "asimd" not in nuc
    assert list(nuc) == sorted(set(nuc)) and all(f == f.lower() for f in nuc)


def test_container_limits_cap_memory_and_available() -> None:
    v1 = collect(SYSROOTS / "container-cgroup-v1")
    # limit 2 GiB minus 300 MiB used by the container, not the host's free RAM.
    assert v1.memory.available_bytes == 2 * GIB - 314572800
    assert v1.memory.total_bytes == 65842380 * KIB
    assert v1.cgroup.cpu_quota_cores == 1.5 and v1.cgroup.cpuset_cores == 16
    v2 = collect(SYSROOTS / "container-cgroup-v2")
    # The pod slice's 12 GiB binds the container whose own memory.max is "max".
    assert v2.cgroup.memory_limit_bytes == 12 * GIB
    assert v2.memory.available_bytes == 11 * GIB


def test_nvidia_gpu_is_listed_once_with_its_bus_and_driver() -> None:
    accs = collect(SYSROOTS / "server-epyc-a10").accelerators
    assert accs == [
        Accelerator("nvidia-gpu", "NVIDIA A10", None, "nvidia 550.54.15", "0000:01:00.0")
    ]


def test_drivers_of_jetson_npu_and_igpu() -> None:
    assert collect(SYSROOTS / "jetson-agx-orin").accelerators[0].driver == "L4T R36.3.0"
    assert collect(SYSROOTS / "rock5b-rk3588").accelerators[0].driver == "rknpu v0.9.6"
    igpu = collect(SYSROOTS / "nuc12-i7").accelerators[0]
    assert (igpu.driver, igpu.bus, igpu.memory_bytes) == ("i915", "0000:00:02.0", None)


def test_nvidia_gpu_without_proprietary_driver_comes_from_drm(tmp_path: Path) -> None:
    root = snapshot(tmp_path, "server-epyc-a10")
    shutil.rmtree(root / "proc/driver/nvidia")
    (root / "sys/class/drm/card1/device/uevent").write_text(
        "DRIVER=nouveau\nPCI_ID=10DE:2236\nPCI_SLOT_NAME=0000:01:00.0\n"
    )
    fp = collect(root)
    assert [(a.kind, a.name, a.driver) for a in fp.accelerators] == [
        ("nvidia-gpu", "NVIDIA GPU [10de:2236]", "nouveau")
    ]
    assert fp.backends == ["tensorrt", "onnxruntime"]


def test_amd_gpu_reports_its_vram(tmp_path: Path) -> None:
    root = snapshot(tmp_path, "server-epyc-a10")
    shutil.rmtree(root / "proc/driver/nvidia")
    device = root / "sys/class/drm/card1/device"
    (device / "vendor").write_text("0x1002\n")
    (device / "uevent").write_text("DRIVER=amdgpu\nPCI_ID=1002:744C\nPCI_SLOT_NAME=0000:03:00.0\n")
    (device / "mem_info_vram_total").write_text(f"{24 * GIB}\n")
    fp = collect(root)
    assert [(a.kind, a.memory_bytes) for a in fp.accelerators] == [("amd-gpu", 24 * GIB)]
    assert fp.backends == ["onnxruntime"] and fp.precision == "int4"  # no vnni on Zen 3


def test_rockchip_npu_found_from_drm_driver_alone(tmp_path: Path) -> None:
    root = snapshot(tmp_path, "rock5b-rk3588")
    shutil.rmtree(root / "sys/kernel/debug")  # debugfs is root-only
    (root / "proc/device-tree/compatible").write_bytes(b"radxa,rock-5b\x00")
    npu = collect(root).accelerators
    assert [(a.kind, a.name, a.driver) for a in npu] == [("rockchip-npu", "Rockchip NPU", "rknpu")]


def test_arch_comes_from_the_snapshot_not_this_machine(tmp_path: Path) -> None:
    root = snapshot(tmp_path, "jetson-agx-orin")
    (root / "proc/sys/kernel/arch").unlink()
    assert collect(root).arch == "aarch64"  # from the Features/CPU architecture lines
    (root / "proc/sys/kernel/arch").write_text("riscv64\n")
    assert collect(root).arch == "riscv64"  # the kernel's own word wins


def test_board_falls_back_to_the_pi_cpuinfo_model_line(tmp_path: Path) -> None:
    root = snapshot(tmp_path, "rpi5")
    (root / "proc/device-tree/model").unlink()
    assert collect(root).board == "Raspberry Pi 5 Model B Rev 1.0"


def test_cores_fall_back_to_cpuinfo_when_online_is_missing(tmp_path: Path) -> None:
    root = snapshot(tmp_path, "rock5b-rk3588")
    (root / "sys/devices/system/cpu/online").unlink()
    assert collect(root).cpu.cores_online == 8


def test_unlimited_cgroup_values_are_not_limits(tmp_path: Path) -> None:
    root = snapshot(tmp_path, "container-cgroup-v1")
    (root / "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us").write_text("-1\n")
    (root / "sys/fs/cgroup/memory/memory.limit_in_bytes").write_text("9223372036854771712\n")
    fp = collect(root)
    assert fp.cgroup.cpu_quota_cores is None and fp.cgroup.memory_limit_bytes is None
    assert fp.cpu.cores_effective == 16.0
    assert fp.memory.limit_bytes == fp.memory.total_bytes


def test_cpuset_caps_effective_cores(tmp_path: Path) -> None:
    root = snapshot(tmp_path, "container-cgroup-v1")
    (root / "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us").write_text("-1\n")
    (root / "sys/fs/cgroup/cpuset/cpuset.effective_cpus").write_text("2-4,9\n")
    assert collect(root).cpu.cores_effective == 4.0


def test_missing_files_raise_fingerprint_errors(tmp_path: Path) -> None:
    with pytest.raises(FingerprintError, match="not a folder"):
        collect(tmp_path / "nope")
    with pytest.raises(FingerprintError, match="cpuinfo"):
        collect(tmp_path)
    root = snapshot(tmp_path, "rpi5")
    (root / "proc/meminfo").unlink()
    with pytest.raises(FingerprintError, match="meminfo"):
        collect(root)


def test_measure_refuses_a_snapshot() -> None:
    with pytest.raises(ConfigError, match="snapshot"):
        collect(SYSROOTS / "rpi5", measure=True)


def test_box_id_override_and_default() -> None:
    assert collect(SYSROOTS / "rpi5", box_id="shelf-2").id == "shelf-2"
    assert default_box_id("My_Host.local", None) == "my-host-local"
    assert default_box_id("pi", "abc") != default_box_id("pi", "abd")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_json_round_trip(name: str) -> None:
    fp = collect(SYSROOTS / name)
    again = Fingerprint.from_dict(fp.to_dict())
    assert again.to_dict() == fp.to_dict()
    assert again.digest() == fp.digest()


def test_digest_tracks_hardware_only() -> None:
    digests = {collect(SYSROOTS / name).digest() for name in EXPECTED}
    assert len(digests) == len(EXPECTED)
    fp = collect(SYSROOTS / "rpi5")
    d = fp.to_dict()
    d["hostname"], d["id"] = "renamed", "renamed-000000"
    d["memory"]["available_bytes"] = 1
    assert Fingerprint.from_dict(d).digest() == fp.digest()
    d["memory"]["limit_bytes"] = 4 * GIB
    assert Fingerprint.from_dict(d).digest() != fp.digest()


def test_summary_and_profile_without_measurement() -> None:
    fp = collect(SYSROOTS / "jetson-agx-orin")
    assert fp.summary() == {
        "arch": "aarch64",
        "cores_effective": 12.0,
        "memory_limit_bytes": 64335836 * KIB,
        "board": "NVIDIA Jetson AGX Orin Developer Kit",
        "accelerators": ["jetson-gpu"],
        "backends": ["tensorrt", "llamacpp", "onnxruntime"],
        "precision": "fp16",
    }
    profile = fp.profile()
    assert profile["compute"] == {} and profile["link_gbps"] is None
    assert profile["backends"] == fp.installed


def test_installed_is_the_importable_subset_in_order() -> None:
    fp = collect(SYSROOTS / "jetson-agx-orin")
    want = [b for b in fp.backends if importlib.util.find_spec(registry.get(b).module) is not None]
    assert fp.installed == want
    assert "tensorrt" not in fp.installed or importlib.util.find_spec("tensorrt")


@pytest.mark.parametrize(
    ("kinds", "features", "memory_gib", "want"),
    [
        (["nvidia-gpu"], (), 64, "fp16"),
        (["jetson-gpu"], ("asimddp",), 3, "int4"),  # memory-poor beats the GPU
        (["rockchip-npu"], ("asimddp",), 4, "int8"),
        (["intel-gpu"], ("avx2",), 32, "int4"),  # iGPU does not change the rule
        ([], ("avx2", "avx_vnni"), 8, "int8"),
        ([], ("avx2", "avx_vnni"), 7.9, "int4"),
        ([], ("asimd", "i8mm"), 16, "int8"),
        ([], ("avx2",), 64, "int4"),  # no int8 dot product
    ],
)
def test_precision_rule(kinds: list[str], features: tuple, memory_gib: float, want: str) -> None:
    box = BoxFacts("x86_64", None, features, tuple(kinds), int(memory_gib * GIB))
    assert default_precision(box) == want


def test_cpu_list_parsing() -> None:
    assert parse_cpu_list("0-3,6,8-9\n") == [0, 1, 2, 3, 6, 8, 9]
    assert parse_cpu_list("0") == [0]
    with pytest.raises(FingerprintError):
        parse_cpu_list("0-x")


def test_importing_the_fingerprint_imports_no_runtime() -> None:
    code = (
        "import sys, edgemesh.fingerprint, edgemesh.fingerprint.measure, edgemesh.cli.info;"
        "heavy = {'onnxruntime', 'openvino', 'onnx', 'torch', 'llama_cpp', 'tensorrt', 'ray'};"
        "print(sorted(heavy & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
