#!/usr/bin/env bash
# The onnxruntime CUDA checks of edgemesh on an NVIDIA box with no network.
# Run from the repository root:
#
#   bash deploy/gpu/check_cuda.sh
#
# It expects onnxruntime-gpu unpacked (not pip-installed) in $ORT_SITE and the
# tiny test packages in $EDGEMESH_TEST_TINY_DIR (built elsewhere with
#   python -m tests.fixtures.tiny_models --out .gpucheck/tiny --arch llama
# so this box never exports a model). It installs edgemesh from this checkout
# without the index, prints what the box and onnxruntime see, writes the
# fingerprint, then runs the conformance suite's CUDA params. Everything goes
# to $OUT (log, info.json, junit.xml). Exit status: pytest's. Well under 4
# minutes on an H100. docs/BACKENDS.md ("Running the GPU checks") has more.
set -uo pipefail

PY="${PYTHON:-python3}"
OUT="${OUT:-$PWD/.gpucheck/out}"
ORT_SITE="${ORT_SITE:-/tmp/site}"
EM="${EDGEMESH_INSTALL_DIR:-/tmp/em}"
export EDGEMESH_TEST_TINY_DIR="${EDGEMESH_TEST_TINY_DIR:-$PWD/.gpucheck/tiny}"
mkdir -p "$OUT"

step() { printf '\n== %s\n' "$*"; }

install_edgemesh() {
    rm -rf "$EM"
    if "$PY" -m pip --version >/dev/null 2>&1 \
        && "$PY" -m pip install -q --no-deps --no-build-isolation --no-index --target "$EM" .; then
        echo "pip --target $EM: ok"
        return
    fi
    # No pip or no setuptools>=77 in this environment: lay the packages out as
    # pyproject's package-dir does (edgemesh/ plus mesh/, sharding/, ... under it).
    "$PY" - "$EM" <<'PYEOF'
import shutil, sys, tomllib
from pathlib import Path

setup = tomllib.loads(Path("pyproject.toml").read_text())["tool"]["setuptools"]
dest = Path(sys.argv[1])
skip = shutil.ignore_patterns("__pycache__")
for package, source in sorted(setup["package-dir"].items()):  # "edgemesh" first
    shutil.copytree(source, dest.joinpath(*package.split(".")), ignore=skip, dirs_exist_ok=True)
print(f"copied the package-dir layout into {dest}")
PYEOF
}

nvidia_lib_dirs() {
    # onnxruntime-gpu dlopens CUDA/cuDNN by soname; the pip nvidia-* wheels of this
    # Python keep them under site-packages/nvidia/*/lib, which no loader path names.
    "$PY" - <<'PYEOF'
import glob, os, site
roots = site.getsitepackages() + [site.getusersitepackages()]
dirs = sorted({d for r in roots for d in glob.glob(os.path.join(r, "nvidia", "*", "lib"))})
print(":".join(dirs))
PYEOF
}

main() {
    step "edgemesh from $PWD"
    git log -1 --oneline 2>/dev/null || true
    install_edgemesh || return 1

    local libs
    libs="$(nvidia_lib_dirs)"
    export LD_LIBRARY_PATH="${libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    export PYTHONPATH="$ORT_SITE:$EM${PYTHONPATH:+:$PYTHONPATH}"
    # The checkout's edgemesh/ lacks mesh/, backends/, ...: keep the cwd off sys.path
    # so the installed copy is the one imported (pytest then appends the rootdir).
    export PYTHONSAFEPATH=1
    echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
    echo "PYTHONPATH=$PYTHONPATH"
    echo "EDGEMESH_TEST_TINY_DIR=$EDGEMESH_TEST_TINY_DIR ($(du -sh "$EDGEMESH_TEST_TINY_DIR" 2>/dev/null | cut -f1))"

    step "GPUs"
    if command -v nvidia-smi >/dev/null; then nvidia-smi -L; else echo "nvidia-smi: not found"; fi

    step "onnxruntime"
    "$PY" - <<'PYEOF'
import sys
import onnxruntime as ort
import edgemesh.backends.onnxruntime as em_ort
from edgemesh.backends.onnxruntime import OnnxRuntimeBackend

print(sys.version.split()[0], "onnxruntime", ort.__version__, "from", ort.__file__)
print("providers:", ort.get_available_providers())
print("edgemesh backend from", em_ort.__file__)
print("device_unavailable('cuda'):", OnnxRuntimeBackend.device_unavailable("cuda"))
from onnxruntime.capi import build_and_package_info as build

print("built for CUDA:", getattr(build, "cuda_version", None))
if "CUDAExecutionProvider" in ort.get_available_providers():
    # A one-node session at warning level: a CUDA/cuDNN library that fails to load
    # shows up here by name, before the suite reports the provider missing.
    import numpy as np
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    graph = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "probe", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    so = ort.SessionOptions()
    so.log_severity_level = 2
    session = ort.InferenceSession(
        model.SerializeToString(), so, providers=["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    print("probe session providers:", session.get_providers())
    print("probe 2x:", session.run(None, {"x": np.array([1.5, 2.0], np.float32)})[0])
PYEOF

    step "fingerprint (full JSON in $OUT/info.json)"
    "$PY" -m edgemesh info --json >"$OUT/info.json"
    "$PY" - "$OUT/info.json" <<'PYEOF'
import json, sys
info = json.load(open(sys.argv[1]))
for acc in info.get("accelerators", []):
    print("accelerator:", acc)
print("backends:", info.get("backends"), "precision:", info.get("precision"))
if not any(a.get("kind") == "nvidia-gpu" for a in info.get("accelerators", [])):
    print("WARNING: the fingerprint lists no NVIDIA GPU")
PYEOF

    step "conformance suite, CUDA params"
    timeout 200 "$PY" -m pytest -q -p no:cacheprovider --import-mode=append \
        --junitxml="$OUT/junit.xml" tests/test_backend_conformance.py -k cuda -rs
}

main 2>&1 | tee "$OUT/check_cuda.log"
exit "${PIPESTATUS[0]}"
