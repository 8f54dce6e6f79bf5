"""Emulate the Pi + Jetson demo on one Linux machine, then tear it all down.

Two network-namespace boxes on a private bridge, each in a cgroup:
"pi" (1 CPU core, 3 GiB) and "jetson" (2 cores, 6 GiB). Each runs
`edgemesh join`; `edgemesh plan` splits the default model over the two
boxes' profiles (their limits, with this host's measured compute figures
scaled to each box's CPU share), `edgemesh deploy --plan` places it, one
chat is streamed through the mesh gateway, and the plan and where each stage
ran are printed.

    sudo python examples/pi_jetson/lab.py [--prompt TEXT] [--max-tokens N]
                                          [--model PACKAGE] [--split]

Needs root, iproute2, and edgemesh with the mesh and onnx extras
(`pip install "edgemesh[mesh,onnx]"`). Takes a few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

GiB = 1 << 30
BOXES = {"pi": (1.0, 3 * GiB), "jetson": (2.0, 6 * GiB)}
PORT = 8000
BACKENDS = ("onnxruntime",)
"""What the emulated boxes may run: neither a Pi nor a Jetson's CPU runs OpenVINO."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="Emulate a Raspberry Pi (1 core, 3 GiB) and a Jetson (2 cores, 6 GiB) "
        "as namespace boxes, serve one model over both, stream a chat, tear down.",
    )
    ap.add_argument("--prompt", default="Why do rivers bend? Answer in two sentences.")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument(
        "--model",
        type=Path,
        default=None,
        help="A converted package folder (default: the default model, converted once).",
    )
    ap.add_argument(
        "--split",
        action="store_true",
        help="Force one stage per box (the planner's equal-split baseline) instead of "
        "the planner's choice.",
    )
    ap.add_argument("--subnet", default="10.80.0", help="Private /24 for the lab (first 3 octets).")
    return ap.parse_args(argv)


def host_profile() -> dict:
    """This host's measured planner profile (``edgemesh info --json --measure``)."""
    from edgemesh.fingerprint import collect

    return collect(measure=True).profile()


def box_profile(box: object, host: dict) -> dict:
    """A box's planner profile: its emulated limits (``BOXES``), the backends
    its fingerprint finds, and the host's measured compute figures scaled by
    its share of the host's cores.

    Two stand-ins, both reported as issues: ``edgemesh info --measure`` peaks
    near 4 GB and is OOM-killed in the 3 GiB "Pi"; and ``ip netns exec``
    remounts /sys, hiding /sys/fs/cgroup, so a fingerprint taken inside a
    box sees the host's memory and cores instead of its cgroup limits."""
    out = box.edgemesh("info", "--json")  # type: ignore[attr-defined]
    if out.returncode != 0:
        raise SystemExit(f"edgemesh info failed on {box.id}:\n{out.stderr}")  # type: ignore[attr-defined]
    fp = json.loads(out.stdout)
    cpus, memory = BOXES[box.id]  # type: ignore[attr-defined]
    share = cpus / host["cores_effective"]
    backends = [b for b in fp["backends"] if b in BACKENDS]
    compute = {
        key: {"gflops": round(rate["gflops"] * share, 2), "bandwidth_gbps": rate["bandwidth_gbps"]}
        for key, rate in host["compute"].items()
        if key.split("/")[0] in backends
    }
    return {
        "id": box.id,  # type: ignore[attr-defined]
        "memory_limit_bytes": memory,
        "backends": backends,
        "compute": compute,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from edgemesh.lab.cgroups import unavailable
    from edgemesh.lab.meshlab import (
        BoxLimits,
        MeshLab,
        equal_split,
        metrics,
        stream_chat,
        wait_until,
    )
    from edgemesh.lab.netns import skip_reason

    why = skip_reason() or unavailable()
    if why:
        print(f"cannot build the lab: {why}", file=sys.stderr)
        return 2
    if args.model is None:
        from edgemesh.models import default_package

        print("finding the default model package (converted once, then cached)...")
        args.model = default_package()

    print("measuring this host once (matmul and memory bandwidth, ~10 s)...")
    host = host_profile()
    limits = [BoxLimits(cpus, mem) for cpus, mem in BOXES.values()]
    print(f"building boxes on {args.subnet}.0/24: " + ", ".join(
        f"{n} ({c:g} CPU, {m // GiB} GiB)" for n, (c, m) in BOXES.items()))  # fmt: skip
    with MeshLab(limits, subnet=args.subnet, prefix="pjl", mesh="kitchen", ids=list(BOXES)) as lab:
        t0 = time.monotonic()
        for box in lab.boxes:
            box.join()
            print(f"  {box.id}: edgemesh join (address {box.box.address})")
        head_id = wait_until(lambda: lab.formed(), 240, lab.logs)
        print(f"mesh formed in {time.monotonic() - t0:.0f} s; head: {head_id}")
        head = lab.box(head_id)
        out = head.edgemesh("status", "--state-dir", str(head.state))
        print(out.stdout)

        t = time.monotonic()
        profiles = lab.root / "profiles.json"
        profiles.write_text(json.dumps([box_profile(b, host) for b in lab.boxes]))
        code, plan, err = lab.plan(head, args.model, profiles)
        if plan is None:
            print(f"edgemesh plan failed ({code}):\n{err}", file=sys.stderr)
            return 1
        if args.split:
            plan = equal_split(plan)
        plan_file = lab.root / "plan.json"
        plan_file.write_text(json.dumps(plan))
        deploy = [
            "deploy", str(args.model), "--name", "gemma", "--state-dir", str(head.state),
            "--port", str(PORT), "--json", "--boxes", str(profiles), "--plan", str(plan_file),
            "--host", "mesh",  # this script talks to the gateway from outside the head
        ]  # fmt: skip
        print("deploying...")
        out = head.edgemesh(*deploy)
        if out.returncode != 0:
            print(f"edgemesh deploy failed:\n{out.stderr[-3000:]}", file=sys.stderr)
            return 1
        record = json.loads(out.stdout)
        print(f"deployed in {time.monotonic() - t:.0f} s; gateway {record['gateway']}")
        print("plan:")
        for st in record["plan"]["stages"]:
            memory = (
                f", memory {st['memory_bytes'] / GiB:.2f} "
                f"of {st['memory_limit_bytes'] / GiB:.2f} GiB"
                if st.get("memory_bytes")
                else ""
            )
            print(
                f"  {st['box']:<8} layers [{st['layers'][0]:>2}, {st['layers'][1]:>2})  "
                f"{st['backend']}/{st['precision']:<5} "
                f"predicted {st['predicted_ms']:.1f} ms/token{memory}"
            )
        for left in record["plan"].get("left_out", []):
            print(f"  {left['box']:<8} not used: {left['reason']}")

        print(f"\nuser: {args.prompt}\nassistant: ", end="", flush=True)

        def show(piece: str) -> None:
            print(piece, end="", flush=True)

        answer = stream_chat(record["gateway"], "gemma", args.prompt, args.max_tokens, on_text=show)
        print()
        print(
            f"\n{answer.completion_tokens} tokens, first after {answer.first_token_s:.2f} s, "
            f"{1000 / answer.ms_per_token:.1f} tokens/s"
        )
        print("where each stage ran (gateway /metrics):")
        for st in metrics(record["gateway"], "gemma")["info"]["stages"]:
            where = "in the gateway's process" if st.get("in_process") else f"pid {st.get('pid')}"
            print(
                f"  {st['box']:<8} layers [{st['layers'][0]:>2}, {st['layers'][1]:>2})  "
                f"{st['backend']}/{st['precision']}  ({where})"
            )
        print("tearing down (every process, namespace and cgroup of the lab)...")
    print("done.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
