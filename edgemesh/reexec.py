"""The argv that runs edgemesh again in a child process, with the same code.

`join --detach`, the head's background restore and the benchmarks start
edgemesh in a new process. ``[sys.executable, "-m", "edgemesh"]`` is wrong
for that: ``-m`` puts the caller's folder first on ``sys.path``, so from a
clone's root the child imports the checkout's ``edgemesh/`` instead of the
package the parent runs, and dies in the background after the parent printed
success. The child built here drops the working folder from ``sys.path`` and
imports ``edgemesh`` from the folder this process imported it from (the
installed site-packages, an editable install's checkout, or a clone run in
place), so parent and child always run the same code.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run inside the child before anything of edgemesh is imported. `''` and `.`
# are the working folder (-c puts '' first unless PYTHONSAFEPATH is set).
_PRELUDE = (
    "import sys; sys.path[:] = [p for p in sys.path if p not in ('', '.')]; "
    "{root!r} in sys.path or sys.path.insert(0, {root!r}); "
)


def import_root() -> Path:
    """The folder `import edgemesh` resolved from in this process."""
    import edgemesh

    return Path(edgemesh.__file__).resolve().parent.parent


def edgemesh_argv(*args: str) -> list[str]:
    """argv for ``edgemesh ARGS...`` (the CLI) in a child process."""
    code = _PRELUDE.format(root=str(import_root())) + (
        "sys.argv[0] = 'edgemesh'; from edgemesh.cli import main; main()"
    )
    return [sys.executable, "-c", code, *args]


def module_argv(module: str, *args: str) -> list[str]:
    """argv for ``python -m MODULE ARGS...`` (an edgemesh module) in a child process."""
    if module != "edgemesh" and not module.startswith("edgemesh."):
        raise ValueError(f"{module!r} is not an edgemesh module")
    code = _PRELUDE.format(root=str(import_root())) + (
        f"import runpy; runpy.run_module({module!r}, run_name='__main__', alter_sys=True)"
    )
    return [sys.executable, "-c", code, *args]


def python_argv(code: str, *args: str) -> list[str]:
    """argv for ``python -c CODE ARGS...`` that imports edgemesh as this process does."""
    return [sys.executable, "-c", _PRELUDE.format(root=str(import_root())) + code, *args]
