"""Where a box keeps its mesh state, and the mesh secret.

The state folder's location follows the one rule of ``edgemesh.paths``
(``EDGEMESH_STATE_DIR``, ``XDG_STATE_HOME``, ``~/.local/state``).

A box's state folder holds::

    settings.json     the options `edgemesh join` ran with (no secret)
    box_id            this box's default id, kept so it never changes (mesh.box_id)
    secret            the mesh secret, when join created it (mode 0600)
    ray_token         the Ray auth token derived from the secret (0600)
    state.json        the running agent's view of the mesh (for status, router)
    events.jsonl      membership events, one JSON object a line
    deployments.json  the mesh's deployed-model records (survive a head change)
    ray/              Ray's --temp-dir when the path is short enough (see below)
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import stat
import tempfile
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgemesh import paths
from edgemesh.errors import AuthError, ConfigError

log = logging.getLogger(__name__)

SECRET_BYTES = 32
# Ray puts Unix sockets at <temp>/session_<date>_<pid>/sockets/plasma_store;
# AF_UNIX paths stop at 107 bytes, so the temp dir itself must stay short.
_MAX_RAY_TEMP_LEN = 40
_MESH_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,30}$")


def process_env() -> dict[str, str]:
    """A copy of this process's environment, the base for Ray's children."""
    return dict(os.environ)


def check_mesh_name(mesh: str) -> str:
    """Mesh names go into mDNS labels and folder names: keep them plain."""
    if not _MESH_NAME.match(mesh):
        raise ConfigError(
            f"invalid mesh name '{mesh}'",
            hint="use 1-31 lowercase letters, digits or '-', starting with a letter or digit",
        )
    return mesh


def default_state_dir(mesh: str) -> Path:
    """``$EDGEMESH_STATE_DIR`` if set (used as is), else
    ``$XDG_STATE_HOME/edgemesh/<mesh>`` (``~/.local/state/edgemesh/<mesh>``)."""
    return paths.mesh_state_dir(mesh)


def state_folder(state_dir: Path | None = None, mesh: str | None = None) -> Path:
    """``state_dir`` if given, else the default folder of ``mesh`` ("default")."""
    if state_dir is not None:
        return Path(state_dir).expanduser()
    return default_state_dir(check_mesh_name(mesh or "default"))


def default_ray_temp_dir(state_dir: Path) -> Path:
    """``<state>/ray`` when short enough for Ray's socket paths, else a
    folder in the system temp dir named by a hash of the state folder, so two
    boxes on one host never share it."""
    inside = state_dir.resolve() / "ray"
    if len(str(inside)) <= _MAX_RAY_TEMP_LEN:
        return inside
    tag = hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:12]
    base = Path(tempfile.gettempdir())
    if len(str(base)) > _MAX_RAY_TEMP_LEN - 20:
        base = Path("/tmp")
    return base / f"edgemesh-ray-{tag}"


@dataclass(frozen=True)
class StatePaths:
    """The files of one box's state folder."""

    root: Path

    @property
    def settings(self) -> Path:
        return self.root / "settings.json"

    @property
    def secret(self) -> Path:
        return self.root / "secret"

    @property
    def box_id(self) -> Path:
        return self.root / "box_id"

    @property
    def ray_token(self) -> Path:
        return self.root / "ray_token"

    @property
    def state(self) -> Path:
        return self.root / "state.json"

    @property
    def events(self) -> Path:
        return self.root / "events.jsonl"

    @property
    def deployments(self) -> Path:
        return self.root / "deployments.json"

    @property
    def ray_log(self) -> Path:
        return self.root / "ray-start.log"

    def ensure(self) -> StatePaths:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        return self


@dataclass
class JoinSettings:
    """The options of ``edgemesh join``; saved so ``status`` can reuse them."""

    mesh: str = "default"
    state_dir: Path | None = None
    secret_file: Path | None = None
    box_id: str | None = None
    interface: str | None = None
    ray_port: int = 6379
    ray_temp_dir: Path | None = None
    object_store_mb: int = 128
    settle_s: float = 3.0

    def resolved(self) -> JoinSettings:
        """A copy with every path filled in from the defaults."""
        check_mesh_name(self.mesh)
        state = (self.state_dir or default_state_dir(self.mesh)).expanduser().resolve()
        return JoinSettings(
            mesh=self.mesh,
            state_dir=state,
            secret_file=self.secret_file.expanduser().resolve() if self.secret_file else None,
            box_id=self.box_id,
            interface=self.interface,
            ray_port=self.ray_port,
            ray_temp_dir=(self.ray_temp_dir or default_ray_temp_dir(state)).expanduser(),
            object_store_mb=self.object_store_mb,
            settle_s=self.settle_s,
        )

    @property
    def paths(self) -> StatePaths:
        if self.state_dir is None:
            raise ConfigError("settings are not resolved yet")
        return StatePaths(self.state_dir)

    def to_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> JoinSettings:
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        for key in ("state_dir", "secret_file", "ray_temp_dir"):
            if known.get(key):
                known[key] = Path(known[key])
        return cls(**known)

    def save(self) -> None:
        write_json(self.paths.ensure().settings, self.to_dict())


def load_settings(state_dir: Path) -> JoinSettings | None:
    """The settings a previous ``edgemesh join`` saved in ``state_dir``."""
    path = StatePaths(state_dir).settings
    try:
        return JoinSettings.from_dict(json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}", hint="delete it and join again") from exc


class MeshSecret:
    """The shared mesh secret. Never printed: repr and str hide it.

    Everything else is derived from it with HMAC and a purpose label, so the
    mDNS key and the Ray token are independent and neither reveals the secret.
    """

    __slots__ = ("_raw", "source")

    def __init__(self, raw: bytes, source: Path | None = None) -> None:
        if len(raw) < 16:
            raise AuthError("the mesh secret is too short", hint="use at least 16 bytes")
        self._raw = raw
        self.source = source

    def __repr__(self) -> str:
        return f"MeshSecret(<hidden>, source={self.source})"

    __str__ = __repr__

    def _derive(self, label: str) -> bytes:
        return hmac.new(self._raw, label.encode(), hashlib.sha256).digest()

    def mdns_key(self, mesh: str) -> bytes:
        """Key for the HMAC over announced records."""
        return self._derive(f"edgemesh/mdns/v1/{mesh}")

    def ray_token(self, mesh: str) -> str:
        """Ray's auth token (64 hex chars, the form `ray get-auth-token` makes)."""
        return self._derive(f"edgemesh/ray-token/v1/{mesh}").hex()

    def key_id(self) -> str:
        """8 hex chars that tell two secrets apart without revealing either."""
        return self._derive("edgemesh/key-id").hex()[:8]


def _tighten(path: Path) -> None:
    """Refuse to trust a secret others can read; fix the mode if we own it."""
    st = path.stat()
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        if st.st_uid != os.geteuid():
            raise AuthError(
                f"the secret file {path} is readable by other users",
                hint=f"chmod 600 {path}",
            )
        log.warning("secret file %s was readable by others; setting mode 0600", path)
        path.chmod(0o600)


def read_secret(path: Path) -> MeshSecret:
    """Read a secret file: 64 hex chars (what join writes), or any other
    content of at least 16 bytes taken as is (a passphrase file)."""
    try:
        _tighten(path)
        text = path.read_bytes().strip()
    except FileNotFoundError as exc:
        raise AuthError(
            f"no secret file at {path}",
            hint="copy the secret file from a box of the mesh, or omit --secret-file to create one",
        ) from exc
    except OSError as exc:
        raise AuthError(f"cannot read the secret file {path}: {exc}") from exc
    try:
        raw = bytes.fromhex(text.decode()) if len(text) == 2 * SECRET_BYTES else text
    except (UnicodeDecodeError, ValueError):
        raw = text
    return MeshSecret(raw, path)


def create_secret(path: Path) -> MeshSecret:
    """A fresh 32-byte secret written as hex with mode 0600 (never replaces a file)."""
    raw = secrets.token_bytes(SECRET_BYTES)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as exc:
        raise ConfigError(f"{path} already exists; not replacing a secret") from exc
    with os.fdopen(fd, "w") as f:
        f.write(raw.hex() + "\n")
    return MeshSecret(raw, path)


def resolve_secret(settings: JoinSettings, *, create: bool) -> tuple[MeshSecret, bool]:
    """The secret for ``settings`` and whether it was just created.

    ``--secret-file`` must exist; without it the state folder's ``secret``
    is used, created when ``create`` is true (``edgemesh join``).
    """
    if settings.secret_file is not None:
        return read_secret(settings.secret_file), False
    own = settings.paths.secret
    if own.exists() or not create:
        return read_secret(own), False
    return create_secret(own), True


def write_private(path: Path, text: str) -> None:
    """Write ``text`` atomically with mode 0600 (token files)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_json(path: Path, data: Any) -> None:
    """Atomic JSON write, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def read_json(path: Path) -> Any | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None
