"""Where edgemesh keeps its files on a box: the one rule, read from the
environment here and nowhere else.

Cache (re-creatable: converted packages, composed layer ranges, measurements,
per-box stage artifacts, benchmark inputs)::

    $EDGEMESH_CACHE_DIR             if set, used as is
    $XDG_CACHE_HOME/edgemesh        else, if XDG_CACHE_HOME is set
    ~/.cache/edgemesh               else

State (a box's mesh identity, secret, deployment records; must survive a
reboot)::

    $EDGEMESH_STATE_DIR             if set: the state folder itself (one mesh)
    $XDG_STATE_HOME/edgemesh/<mesh> else, if XDG_STATE_HOME is set
    ~/.local/state/edgemesh/<mesh>  else

The mesh agent exports ``EDGEMESH_STATE_DIR`` to the Ray processes it starts,
so code running on a box's behalf (the gateway replica) finds that box's
state with :func:`agent_state_dir`. edgemesh has no config folder: settings
are CLI flags, kept in the state folder when they must outlive a command.

Every function reads the environment when called (not at import), so a test
or a command that sets a variable sees it at once. Callers that take an
explicit folder (``--cache-dir``, ``--state-dir``) use it instead of these.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "EDGEMESH_CACHE_DIR"
STATE_ENV = "EDGEMESH_STATE_DIR"
PACKAGES_ENV = "EDGEMESH_PACKAGES"


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value).expanduser() if value else None


def cache_root() -> Path:
    """The cache folder (see the module docstring for the rule)."""
    explicit = _env_path(CACHE_ENV)
    if explicit is not None:
        return explicit
    xdg = _env_path("XDG_CACHE_HOME")
    return (xdg if xdg is not None else Path.home() / ".cache") / "edgemesh"


def packages_dir() -> Path:
    """Converted model packages (``edgemesh convert`` default, the default model)."""
    return cache_root() / "packages"


def ranges_dir() -> Path:
    """Composed layer-range graphs, keyed by package digest and range."""
    return cache_root() / "ranges"


def measure_dir() -> Path:
    """Fingerprint measurements and calibrations (``edgemesh info --measure``)."""
    return cache_root() / "measure"


def box_cache_dir(box_slug: str) -> Path:
    """One box's own cache (stage artifacts fetched from the package's box).

    Per box, so several boxes on one host (network namespaces) never share it.
    """
    return cache_root() / "boxes" / box_slug


def bench_dir() -> Path:
    """Inputs the benchmarks build once (synthetic models)."""
    return cache_root() / "bench"


def slim_dir() -> Path:
    """Quality figures of slimmed packages (``edgemesh slim``), keyed by digest."""
    return cache_root() / "slim"


def sources_dir() -> Path:
    """Downloaded source checkpoints a conversion starts from."""
    return cache_root() / "sources"


def package_search_dirs() -> list[Path]:
    """Folders searched for packages: the cache's, then ``$EDGEMESH_PACKAGES``
    (``:``-separated)."""
    extra = os.environ.get(PACKAGES_ENV, "")
    return [packages_dir(), *(Path(p).expanduser() for p in extra.split(":") if p)]


def state_root() -> Path:
    """The folder holding one state folder per mesh (without EDGEMESH_STATE_DIR)."""
    xdg = _env_path("XDG_STATE_HOME")
    return (xdg if xdg is not None else Path.home() / ".local" / "state") / "edgemesh"


def mesh_state_dir(mesh: str) -> Path:
    """A box's state folder for MESH: ``$EDGEMESH_STATE_DIR`` if set, else
    ``state_root() / mesh``."""
    explicit = _env_path(STATE_ENV)
    return explicit if explicit is not None else state_root() / mesh


def serve_state_dir() -> Path:
    """``edgemesh serve``'s state (its gateway's event log and job history):
    ``$EDGEMESH_STATE_DIR`` if set, else ``state_root() / "serve"``. The mesh
    gateway keeps them in the head's state folder instead."""
    explicit = _env_path(STATE_ENV)
    return explicit if explicit is not None else state_root() / "serve"


def agent_state_dir() -> Path | None:
    """The state folder the box's agent exported to this process, if any."""
    return _env_path(STATE_ENV)
