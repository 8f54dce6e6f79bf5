"""Line-inspection demo, end to end, on any Linux host:

1. write synthetic conveyor frames (``frames.py``);
2. ``edgemesh import line_model:make --calibration frames/`` (fp32, fp16,
   int8 static QDQ, each measured against PyTorch);
3. ``edgemesh serve --model line/`` (the box's engine and precision);
4. ``client.py``: tritonclient posts every frame, prints latency percentiles.

    python examples/vision/run_demo.py [--frames 200] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from frames import write_frames  # noqa: E402

IMAGENET = ("0.485,0.456,0.406", "0.229,0.224,0.225")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=200)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="edgemesh-vision-"))
    calib = work / "calibration"
    frames = work / "frames"
    write_frames(calib, 32, seed=1)
    write_frames(frames, args.frames, seed=2)
    package = work / "line"
    env = {**os.environ, "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    edgemesh = [sys.executable, "-m", "edgemesh"]
    subprocess.run(
        [
            *edgemesh,
            "import",
            "line_model:make",
            "--out",
            str(package),
            "--calibration",
            str(calib),
            "--mean",
            IMAGENET[0],
            "--std",
            IMAGENET[1],
            "--force",
        ],
        check=True,
        env=env,
        cwd=HERE,
    )
    port = _free_port()
    server = subprocess.Popen(
        [
            *edgemesh,
            "serve",
            "--model",
            str(package),
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        env=env,
    )
    try:
        _wait(port, server)
        import client

        return client.main(
            [
                "--url",
                f"127.0.0.1:{port}",
                "--model",
                "line",
                "--frames",
                str(frames),
                "--package",
                str(package),
            ]
        )
    finally:
        server.terminate()
        server.wait(timeout=20)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(port: int, server: subprocess.Popen, timeout: float = 120) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"edgemesh serve exited with {server.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1):
                return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError("edgemesh serve did not become ready")


if __name__ == "__main__":
    main()
