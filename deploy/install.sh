#!/bin/sh
# One-line install of edgemesh on a Linux box:
#   curl -fsSL https://raw.githubusercontent.com/edgemesh/edgemesh/main/deploy/install.sh | sh
# or, from a checkout:  sh deploy/install.sh --source .
#
# It detects the box (CPU arch, Jetson, Rockchip NPU, Intel CPU), picks the extras that
# box can use, installs edgemesh into its own virtualenv and links the `edgemesh`
# command into a bin folder on PATH. --service also installs a systemd unit that keeps
# the box joined to its mesh. --dry-run prints the decisions and changes nothing.
set -eu

PREFIX="${EDGEMESH_PREFIX:-$HOME/.edgemesh}"
BIN_DIR="${EDGEMESH_BIN_DIR:-$HOME/.local/bin}"
SOURCE="${EDGEMESH_SOURCE:-edgemesh}"
# Where the box's hardware files are read; tests point this at a board snapshot.
SYSROOT="${EDGEMESH_SYSROOT:-}"
PYTHON="${PYTHON:-python3}"
EXTRAS=""
SERVICE=0
DRY_RUN=0

usage() {
    cat <<USAGE
usage: install.sh [--source PATH|SPEC] [--prefix DIR] [--bin-dir DIR] [--extras LIST]
                  [--service] [--dry-run]
  --source   what pip installs: a checkout folder, a wheel, or a package spec (default: edgemesh)
  --extras   comma list overriding the detected extras (e.g. "llamacpp,demo"; "none": core only)
  --service  install and start a systemd unit running 'edgemesh join' (root only)
USAGE
}

die() { echo "install.sh: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
    case "$1" in
        --source) SOURCE="$2"; shift 2 ;;
        --prefix) PREFIX="$2"; shift 2 ;;
        --bin-dir) BIN_DIR="$2"; shift 2 ;;
        --extras) EXTRAS="$2"; shift 2 ;;
        --service) SERVICE=1; shift ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown option '$1'" ;;
    esac
done

arch() {
    if [ -n "$SYSROOT" ] && [ -f "$SYSROOT/proc/cpuinfo" ]; then
        # A snapshot carries no uname: ARM cpuinfo lists "CPU implementer".
        if grep -q '^CPU implementer' "$SYSROOT/proc/cpuinfo"; then echo aarch64; else echo x86_64; fi
    else
        uname -m
    fi
}

detect_extras() {
    machine=$(arch)
    extras="llamacpp,demo,onnx,mesh"
    if [ -f "$SYSROOT/etc/nv_tegra_release" ]; then
        # JetPack ships TensorRT's Python bindings with the OS; the PyPI wheels are x86-only.
        echo "$extras"; return
    fi
    if [ "$machine" = "aarch64" ]; then
        if grep -qs rockchip "$SYSROOT/proc/device-tree/compatible" \
            && { [ -e "$SYSROOT/dev/rknpu" ] || [ -d "$SYSROOT/sys/kernel/debug/rknpu" ] \
                 || [ -d "$SYSROOT/proc/rknpu" ]; }; then
            extras="$extras,rknn"
        fi
        echo "$extras"; return
    fi
    if grep -qs 'GenuineIntel' "$SYSROOT/proc/cpuinfo"; then
        extras="$extras,openvino"
    fi
    if [ -d "$SYSROOT/proc/driver/nvidia" ]; then
        extras="$extras,tensorrt"
    fi
    echo "$extras"
}

[ -n "$EXTRAS" ] || EXTRAS=$(detect_extras)
spec="$SOURCE"
[ -n "$EXTRAS" ] && [ "$EXTRAS" != none ] && spec="$SOURCE[$EXTRAS]"
cmake_args="-DGGML_NATIVE=ON"
[ -f "$SYSROOT/etc/nv_tegra_release" ] && cmake_args="-DGGML_CUDA=on"

echo "arch:    $(arch)"
echo "extras:  $EXTRAS"
echo "install: $spec into $PREFIX/venv"
echo "command: $BIN_DIR/edgemesh"
[ "$SERVICE" = 1 ] && echo "service: /etc/systemd/system/edgemesh-join.service"
[ "$DRY_RUN" = 1 ] && exit 0

"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
    || die "edgemesh needs Python 3.10 or newer ($PYTHON is $("$PYTHON" -V 2>&1))"
command -v cmake >/dev/null 2>&1 || echo "note: llama.cpp compiles from source and needs cmake and a C++ compiler (apt install build-essential cmake)" >&2

mkdir -p "$PREFIX" "$BIN_DIR"
# Jetson's TensorRT lives in the system site-packages; the venv must see it.
venv_flags=""
[ -f "$SYSROOT/etc/nv_tegra_release" ] && venv_flags="--system-site-packages"
"$PYTHON" -m venv $venv_flags "$PREFIX/venv"
"$PREFIX/venv/bin/pip" install --upgrade pip >/dev/null
CMAKE_ARGS="${CMAKE_ARGS:-$cmake_args}" "$PREFIX/venv/bin/pip" install "$spec"
ln -sf "$PREFIX/venv/bin/edgemesh" "$BIN_DIR/edgemesh"
"$BIN_DIR/edgemesh" --help >/dev/null

if [ "$SERVICE" = 1 ]; then
    [ "$(id -u)" = 0 ] || die "--service needs root (it writes /etc/systemd/system)"
    state=/var/lib/edgemesh
    mkdir -p "$state"
    cat > /etc/systemd/system/edgemesh-join.service <<UNIT
# Keeps this box in its mesh across reboots (written by edgemesh's install.sh).
[Unit]
Description=edgemesh box (mDNS discovery + Ray node)
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
Environment=EDGEMESH_MESH=home
EnvironmentFile=-/etc/default/edgemesh
ExecStart=$BIN_DIR/edgemesh join --mesh \${EDGEMESH_MESH} --state-dir $state
Restart=on-failure
RestartSec=5
KillMode=control-group

[Install]
WantedBy=multi-user.target
UNIT
    systemctl daemon-reload
    systemctl enable --now edgemesh-join.service
    echo "edgemesh-join.service started; the mesh secret is $state/secret (copy it to the other boxes)"
fi

case ":$PATH:" in
    *":$BIN_DIR:"*) ;;
    *) echo "add $BIN_DIR to PATH:  export PATH=\"$BIN_DIR:\$PATH\"" ;;
esac
echo "installed. Try:  edgemesh info   or   edgemesh serve"
