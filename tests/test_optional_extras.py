"""The package imports without any optional extra: every module of lmcache_ext imports in a
process where the extras' modules cannot be imported (the connector too, where vLLM is
installed), and a config that asks for the remote tier still fails at start-up, saying
what to install. A machine that installed only what the README's first command installs
sees the extras so."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lmcache_ext
from lmcache_ext.testing.hidden_modules import OPTIONAL_EXTRAS, hiding_env

NEEDS_ENGINE = {"vllm", "transformers", "tokenizers"}  # what the vLLM integration and the tiny model need
THE_EXTRA_ITSELF = {"lmcache_ext.tiers.remote": "glide_sync"}  # the client's own wrapper: imported only to build it

IMPORT_ALL = """
import importlib, json, pkgutil
import lmcache_ext
from lmcache_ext.config import ConfigError, load_config

failed = {}
for info in pkgutil.walk_packages(lmcache_ext.__path__, "lmcache_ext.", onerror=lambda name: None):
    if info.name == "lmcache_ext.__main__":
        continue  # runs the CLI
    try:
        importlib.import_module(info.name)
    except ImportError as exc:
        failed[info.name] = exc.name or str(exc)
hidden = {}
for module in %r:
    try:
        importlib.import_module(module)
        hidden[module] = False
    except ModuleNotFoundError:
        hidden[module] = True
try:
    load_config({"remote_url": "redis://127.0.0.1:6379"}, environ={})
    remote_error = None
except ConfigError as exc:
    remote_error = str(exc)
print(json.dumps({"failed": failed, "hidden": hidden, "remote_error": remote_error}))
"""


def run_hidden(tmp_path: Path) -> dict:
    hidden = hiding_env(tmp_path / "hidden")
    # The lmcache_ext this process tests, installed or not (the venv without vLLM runs it from a copy of the tree).
    tree = str(Path(lmcache_ext.__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([hidden["PYTHONPATH"], tree])}
    proc = subprocess.run(
        [sys.executable, "-c", IMPORT_ALL % (OPTIONAL_EXTRAS,)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.splitlines()[-1])


def engine_installed() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in NEEDS_ENGINE)


def test_every_module_imports_without_the_optional_extras(tmp_path):
    result = run_hidden(tmp_path)
    assert result["hidden"] == dict.fromkeys(OPTIONAL_EXTRAS, True)  # the extras really were out of reach
    failed = {m: missing for m, missing in result["failed"].items() if THE_EXTRA_ITSELF.get(m) != missing}
    if engine_installed():
        assert failed == {}
    else:  # only the modules that need vLLM or transformers fail, and only for those
        assert set(failed.values()) <= NEEDS_ENGINE, failed


def test_a_remote_url_without_its_client_fails_at_start_up_saying_what_to_install(tmp_path):
    assert run_hidden(tmp_path)["remote_error"] == (
        "remote_url = 'redis://127.0.0.1:6379' from kv_connector_extra_config needs the remote tier's client, "
        "which is not installed: pip install 'lmcache_ext[remote]' (valkey-glide-sync), or remote_url null"
    )


ENTRY_POINTS = ("lmcache_ext.demo", "lmcache_ext.tiny_llama", "lmcache_ext.integration.vllm.api_server")
RUNTIME = ["lmcache_ext.engine", "lmcache_ext.planner", "lmcache_ext.tiers.disk", "lmcache_ext.tiers.disk_ledger"]


def test_the_runtime_never_imports_the_entry_points():
    """The demo, the tiny model and the server launcher are what the README's commands run;
    the cache itself (and the connector, where vLLM is installed) never imports them."""
    runtime = RUNTIME + (["lmcache_ext.integration.vllm.connector"] if engine_installed() else [])
    code = f"import importlib, sys\nfor m in {runtime!r}: importlib.import_module(m)\nprint(sorted(m for m in {ENTRY_POINTS!r} if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.splitlines()[-1] == "[]"
