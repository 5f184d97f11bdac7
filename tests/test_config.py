"""CacheConfig: defaults, the three sources and their precedence, coercion, and every check's message."""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import sys

import pytest

from lmcache_ext.config import GB, IGNORED_LMCACHE_KEYS, STAGING_SLOTS, CacheConfig, ConfigError, load_config
from lmcache_ext.memory import HostSlotPool

NO_ENV: dict[str, str] = {}


def file_env(tmp_path, text: str, **env: str) -> dict[str, str]:
    """An environ naming a fresh YAML file holding `text`, plus `env`."""
    path = tmp_path / "lmcache.yaml"
    path.write_text(text)
    return {"LMCACHE_CONFIG_FILE": str(path), **env}


def raises_exactly(message: str):
    """pytest.raises(ConfigError) whose message is exactly `message`."""
    return pytest.raises(ConfigError, match=f"^{re.escape(message)}$")


def raises_with(*fragments: str):
    """pytest.raises(ConfigError) whose message holds every fragment, in order."""
    return pytest.raises(ConfigError, match=".*".join(re.escape(f) for f in fragments))


DEFAULTS = {
    "chunk_size": 256,
    "local_cpu": True,
    "max_local_cpu_size": 5.0,
    "local_disk": None,
    "max_local_disk_size": 0.0,
    "remote_url": None,
    "remote_password": None,
    "remote_tls_ca_file": None,
    "remote_tls_cert_file": None,
    "remote_tls_key_file": None,
    "remote_tls_verify": True,
    "remote_timeout_ms": 1000,
    "remote_ttl_s": 0,
    "remote_connections": 2,
    "remote_key_prefix": "lmcache_ext:",
    "remote_max_value_bytes": 4 << 20,
    "remote_write_backlog": 32,
    "remote_integrity_key": None,
    "async_save": True,
    "async_load": None,
    "save_unfull_chunk": True,
    "save_decode_cache": False,
    "use_layerwise": False,
    "cross_layer_blocks": None,
    "cuda_copy_path": "kernel",
    "cache_policy": "LRU",
    "disk_o_direct": True,
    "disk_io_threads": 2,
    "cpu_copy_threads": 0,
    "pin_host_memory": "auto",
    "cache_namespace": "",
    "kv_role": "kv_both",
    "pd_wait_ms": 5000,
    "pd_marker_ttl_ms": 30000,
}


def test_defaults_match_lmcache_and_our_additions():
    config = load_config(environ=NO_ENV)
    assert config.to_dict() == DEFAULTS
    assert config == CacheConfig()
    assert config.host_bytes == 5 * 1024**3 == 5 * GB
    assert config.disk_bytes == 0


def test_config_is_frozen():
    config = load_config(environ=NO_ENV)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.chunk_size = 512


def test_yaml_file_alone(tmp_path):
    env = file_env(
        tmp_path,
        f"chunk_size: 512\nlocal_cpu: false\nmax_local_cpu_size: 2.5\nlocal_disk: {tmp_path}/disk\n"
        "max_local_disk_size: 20\ncache_policy: lru\ndisk_io_threads: 4\npin_host_memory: Never\n",
    )
    config = load_config(environ=env)
    assert (config.chunk_size, config.local_cpu, config.max_local_cpu_size) == (512, False, 2.5)
    assert (config.local_disk, config.max_local_disk_size) == (str(tmp_path / "disk"), 20.0)
    assert (config.cache_policy, config.disk_io_threads, config.pin_host_memory) == ("LRU", 4, "never")
    assert config.host_bytes == int(2.5 * 1024**3)
    assert config.disk_bytes == 20 * 1024**3


def test_env_alone(tmp_path):
    config = load_config(
        environ={
            "LMCACHE_CHUNK_SIZE": "512",
            "LMCACHE_LOCAL_CPU": "False",
            "LMCACHE_MAX_LOCAL_CPU_SIZE": "20",
            "LMCACHE_LOCAL_DISK": str(tmp_path),
            "LMCACHE_MAX_LOCAL_DISK_SIZE": "1.5",
            "LMCACHE_REMOTE_URL": "redis://cache:6379",
            "LMCACHE_REMOTE_PASSWORD": "from-the-environment",
            "LMCACHE_REMOTE_TIMEOUT_MS": "250",
            "LMCACHE_SAVE_UNFULL_CHUNK": "no",
            "LMCACHE_ASYNC_SAVE": "no",
            "LMCACHE_ASYNC_LOAD": "false",
            "LMCACHE_SAVE_DECODE_CACHE": "1",
            "LMCACHE_USE_LAYERWISE": "TRUE",
            "LMCACHE_DISK_O_DIRECT": "false",
            "LMCACHE_DISK_IO_THREADS": "3",
            "LMCACHE_CPU_COPY_THREADS": "2",
            "LMCACHE_PIN_HOST_MEMORY": "always",
            "LMCACHE_CACHE_NAMESPACE": " weights-v17 ",
        }
    )
    assert config.to_dict() == {
        **DEFAULTS,
        "chunk_size": 512,
        "local_cpu": False,
        "max_local_cpu_size": 20.0,
        "local_disk": str(tmp_path),
        "max_local_disk_size": 1.5,
        "remote_url": "redis://cache:6379",
        "remote_password": "***",
        "remote_timeout_ms": 250,
        "async_save": False,
        "async_load": False,
        "save_unfull_chunk": False,
        "save_decode_cache": True,
        "use_layerwise": True,
        "disk_o_direct": False,
        "disk_io_threads": 3,
        "cpu_copy_threads": 2,
        "pin_host_memory": "always",
        "cache_namespace": "weights-v17",
    }


def test_extra_config_alone_with_and_without_lmcache_prefix():
    config = load_config(
        {"lmcache.chunk_size": 1024, "max_local_cpu_size": "80m", "lmcache.save_unfull_chunk": False},
        environ=NO_ENV,
    )
    assert (config.chunk_size, config.max_local_cpu_size, config.save_unfull_chunk) == (1024, 80 / 1024, False)


def test_precedence_file_then_env_then_extra_config(tmp_path):
    env = file_env(
        tmp_path,
        "chunk_size: 512\nmax_local_cpu_size: 1\ndisk_io_threads: 7\n",
        LMCACHE_CHUNK_SIZE="1024",
        LMCACHE_MAX_LOCAL_CPU_SIZE="2",
    )
    assert load_config(environ=env).to_dict() == {
        **CacheConfig().to_dict(),
        "chunk_size": 1024,
        "max_local_cpu_size": 2.0,
        "disk_io_threads": 7,
    }
    config = load_config({"chunk_size": 2048}, environ=env)
    assert (config.chunk_size, config.max_local_cpu_size, config.disk_io_threads) == (2048, 2.0, 7)


def test_none_from_a_later_source_clears_an_earlier_value(tmp_path):
    env = file_env(tmp_path, f"local_disk: {tmp_path}\nmax_local_disk_size: 1\nremote_url: redis://h\n")
    for null in ("", "null", "None", " NONE "):
        config = load_config(environ={**env, "LMCACHE_LOCAL_DISK": null, "LMCACHE_REMOTE_URL": null})
        assert (config.local_disk, config.remote_url, config.disk_bytes) == (None, None, 0)
    assert load_config({"local_disk": None}, environ=env).local_disk is None


def test_lmcache_style_yaml_loads_and_warns_about_remote_serde(tmp_path, caplog):
    disk = tmp_path / "local_disk"
    env = file_env(
        tmp_path,
        "chunk_size: 256\n"
        "local_cpu: True\n"
        "max_local_cpu_size: 5.0\n"
        f'local_disk: "file://{disk}/"\n'
        "max_local_disk_size: 10.0\n"
        'remote_url: "redis://localhost:6379"\n'
        'remote_serde: "naive"\n',
    )
    with caplog.at_level(logging.WARNING, logger="lmcache_ext.config"):
        config = load_config(environ=env)
    assert (config.local_disk, config.max_local_disk_size) == (str(disk), 10.0)
    assert config.remote_url == "redis://localhost:6379"
    assert [r.getMessage() for r in caplog.records] == [
        f"ignoring LMCache key remote_serde = 'naive' from config file {env['LMCACHE_CONFIG_FILE']}: "
        "lmcache_ext does not implement remote serialisation (chunks are stored as raw bytes)"
    ]


def test_ignored_lmcache_keys_warn_once_each_from_every_source(tmp_path, caplog):
    env = file_env(tmp_path, "enable_p2p: true\npd_role: sender\n", LMCACHE_BLOCKING_TIMEOUT_SECS="5")
    with caplog.at_level(logging.WARNING, logger="lmcache_ext.config"):
        config = load_config({"lmcache.use_experimental": True}, environ=env)
    assert config == CacheConfig()
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 4
    for key, source in (
        ("enable_p2p", env["LMCACHE_CONFIG_FILE"]),
        ("pd_role", env["LMCACHE_CONFIG_FILE"]),
        ("blocking_timeout_secs", "env LMCACHE_BLOCKING_TIMEOUT_SECS"),
        ("use_experimental", "kv_connector_extra_config"),
    ):
        assert key in IGNORED_LMCACHE_KEYS
        assert sum(m.startswith(f"ignoring LMCache key {key} = ") and source in m for m in messages) == 1


def test_other_lmcache_env_vars_are_ignored_silently(caplog):
    with caplog.at_level(logging.DEBUG, logger="lmcache_ext.config"):
        config = load_config(
            environ={"LMCACHE_LOG_LEVEL": "DEBUG", "LMCACHE_CHUNK_SIZ": "7", "LMCACHE_CONFIG_FILE": ""}
        )
    assert config == CacheConfig()
    assert caplog.records == []


def test_empty_yaml_file_is_the_defaults(tmp_path):
    assert load_config(environ=file_env(tmp_path, "# nothing set\n")) == CacheConfig()


@pytest.mark.parametrize(
    ("text", "gb"),
    [
        ("20", 20.0),
        (" 2.5 ", 2.5),
        (".5", 0.5),
        ("8G", 8.0),
        ("8g", 8.0),
        ("8GB", 8.0),
        ("8GiB", 8.0),
        ("512M", 0.5),
        ("512m", 0.5),
        ("80m", 80 / 1024),
        ("1048576k", 1.0),
        ("1.5T", 1536.0),
        (3, 3.0),
        (0.25, 0.25),
    ],
)
def test_size_strings_and_numbers_are_gb(text, gb):
    assert load_config({"max_local_cpu_size": text}, environ=NO_ENV).max_local_cpu_size == gb


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("true", True),
        ("True", True),
        ("TRUE", True),
        ("1", True),
        ("yes", True),
        ("Yes", True),
        ("false", False),
        ("False", False),
        ("0", False),
        ("no", False),
        ("NO", False),
        (" no ", False),
    ],
)
def test_bool_strings_from_env(text, value):
    assert load_config(environ={"LMCACHE_SAVE_DECODE_CACHE": text}).save_decode_cache is value
    assert load_config(environ={"LMCACHE_LOCAL_CPU": text}).local_cpu is value


@pytest.mark.parametrize(("raw", "value"), [(True, True), (False, False), (1, True), (0, False)])
def test_bool_values_from_extra_config(raw, value):
    assert load_config({"use_layerwise": raw}, environ=NO_ENV).use_layerwise is value


def test_local_disk_forms_are_normalised_to_an_absolute_path(tmp_path):
    assert CacheConfig(local_disk=f"file://{tmp_path}/", max_local_disk_size=1).local_disk == str(tmp_path)
    assert CacheConfig(local_disk=tmp_path / "a" / ".." / "b", max_local_disk_size=1).local_disk == str(tmp_path / "b")
    relative = CacheConfig(local_disk="kv_disk", max_local_disk_size=1).local_disk
    assert relative == os.path.join(os.getcwd(), "kv_disk")


@pytest.mark.parametrize(
    "url",
    [
        "redis://h",
        "rediss://cache.example:6380",
        "valkey://[::1]:6379",
        "valkeys://user:pw@h/0",
        "REDIS://H:1",
        "unix:///run/redis.sock?db=2",
        "redis-cluster://a:7000,b:7001,c",
        "rediss-cluster://:pw@a:7000",
    ],
)
def test_remote_urls_accepted(url):
    assert load_config({"remote_url": url}, environ=NO_ENV).remote_url == url


def test_to_dict_masks_a_remote_password_and_round_trips():
    config = load_config({"remote_url": "rediss://user:s3cret@h:6380/0"}, environ=NO_ENV)
    assert config.to_dict()["remote_url"] == "rediss://user:***@h:6380/0"
    assert config.remote_url == "rediss://user:s3cret@h:6380/0"
    plain = load_config({"chunk_size": 512, "remote_url": "redis://h"}, environ=NO_ENV)
    assert CacheConfig(**plain.to_dict()) == plain


def test_check_block_size():
    config = CacheConfig(chunk_size=256)
    for block_size in (1, 16, 128, 256):
        config.check_block_size(block_size)
    with pytest.raises(ValueError, match=r"^chunk_size = 256 is not a multiple of block_size = 96: .* e\.g\. 192$"):
        config.check_block_size(96)
    with pytest.raises(ValueError, match=r"^chunk_size = 256 is not a multiple of block_size = 512: .* e\.g\. 512$"):
        config.check_block_size(512)
    for bad in (0, -16, True, 16.0):
        with pytest.raises(ValueError, match=rf"^block_size = {re.escape(repr(bad))}: expected a positive integer"):
            config.check_block_size(bad)


INTEGER_1 = "an integer >= 1"
DISK_SIZE = "a size in GB >= 0, as a number or with a unit like '512M' or '8G'"
HOST_SIZE = "a size in GB > 0, as a number or with a unit like '512M' or '8G' (the host pool, per rank)"
BOOLEAN = "a boolean: true/false, 1/0 or yes/no"
REMOTE_URL = (
    "a URL 'redis://[user:password@]host[:port][/db]' (or rediss:// for TLS; valkey:// and valkeys:// alike), "
    "'unix:///path/to/socket', or 'redis-cluster://host:port,host:port,...' (rediss-cluster:// for TLS), or null"
)
DISK_PATH = "a directory path or 'file:///path', or null for no disk tier"
NAMESPACE = "a printable label of at most 256 characters (e.g. a weights version), or null"

# (key, bad value, what the message says is allowed), each given in the extra config.
BAD_EXTRA_CONFIG_VALUES = [
    ("chunk_size", 0, INTEGER_1 + " (tokens per chunk)"),
    ("chunk_size", True, INTEGER_1 + " (tokens per chunk)"),
    ("chunk_size", 256.0, INTEGER_1 + " (tokens per chunk)"),
    ("chunk_size", "2.5e2", INTEGER_1 + " (tokens per chunk)"),
    ("disk_io_threads", 0, INTEGER_1),
    ("cpu_copy_threads", -1, "an integer in [0, 256] (0 = the default)"),
    ("cpu_copy_threads", 257, "an integer in [0, 256] (0 = the default)"),
    ("max_local_disk_size", -1, DISK_SIZE),
    ("max_local_disk_size", "lots", DISK_SIZE),
    ("max_local_disk_size", "8X", DISK_SIZE),
    ("max_local_disk_size", None, DISK_SIZE),
    ("max_local_cpu_size", False, HOST_SIZE),
    ("max_local_cpu_size", float("inf"), HOST_SIZE),
    ("max_local_cpu_size", float("nan"), HOST_SIZE),
    ("max_local_cpu_size", 0, HOST_SIZE),
    ("local_cpu", 2, BOOLEAN),
    ("local_cpu", None, BOOLEAN),
    ("cache_policy", "LFU", "one of 'LRU' (any case)"),
    ("pin_host_memory", False, "one of 'auto', 'never', 'always' (any case)"),
    (
        "remote_url",
        "http://h:80",
        REMOTE_URL + " (the scheme 'http' is not one of redis, rediss, valkey, valkeys, "
        "unix, redis-cluster, rediss-cluster, valkey-cluster, valkeys-cluster)",
    ),
    ("remote_url", "redis://h:99999", REMOTE_URL + " ('h:99999' is not host[:port] with a port in 1..65535)"),
    ("remote_url", "redis://h:0", REMOTE_URL + " ('h:0' is not host[:port] with a port in 1..65535)"),
    (
        "remote_url",
        "localhost:6379",
        REMOTE_URL + " (the scheme 'localhost:6379' is not one of redis, rediss, "
        "valkey, valkeys, unix, redis-cluster, rediss-cluster, valkey-cluster, valkeys-cluster)",
    ),
    ("remote_url", 6379, REMOTE_URL),
    (
        "remote_url",
        "redis://a:1,b:2",
        REMOTE_URL + " (several hosts are a cluster: use redis-cluster:// (or rediss-cluster://))",
    ),
    (
        "remote_url",
        "unix://relative.sock",
        REMOTE_URL + " (a unix socket needs an absolute path: 'unix:///path/to/socket')",
    ),
    ("remote_timeout_ms", 0, "an integer >= 1 (milliseconds)"),
    ("remote_connections", 65, "an integer in [1, 64] (clients per process)"),
    ("remote_max_value_bytes", 4096, "an integer >= 65536 (bytes; larger chunks are stored in parts)"),
    ("remote_tls_ca_file", "/no/such/ca.pem", "the path of a readable file, or null (no such readable file)"),
    ("remote_key_prefix", "a\nb", "a printable string of at most 256 characters"),
    ("local_disk", "s3://bucket/kv", DISK_PATH),
    ("local_disk", 5, DISK_PATH),
    ("local_disk", "file://host/kv", "'file:///absolute/path' (three slashes: no host)"),
    ("local_disk", "/a/,/b/", "one directory: the disk tier does not span several paths"),
    ("cache_namespace", "v1\nv2", NAMESPACE),
    ("cache_namespace", "x" * 257, NAMESPACE),
    ("cache_namespace", 1.5, NAMESPACE),
    ("async_load", "sometimes", "a boolean: true/false, 1/0 or yes/no, or null (the device decides)"),
]


@pytest.mark.parametrize(("key", "value", "allowed"), BAD_EXTRA_CONFIG_VALUES)
def test_bad_extra_config_value_names_key_value_source_and_what_is_allowed(key, value, allowed):
    with raises_exactly(f"{key} = {value!r} from kv_connector_extra_config: expected {allowed}"):
        load_config({key: value}, environ=NO_ENV)


# (env var, bad text, what the message says is allowed).
BAD_ENV_VALUES = [
    ("LMCACHE_CHUNK_SIZE", "-256", INTEGER_1 + " (tokens per chunk)"),
    ("LMCACHE_CHUNK_SIZE", "abc", INTEGER_1 + " (tokens per chunk)"),
    ("LMCACHE_CHUNK_SIZE", "none", INTEGER_1 + " (tokens per chunk)"),
    ("LMCACHE_MAX_LOCAL_DISK_SIZE", "-2G", DISK_SIZE),
    ("LMCACHE_MAX_LOCAL_DISK_SIZE", "8b", DISK_SIZE),
    ("LMCACHE_LOCAL_CPU", "maybe", BOOLEAN),
    ("LMCACHE_PIN_HOST_MEMORY", "sometimes", "one of 'auto', 'never', 'always' (any case)"),
    ("LMCACHE_CACHE_POLICY", "fifo", "one of 'LRU' (any case)"),
]


@pytest.mark.parametrize(("var", "text", "allowed"), BAD_ENV_VALUES)
def test_bad_env_value_names_key_value_variable_and_what_is_allowed(var, text, allowed):
    key = var.removeprefix("LMCACHE_").lower()
    with raises_exactly(f"{key} = {text!r} from env {var}: expected {allowed}"):
        load_config(environ={var: text})


def test_a_bad_remote_url_is_shown_without_its_password():
    with raises_exactly(
        f"remote_url = 'redis://:***@/0' from env LMCACHE_REMOTE_URL: expected {REMOTE_URL} "
        "('' is not host[:port] with a port in 1..65535)"
    ):
        load_config(environ={"LMCACHE_REMOTE_URL": "redis://:pw@/0"})


def test_secrets_never_show_in_errors_dicts_or_reprs():
    config = load_config(
        {
            "remote_url": "rediss://u:url-secret@h",
            "remote_password": "pw-secret",
            "remote_integrity_key": "integrity-secret-0123",
        },
        environ=NO_ENV,
    )
    shown = repr(config) + str(config.to_dict())
    assert "secret" not in shown and shown.count("***") == 6
    with raises_exactly(
        "remote_integrity_key = '***' from kv_connector_extra_config: expected a string of at "
        "least 16 characters, or null"
    ):
        load_config({"remote_integrity_key": "short-secret"}, environ=NO_ENV)


def test_tls_files_need_a_tls_url_and_a_client_certificate_its_key(tmp_path):
    pem = tmp_path / "ca.pem"
    pem.write_text("x")
    with raises_with("remote_tls_ca_file = ", "needs a TLS remote_url, but remote_url = 'redis://u:***@h'"):
        load_config({"remote_url": "redis://u:pw@h", "remote_tls_ca_file": str(pem)}, environ=NO_ENV)
    with raises_with("remote_tls_cert_file from kv_connector_extra_config is set without its pair"):
        load_config({"remote_url": "rediss://h", "remote_tls_cert_file": str(pem)}, environ=NO_ENV)
    both = load_config(
        {
            "remote_url": "rediss://h",
            "remote_tls_cert_file": str(pem),
            "remote_tls_key_file": str(pem),
            "remote_tls_ca_file": str(pem),
        },
        environ=NO_ENV,
    )
    assert both.remote_tls_ca_file == str(pem)


@pytest.mark.parametrize(
    ("key", "hint"),
    [
        ("chunk_sise", "did you mean 'chunk_size'? "),
        ("lmcache.max_local_cpu_sz", "did you mean 'max_local_cpu_size'? "),
        ("zzz", ""),
    ],
)
def test_unknown_extra_config_key_suggests_and_lists_the_keys(key, hint):
    with raises_exactly(
        f"unknown config key {key!r} (= 1) from kv_connector_extra_config: {hint}expected one of chunk_size, "
        "local_cpu, max_local_cpu_size, local_disk, max_local_disk_size, remote_url, remote_password, "
        "remote_tls_ca_file, remote_tls_cert_file, remote_tls_key_file, remote_tls_verify, remote_timeout_ms, "
        "remote_ttl_s, remote_connections, remote_key_prefix, remote_max_value_bytes, remote_write_backlog, "
        "remote_integrity_key, async_save, async_load, save_unfull_chunk, "
        "save_decode_cache, use_layerwise, cross_layer_blocks, cuda_copy_path, cache_policy, disk_o_direct, disk_io_threads, cpu_copy_threads, "
        "pin_host_memory, cache_namespace, kv_role, pd_wait_ms, pd_marker_ttl_ms, or an LMCache key that lmcache_ext "
        "ignores (lmcache_ext.config.IGNORED_LMCACHE_KEYS)"
    ):
        load_config({key: 1}, environ=NO_ENV)


def test_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_a_bad_value_is_an_error_even_when_a_later_source_overrides_it():
    with raises_with("chunk_size = 'abc' from env LMCACHE_CHUNK_SIZE"):
        load_config({"chunk_size": 512}, environ={"LMCACHE_CHUNK_SIZE": "abc"})


def test_unknown_key_in_the_file_names_the_file(tmp_path):
    env = file_env(tmp_path, "chunk_size: 256\nlocal_dsk: /tmp/x\n")
    with raises_with(
        f"unknown config key 'local_dsk' (= '/tmp/x') from config file {env['LMCACHE_CONFIG_FILE']}: "
        "did you mean 'local_disk'?"
    ):
        load_config(environ=env)


def test_a_bad_file_value_names_the_file(tmp_path):
    env = file_env(tmp_path, "max_local_disk_size: -3\n")
    path = env["LMCACHE_CONFIG_FILE"]
    with raises_exactly(f"max_local_disk_size = -3 from config file {path}: expected {DISK_SIZE}"):
        load_config(environ=env)


def test_direct_construction_is_checked_too():
    with raises_with("chunk_size = 0 from CacheConfig(): expected an integer >= 1"):
        CacheConfig(chunk_size=0)
    assert CacheConfig(cache_policy="lru", max_local_cpu_size="512M").to_dict() == {
        **CacheConfig().to_dict(),
        "max_local_cpu_size": 0.5,
    }


def test_disk_path_with_zero_size_names_both(tmp_path):
    with raises_with(
        f"local_disk = '{tmp_path}' from env LMCACHE_LOCAL_DISK needs a disk size",
        "max_local_disk_size = 0.0 from default",
        "expected max_local_disk_size > 0, or local_disk null",
    ):
        load_config(environ={"LMCACHE_LOCAL_DISK": str(tmp_path)})
    env = file_env(tmp_path, f"local_disk: {tmp_path}\n")
    with raises_with(
        f"from config file {env['LMCACHE_CONFIG_FILE']}", "max_local_disk_size = 0.0 from kv_connector_extra_config"
    ):
        load_config({"max_local_disk_size": "0G"}, environ=env)


def test_disk_path_that_is_a_file(tmp_path):
    regular = tmp_path / "regular"
    regular.write_bytes(b"x")
    with raises_exactly(
        f"local_disk = '{regular}' from kv_connector_extra_config: "
        "expected a writable directory (it is not a directory)"
    ):
        load_config({"local_disk": str(regular), "max_local_disk_size": 1}, environ=NO_ENV)


def test_disk_path_under_a_file_can_never_be_created(tmp_path):
    regular = tmp_path / "regular"
    regular.write_bytes(b"x")
    path = regular / "sub" / "kv"
    with raises_with(
        f"local_disk = '{path}' from kv_connector_extra_config: expected a writable directory "
        f"(its nearest existing parent '{regular}' is not a directory)"
    ):
        load_config({"local_disk": str(path), "max_local_disk_size": 1}, environ=NO_ENV)


def test_disk_path_that_does_not_exist_yet_is_accepted(tmp_path):
    config = load_config({"local_disk": f"file://{tmp_path}/a/b/", "max_local_disk_size": "512M"}, environ=NO_ENV)
    assert (config.local_disk, config.disk_bytes) == (str(tmp_path / "a" / "b"), 512 * 1024**2)
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("below", [False, True], ids=["the-dir", "a-path-below"])
def test_read_only_dir_check_agrees_with_the_os(tmp_path, below):
    """A 0o500 directory stops writes for a normal user, not for root: the check must say what the OS does."""
    read_only = tmp_path / "ro"
    read_only.mkdir(mode=0o500)
    path = read_only / "kv" if below else read_only
    try:
        (read_only / "probe").write_bytes(b"")
        os_allows_writes = True
    except PermissionError:
        os_allows_writes = False
    overrides = {"local_disk": str(path), "max_local_disk_size": 1}
    if os_allows_writes:
        assert load_config(overrides, environ=NO_ENV).local_disk == str(path)
    else:
        what = f"its nearest existing parent '{read_only}'" if below else "it"
        with raises_with(f"local_disk = '{path}'", f"({what} is not writable)"):
            load_config(overrides, environ=NO_ENV)


def test_missing_config_file(tmp_path):
    path = tmp_path / "absent.yaml"
    with raises_with(f"LMCACHE_CONFIG_FILE = '{path}': cannot read the config file (No such file or directory)"):
        load_config(environ={"LMCACHE_CONFIG_FILE": str(path)})


def test_unreadable_config_file(tmp_path):
    with raises_with(f"LMCACHE_CONFIG_FILE = '{tmp_path}': cannot read the config file (Is a directory)"):
        load_config(environ={"LMCACHE_CONFIG_FILE": str(tmp_path)})


@pytest.mark.parametrize(("text", "kind"), [("- chunk_size\n- 256\n", "list"), ("just words\n", "str"), ("7\n", "int")])
def test_config_file_top_level_must_be_a_mapping(tmp_path, text, kind):
    env = file_env(tmp_path, text)
    path = env["LMCACHE_CONFIG_FILE"]
    with raises_exactly(f"LMCACHE_CONFIG_FILE = '{path}': the top level is a {kind}; expected a mapping of keys"):
        load_config(environ=env)


def test_config_file_that_is_not_yaml(tmp_path):
    env = file_env(tmp_path, "chunk_size: [256\n")
    with raises_with(f"LMCACHE_CONFIG_FILE = '{env['LMCACHE_CONFIG_FILE']}': not valid YAML"):
        load_config(environ=env)


def test_the_layout_asked_of_vllm_is_cross_layer_unless_layerwise_turned_off_or_mla():
    assert load_config({}, environ=NO_ENV).required_kv_layout() == "BLNHC"
    assert load_config({"cross_layer_blocks": True}, environ=NO_ENV).required_kv_layout(mla=True) is None
    assert load_config({"cross_layer_blocks": True}, environ=NO_ENV).required_kv_layout() == "BLNHC"
    assert load_config({"cross_layer_blocks": False}, environ=NO_ENV).required_kv_layout() is None
    assert load_config({"use_layerwise": True}, environ=NO_ENV).required_kv_layout() is None


def test_cuda_copy_path_is_kernel_or_dma():
    assert load_config({"cuda_copy_path": "dma"}, environ=NO_ENV).cuda_copy_path == "dma"
    with raises_with("cuda_copy_path = 'sm'"):
        load_config({"cuda_copy_path": "sm"}, environ=NO_ENV)


def test_the_host_pool_is_the_host_tier_or_only_staging_slots():
    on = load_config({"max_local_cpu_size": 1}, environ={})
    off = load_config({"max_local_cpu_size": 1, "local_cpu": False}, environ={})
    assert HostSlotPool.slots_for_config(on, 1 << 20) == GB >> 20
    assert HostSlotPool.slots_for_config(off, 1 << 20) == STAGING_SLOTS
    # slots smaller than a page still sit on a 4096-byte stride: staging needs whole strides
    assert HostSlotPool.slots_for_config(off, 100) == STAGING_SLOTS
    pool = HostSlotPool.for_config(off, 100)
    assert (pool.num_slots, pool.slot_bytes) == (STAGING_SLOTS, 100)


def test_a_remote_url_without_the_remote_client_installed_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "glide_sync", None)  # what import does for a module that is not there
    with raises_exactly(
        "remote_url = 'redis://u:***@h' from kv_connector_extra_config needs the remote tier's client, "
        "which is not installed: pip install 'lmcache_ext[remote]' (valkey-glide-sync), or remote_url null"
    ):
        load_config({"remote_url": "redis://u:pw@h"}, environ=NO_ENV)
