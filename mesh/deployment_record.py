"""The typed records that cross boxes and files: a deployed model and its parts.

A deployment is written by one box (``edgemesh deploy``, the dashboard),
kept in the head's GCS and every box's ``deployments.json``
(``edgemesh.mesh.deployments``), and read by other boxes and later
versions. It is parsed once, where it enters a process, into these types;
everything inside passes the objects, never the raw JSON.

- ``PackageRef``: a converted package as the mesh refers to it: the exact
  ``manifest.json`` bytes (their sha256 names cache folders, and a local copy
  is trusted only if its manifest is byte-identical), the ``Manifest``
  parsed once from them, and where the package lies on the box that
  deployed it.
- ``StageInfo``: one stage, where it runs (box, layers, backend, precision)
  and, once started, who runs it (host, pid, package folder, fetched or not).
- ``DeploymentRecord``: one deployed model (package, plan, box profiles,
  links, stages, gateway URL); versioned (``RECORD_VERSION``). A record
  without a ``version`` key predates versions and is version 1.
- ``GraphRecord``: one graph (vision) model deployed as whole replicas, one
  per chosen box (``edgemesh deploy DIR`` of a graph package, the dashboard).
- ``Deployments``: the document of all records plus the mesh-wide gateway
  settings. Its ``version`` key on the wire is the store's *revision*
  counter (the higher copy wins a sync), not a format version.

Wire form: JSON objects (``to_dict``); the same dicts travel as msgpack.
Keys this version does not know are kept (``extra``) and written back, so a
round trip through an older box loses nothing.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

from edgemesh.errors import (
    CorruptArtifactError,
    EdgemeshError,
    ModelNotFoundError,
    RecordError,
    RecordVersionError,
)
from edgemesh.sharding.package.manifest import MANIFEST_NAME, Manifest

if TYPE_CHECKING:
    from edgemesh.limits import ServingLimits
    from edgemesh.sharding.planner.boxes import BoxProfile, Link
    from edgemesh.sharding.planner.plan import Plan
    from edgemesh.sharding.planner.plan import Stage as PlanStage

JSONObject: TypeAlias = dict[str, Any]
"""A free-form JSON object: a record's wire form before it is parsed, an HTTP body."""

RECORD_VERSION = 1
"""The format version of ``DeploymentRecord`` this edgemesh writes and reads."""

_RECORD_KEYS = frozenset(
    {
        "version",
        "name",
        "manifest",
        "package_dir",
        "origin_box",
        "plan",
        "profiles",
        "links",
        "stages",
        "gateway",
        "deployed",
        "limits",
    }
)
_DOC_KEYS = frozenset(
    {
        "version",
        "updated",
        "models",
        "gateway",
        "gateway_host",
        "api_key_sha256",
        "drained",
        "forgotten",
        "graphs",
    }
)
_GRAPH_KEYS = frozenset(
    {
        "kind",
        "name",
        "manifest",
        "package_dir",
        "origin_box",
        "replicas",
        "not_chosen",
        "refused",
        "replicas_wanted",
        "max_accuracy_loss",
        "threads",
        "gateway",
        "deployed",
    }
)


def check_version(kind: str, data: Mapping[str, Any], expected: int = RECORD_VERSION) -> None:
    """Refuse a record of another format version (a missing version is 1)."""
    found = data.get("version", 1)
    if isinstance(found, bool) or not isinstance(found, int) or found != expected:
        raise RecordVersionError(
            f"{kind} has format version {found!r}; this edgemesh reads version {expected}",
            found=found,
            expected=expected,
        )


@dataclass(frozen=True)
class PackageRef:
    """A package as the mesh refers to it; see the module docstring.

    ``path`` is meaningful only on ``origin_box`` (no shared filesystem):
    ``path_on(box)`` is the path for a stage on ``box``, or "" to fetch."""

    manifest_bytes: bytes
    manifest: Manifest = field(compare=False, repr=False)
    path: str = ""
    origin_box: str | None = None

    @classmethod
    def from_bytes(
        cls, manifest_bytes: bytes, *, path: str = "", origin_box: str | None = None
    ) -> PackageRef:
        """Parse ``manifest.json`` bytes (raises ``ModelError`` when malformed)."""
        try:
            data = json.loads(manifest_bytes)
        except ValueError as exc:
            raise CorruptArtifactError(MANIFEST_NAME, f"not valid JSON ({exc})") from exc
        if not isinstance(data, dict):
            raise CorruptArtifactError(MANIFEST_NAME, f"a {type(data).__name__}, not an object")
        return cls(manifest_bytes, Manifest.from_dict(data), path, origin_box)

    @classmethod
    def from_folder(cls, folder: Path, *, origin_box: str | None = None) -> PackageRef:
        """The package in ``folder`` (reads its ``manifest.json`` once)."""
        root = Path(folder).expanduser()
        path = root / MANIFEST_NAME
        if not path.is_file():
            raise ModelNotFoundError(
                f"no model package at '{root}' (no {MANIFEST_NAME})",
                hint="convert a checkpoint with `edgemesh convert SOURCE --out DIR`",
            )
        return cls.from_bytes(path.read_bytes(), path=str(root), origin_box=origin_box)

    @property
    def name(self) -> str:
        return self.manifest.name

    def path_on(self, box: str) -> str:
        """Where the package may already be on ``box`` ("" where it means nothing)."""
        return self.path if self.origin_box in (None, box) else ""

    def all_files(self) -> list[str]:
        """Every artifact of the package (a whole copy)."""
        return [a.path for a in self.manifest.artifacts]

    def range_files(self, start: int, stop: int, precision: str) -> list[str]:
        """What a stage of ``[start, stop)`` at ``precision`` needs: its graphs and
        weights plus the tokenizer (every stage can decode)."""
        from edgemesh.sharding.package.folder import range_artifacts

        out = range_artifacts(self.manifest, start, stop, precision)
        tok = self.manifest.tokenizer.file
        if tok and tok not in out:
            out.append(tok)
        return out

    def to_dict(self) -> JSONObject:
        """The record's flat keys (``manifest`` as text, ``package_dir``, ``origin_box``)."""
        return {
            "manifest": self.manifest_bytes.decode(),
            "package_dir": self.path,
            "origin_box": self.origin_box,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PackageRef:
        text = data.get("manifest")
        if not isinstance(text, str):
            raise RecordError("a package reference has no manifest text")
        origin = data.get("origin_box")
        return cls.from_bytes(
            text.encode(),
            path=str(data.get("package_dir") or ""),
            origin_box=str(origin) if origin is not None else None,
        )


@dataclass(frozen=True)
class StageInfo:
    """One stage: where it runs and, once started, who runs it."""

    box: str
    start: int
    stop: int
    backend: str
    precision: str
    host: str | None = None
    pid: int | None = None
    package_dir: str | None = None
    """The folder the stage loaded from on its box (its copy or its cache)."""
    fetched: bool | None = None
    """Whether the stage fetched its artifacts (its box had no intact copy)."""
    in_process: bool = False
    """The stage runs inside the gateway's process (the single-box path)."""

    @classmethod
    def of_plan(cls, stage: PlanStage) -> StageInfo:
        """Where a planner stage puts its layers."""
        return cls(stage.box, stage.layers.start, stage.layers.stop, stage.backend, stage.precision)

    @property
    def layers(self) -> tuple[int, int]:
        return (self.start, self.stop)

    def placement(self) -> StageInfo:
        """Only where it runs: what a deployment record keeps."""
        return StageInfo(self.box, self.start, self.stop, self.backend, self.precision)

    def to_dict(self) -> JSONObject:
        out: JSONObject = {
            "box": self.box,
            "layers": [self.start, self.stop],
            "backend": self.backend,
            "precision": self.precision,
        }
        for key in ("host", "pid", "package_dir", "fetched"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        if self.in_process:
            out["in_process"] = True
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StageInfo:
        try:
            start, stop = data["layers"]
            pid = data.get("pid")
            fetched = data.get("fetched")
            package_dir = data.get("package_dir")
            host = data.get("host")
            return cls(
                box=str(data["box"]),
                start=int(start),
                stop=int(stop),
                backend=str(data["backend"]),
                precision=str(data["precision"]),
                host=str(host) if host is not None else None,
                pid=int(pid) if pid is not None else None,
                package_dir=str(package_dir) if package_dir is not None else None,
                fetched=bool(fetched) if fetched is not None else None,
                in_process=bool(data.get("in_process", False)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise RecordError(f"a stage entry is malformed ({exc!r}): {dict(data)!r}") from exc


@dataclass(frozen=True)
class DeploymentRecord:
    """One deployed model; see the module docstring."""

    name: str
    package: PackageRef
    plan: Plan
    profiles: tuple[BoxProfile, ...] = ()
    """The boxes' planner profiles at deploy time: what re-plans after a loss use."""
    links: tuple[Link, ...] = ()
    stages: tuple[StageInfo, ...] = ()
    """Where the stages run now (kept in step by ``record_stages``)."""
    gateway: str | None = None
    deployed: float = 0.0
    limits: ServingLimits | None = None
    """The serving limits it was deployed with (None: the defaults)."""
    extra: JSONObject = field(default_factory=dict, compare=False)
    """Keys this version does not know, written back unchanged."""
    version: int = RECORD_VERSION

    @classmethod
    def new(
        cls,
        name: str,
        package: PackageRef,
        plan: Plan,
        profiles: Iterable[BoxProfile],
        links: Iterable[Link] = (),
        *,
        gateway: str | None,
        deployed: float,
        limits: ServingLimits | None = None,
    ) -> DeploymentRecord:
        """A record for a fresh placement: the stages are the plan's."""
        return cls(
            name=name,
            package=package,
            plan=plan,
            profiles=tuple(profiles),
            links=tuple(links),
            stages=tuple(StageInfo.of_plan(s) for s in plan.stages),
            gateway=gateway,
            deployed=deployed,
            limits=limits,
        )

    def moved(self, stages: Iterable[StageInfo], plan: Plan) -> DeploymentRecord:
        """This record after its stages moved (a loss or a join)."""
        return replace(self, stages=tuple(s.placement() for s in stages), plan=plan)

    def to_dict(self) -> JSONObject:
        out: JSONObject = dict(self.extra)
        out.update(
            {
                "version": self.version,
                "name": self.name,
                **self.package.to_dict(),
                "plan": self.plan.to_dict(),
                "profiles": [p.to_dict() for p in self.profiles],
                "links": [ln.to_dict() for ln in self.links],
                "stages": [s.to_dict() for s in self.stages],
                "gateway": self.gateway,
                "deployed": self.deployed,
            }
        )
        if self.limits is not None:
            out["limits"] = self.limits.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DeploymentRecord:
        """Parse one record; raises ``RecordVersionError`` for another format
        version and ``RecordError`` (naming the model) when malformed."""
        from edgemesh.sharding.planner.boxes import BoxProfile, Link
        from edgemesh.sharding.planner.plan import Plan

        if not isinstance(data, Mapping):
            raise RecordError(f"a deployment record is a {type(data).__name__}, not an object")
        name = data.get("name")
        check_version(f"the deployment record of {name!r}", data)
        try:
            if not isinstance(name, str) or not name:
                raise RecordError("it has no name")
            limits = data.get("limits")
            gateway = data.get("gateway")
            return cls(
                name=name,
                package=PackageRef.from_dict(data),
                plan=Plan.from_dict(data["plan"]),
                profiles=tuple(BoxProfile.from_dict(p) for p in data.get("profiles") or []),
                links=tuple(Link.from_dict(ln) for ln in data.get("links") or []),
                stages=tuple(StageInfo.from_dict(s) for s in data.get("stages") or []),
                gateway=str(gateway) if gateway else None,
                deployed=float(data.get("deployed") or 0.0),
                limits=_limits(limits) if limits is not None else None,
                extra={k: v for k, v in data.items() if k not in _RECORD_KEYS},
            )
        except RecordVersionError:
            raise
        except (EdgemeshError, KeyError, TypeError, ValueError) as exc:
            raise RecordError(
                f"the deployment record of {name!r} cannot be read: {exc}",
                hint="re-run `edgemesh deploy` for it",
            ) from exc


def _limits(data: Any) -> ServingLimits:
    from edgemesh.limits import ServingLimits

    return ServingLimits.from_dict(data)


@dataclass(frozen=True)
class GraphRecord:
    """One graph model served by whole replicas; see the module docstring."""

    name: str
    manifest: str
    """The graph package's manifest.json text, as deployed."""
    package_dir: str
    origin_box: str | None
    replicas: tuple[JSONObject, ...]
    """Per replica: box, backend, precision, device, measured p50_ms ... (as placed)."""
    not_chosen: dict[str, float | None] = field(default_factory=dict)
    """box -> its measured p50 (ms): could serve it, but slower than the chosen."""
    refused: dict[str, str] = field(default_factory=dict)
    """box -> why it cannot serve the model."""
    replicas_wanted: int | None = None
    """None: every box close to the fastest; N: the N fastest."""
    max_accuracy_loss: float | None = None
    """None: the deploy default (records from before it was kept)."""
    threads: int | None = None
    gateway: str | None = None
    """The /v2 URL it is served at."""
    deployed: float = 0.0
    extra: JSONObject = field(default_factory=dict, compare=False)
    """Keys this version does not know, written back unchanged."""

    @property
    def boxes(self) -> list[str]:
        return [str(r["box"]) for r in self.replicas]

    def to_dict(self) -> JSONObject:
        out: JSONObject = dict(self.extra)
        out.update(
            {
                "kind": "graph",
                "name": self.name,
                "manifest": self.manifest,
                "package_dir": self.package_dir,
                "origin_box": self.origin_box,
                "replicas": [dict(r) for r in self.replicas],
                "not_chosen": dict(self.not_chosen),
                "refused": dict(self.refused),
                "replicas_wanted": self.replicas_wanted,
                "max_accuracy_loss": self.max_accuracy_loss,
                "threads": self.threads,
                "gateway": self.gateway,
                "deployed": self.deployed,
            }
        )
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GraphRecord:
        """Parse one graph record; ``RecordError`` (naming the model) when malformed."""
        if not isinstance(data, Mapping):
            raise RecordError(f"a graph record is a {type(data).__name__}, not an object")
        name = data.get("name")
        try:
            if not isinstance(name, str) or not name:
                raise ValueError("it has no name")
            replicas = data.get("replicas") or []
            if not all(isinstance(r, Mapping) and isinstance(r.get("box"), str) for r in replicas):
                raise ValueError("a replica has no box")
            wanted, threads = data.get("replicas_wanted"), data.get("threads")
            loss = data.get("max_accuracy_loss")
            origin = data.get("origin_box")
            return cls(
                name=name,
                manifest=str(data["manifest"]),
                package_dir=str(data["package_dir"]),
                origin_box=str(origin) if origin is not None else None,
                replicas=tuple(dict(r) for r in replicas),
                not_chosen={
                    str(b): None if t is None else float(t)
                    for b, t in (data.get("not_chosen") or {}).items()
                },
                refused={str(b): str(w) for b, w in (data.get("refused") or {}).items()},
                replicas_wanted=None if wanted is None else int(wanted),
                max_accuracy_loss=None if loss is None else float(loss),
                threads=None if threads is None else int(threads),
                gateway=str(data["gateway"]) if data.get("gateway") else None,
                deployed=float(data.get("deployed") or 0.0),
                extra={k: v for k, v in data.items() if k not in _GRAPH_KEYS},
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise RecordError(f"graph record {name!r} is malformed: {exc!r}") from exc


@dataclass
class Deployments:
    """Every deployed model plus the mesh's gateway settings (``deployments.json``).

    ``revision`` is the wire's ``version`` key: bumped on every write, the
    higher copy wins when a box syncs with the head."""

    revision: int = 0
    updated: float = 0.0
    models: dict[str, DeploymentRecord] = field(default_factory=dict)
    gateway: str | None = None
    gateway_host: str | None = None
    """``--host`` of the gateway; None in records from before it was kept."""
    api_key_sha256: list[str] = field(default_factory=list)
    drained: list[str] = field(default_factory=list)
    forgotten: dict[str, float] = field(default_factory=dict)
    graphs: dict[str, GraphRecord] = field(default_factory=dict)
    extra: JSONObject = field(default_factory=dict)

    def gateway_url(self) -> str | None:
        """The gateway's URL: the document's, else the first model's."""
        return self.gateway or next((m.gateway for m in self.models.values() if m.gateway), None)

    def to_dict(self) -> JSONObject:
        out: JSONObject = dict(self.extra)
        out.update(
            {
                "version": self.revision,
                "updated": self.updated,
                "models": {n: r.to_dict() for n, r in self.models.items()},
            }
        )
        if self.gateway is not None:
            out["gateway"] = self.gateway
        if self.gateway_host is not None:
            out["gateway_host"] = self.gateway_host
        if self.api_key_sha256:
            out["api_key_sha256"] = list(self.api_key_sha256)
        if self.drained:
            out["drained"] = list(self.drained)
        if self.forgotten:
            out["forgotten"] = dict(self.forgotten)
        if self.graphs:
            out["graphs"] = {n: g.to_dict() for n, g in self.graphs.items()}
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Deployments:
        """Parse the document; every record is checked (``DeploymentRecord.from_dict``)."""
        models = data.get("models")
        if not isinstance(models, Mapping):
            raise RecordError("the deployment records have no 'models' object")
        try:
            host = data.get("gateway_host")
            gateway = data.get("gateway")
            return cls(
                revision=int(data.get("version", 0)),
                updated=float(data.get("updated", 0.0)),
                models={str(n): DeploymentRecord.from_dict(r) for n, r in models.items()},
                gateway=str(gateway) if gateway else None,
                gateway_host=str(host) if host is not None else None,
                api_key_sha256=[str(d) for d in data.get("api_key_sha256") or []],
                drained=[str(b) for b in data.get("drained") or []],
                forgotten={str(b): float(t) for b, t in (data.get("forgotten") or {}).items()},
                graphs={
                    str(n): GraphRecord.from_dict(g) for n, g in (data.get("graphs") or {}).items()
                },
                extra={k: v for k, v in data.items() if k not in _DOC_KEYS},
            )
        except (TypeError, ValueError, AttributeError) as exc:
            raise RecordError(f"the deployment records are malformed: {exc}") from exc
