"""The cache's configuration: one frozen dataclass, where its values come from, and their checks.

Keys use LMCache's names wherever the meaning is the same, so an LMCache config
file, LMCache environment variables and LMCache's ``lmcache.``-prefixed vLLM
``kv_connector_extra_config`` keys work unchanged.

Sources, later winning (see `load_config`):

1. the defaults below;
2. the YAML file named by env ``LMCACHE_CONFIG_FILE`` (unset or empty: no file;
   an empty file is an empty mapping);
3. env ``LMCACHE_<KEY>`` for each key (upper case), e.g. ``LMCACHE_CHUNK_SIZE=512``.
   Only those names and the known-ignored LMCache keys' names are read; every other
   ``LMCACHE_*`` variable is left alone without a word, because LMCache and its
   tooling set variables of their own (``LMCACHE_USE_EXPERIMENTAL``,
   ``LMCACHE_LOG_LEVEL``, ...) that are not cache settings;
4. a mapping, e.g. vLLM's ``kv_connector_extra_config``; a key may carry LMCache's
   ``lmcache.`` prefix.

Every value from every source is checked when it is read, so a bad value is an
error even when a later source overrides it (invariant 7). Strings are coerced: booleans read
true/false/1/0/yes/no (any case); ``null``, ``none`` and the empty string mean None
where None is allowed; the two sizes take a number of GB or a number with a unit
(``"512M"``, ``"8G"``, ``"1.5T"``, any case, an optional ``B``/``iB``). A GB here is
1024**3 bytes, as in LMCache.

LMCache keys for features this cache does not have (`IGNORED_LMCACHE_KEYS`) are
accepted with a warning naming each, so an LMCache config still loads; any other
unknown key is a `ConfigError` with a did-you-mean suggestion.
"""

from __future__ import annotations

import difflib
import importlib
import logging
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import InitVar, dataclass, field, fields
from typing import Any

import yaml

from lmcache_ext.remote_url import FORMS, mask_password, parse_remote_url

logger = logging.getLogger(__name__)

GB = 1024**3
"""Bytes in one GB of a size setting (LMCache's "GB" is a GiB)."""

STAGING_SLOTS = 8
"""Host slots kept when ``local_cpu`` is off: enough to stage transfers to and from disk."""

MAX_CPU_COPY_THREADS = 256
"""The CPU copy twins' thread pool takes at most this many threads (csrc/page_copy_cpu.cpp)."""

CONFIG_FILE_ENV = "LMCACHE_CONFIG_FILE"
ENV_PREFIX = "LMCACHE_"
EXTRA_CONFIG_PREFIX = "lmcache."
EXTRA_CONFIG_SOURCE = "kv_connector_extra_config"
DEFAULT_SOURCE = "default"
DIRECT_SOURCE = "CacheConfig()"

SECRET_KEYS = ("remote_password", "remote_integrity_key")
"""Settings never shown: in messages, logs, to_dict() and repr() they read ``***``."""
CACHE_POLICIES = ("LRU",)
KV_ROLES = ("kv_both", "kv_producer", "kv_consumer")
"""vLLM's kv_role: both (an ordinary instance), a prefill instance, a decode instance."""
PIN_HOST_MEMORY_MODES = ("auto", "never", "always")
CUDA_COPY_PATHS = ("kernel", "dma")
"""How a CUDA cache's pages move to and from host slots: SM copy kernels, or the copy
engines (cudaMemcpyBatchAsync) for runs of contiguous pages."""
CROSS_LAYER_LAYOUT = "BLNHC"
"""The layout asked of vLLM for cross-layer blocks: block outermost, then layer, then
FlashAttention's token-major order inside a page."""

_IGNORED_BY_FEATURE: dict[str, tuple[str, ...]] = {
    "remote serialisation (chunks are stored as raw bytes)": ("remote_serde",),
    "P2P sharing": ("enable_p2p", "p2p_host", "p2p_init_ports", "p2p_lookup_ports"),
    "disaggregated prefill": (
        "enable_pd",
        "enable_xpyd",
        "pd_role",
        "pd_buffer_size",
        "pd_buffer_device",
        "pd_peer_host",
        "pd_peer_init_port",
        "pd_peer_alloc_port",
        "pd_proxy_host",
        "pd_proxy_port",
        "transfer_channel",
        "nixl_backends",
        "nixl_buffer_size",
        "nixl_buffer_device",
        "nixl_role",
    ),
    "the cache controller": (
        "enable_controller",
        "lmcache_instance_id",
        "controller_url",
        "controller_pull_url",
        "controller_reply_url",
        "lmcache_worker_ports",
    ),
    "CacheBlend": (
        "enable_blending",
        "blend_recompute_ratios",
        "blend_thresholds",
        "blend_check_layers",
        "blend_min_tokens",
        "blend_special_str",
    ),
    "the internal API server": (
        "internal_api_server_enabled",
        "internal_api_server_host",
        "internal_api_server_port_start",
    ),
    "LMCache's own engine tuning": (
        "use_experimental",
        "blocking_timeout_secs",
        "pre_caching_hash_algorithm",
        "py_enable_gc",
        "extra_config",
        "numa_mode",
        "enable_async_loading",
        "lookup_timeout_ms",
        "min_retrieve_tokens",
        "local_disk_path_sharding",
        "reserve_local_cpu_size",
        "local_cpu_use_hugepages",
    ),
}
IGNORED_LMCACHE_KEYS: Mapping[str, str] = {
    key: feature for feature, keys in _IGNORED_BY_FEATURE.items() for key in keys
}
"""LMCache keys accepted and ignored with a warning, each mapped to the feature it belongs to."""


class ConfigError(ValueError):
    """A config value that cannot be used; the message names key, value, source and what is allowed."""


def _fail(key: str, value: Any, source: str, expected: str) -> ConfigError:
    return ConfigError(f"{key} = {_shown(key, value)} from {source}: expected {expected}")


def _shown(key: str, value: Any) -> str:
    """repr of a value for messages and logs, with secrets and a URL's password masked."""
    if key in SECRET_KEYS and value is not None:
        return "'***'"
    if key == "remote_url" and isinstance(value, str):
        return repr(mask_password(value))
    return repr(value)


# Parsers: (key, raw value, source) -> the typed value, or a ConfigError. Each is
# idempotent on its own output, so a parsed value may be parsed again.

_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no")
_NULLS = ("null", "none", "")
_INTEGER = re.compile(r"[+-]?[0-9]+")
_SIZE = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:([kmgt])(?:i?b)?)?", re.IGNORECASE)
_SIZE_UNITS = {"k": 1024**-2, "m": 1024**-1, "g": 1.0, "t": 1024.0}


def _parse_bool(key: str, value: Any, source: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise _fail(key, value, source, "a boolean: true/false, 1/0 or yes/no")


def _parse_optional_bool(key: str, value: Any, source: str) -> bool | None:
    """None (null: the device decides), or a boolean."""
    if _is_null(value):
        return None
    try:
        return _parse_bool(key, value, source)
    except ConfigError:
        raise _fail(key, value, source, "a boolean: true/false, 1/0 or yes/no, or null (the device decides)") from None


def _int_parser(minimum: int, meaning: str, maximum: int | None = None) -> Callable[[str, Any, str], int]:
    bounds = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
    expected = f"an integer {bounds}{meaning}"

    def parse(key: str, value: Any, source: str) -> int:
        if isinstance(value, str) and _INTEGER.fullmatch(value.strip()):
            number = int(value)
        elif isinstance(value, int) and not isinstance(value, bool):
            number = value
        else:
            raise _fail(key, value, source, expected)
        if number < minimum or (maximum is not None and number > maximum):
            raise _fail(key, value, source, expected)
        return number

    return parse


def _size_parser(positive: bool, meaning: str) -> Callable[[str, Any, str], float]:
    bound = "> 0" if positive else ">= 0"
    expected = f"a size in GB {bound}, as a number or with a unit like '512M' or '8G'{meaning}"

    def parse(key: str, value: Any, source: str) -> float:
        if isinstance(value, str) and (match := _SIZE.fullmatch(value.strip())):
            number, unit = match.groups()
            gb = float(number) * _SIZE_UNITS[(unit or "g").lower()]
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            gb = float(value)
        else:
            raise _fail(key, value, source, expected)
        if gb < 0 or (positive and gb == 0):
            raise _fail(key, value, source, expected)
        return gb

    return parse


def _choice_parser(allowed: tuple[str, ...]) -> Callable[[str, Any, str], str]:
    expected = "one of " + ", ".join(repr(a) for a in allowed) + " (any case)"
    by_folded = {a.casefold(): a for a in allowed}

    def parse(key: str, value: Any, source: str) -> str:
        if isinstance(value, str) and value.strip().casefold() in by_folded:
            return by_folded[value.strip().casefold()]
        raise _fail(key, value, source, expected)

    return parse


def _is_null(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip().lower() in _NULLS)


def _parse_local_disk(key: str, value: Any, source: str) -> str | None:
    """None, or the absolute directory path of a plain path or LMCache's ``file:///path``."""
    if _is_null(value):
        return None
    expected = "a directory path or 'file:///path', or null for no disk tier"
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str):
        raise _fail(key, value, source, expected)
    path = value.strip()
    if path.startswith("file://"):
        path = path[len("file://") :]
        if not path.startswith("/"):
            raise _fail(key, value, source, "'file:///absolute/path' (three slashes: no host)")
    elif "://" in path:
        raise _fail(key, value, source, expected)
    if "," in path:
        raise _fail(key, value, source, "one directory: the disk tier does not span several paths")
    return os.path.abspath(os.path.expanduser(path))


def _parse_cache_namespace(key: str, value: Any, source: str) -> str:
    """ "" (none), or a printable label of up to 256 characters; a YAML number is read as its text."""
    if _is_null(value):
        return ""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or len(value.strip()) > 256 or not value.strip().isprintable():
        raise _fail(key, value, source, "a printable label of at most 256 characters (e.g. a weights version), or null")
    return value.strip()


def _parse_remote_url(key: str, value: Any, source: str) -> str | None:
    """None, or a Redis/Valkey URL of a form `remote_url.parse_remote_url` takes (nothing is contacted)."""
    if _is_null(value):
        return None
    if not isinstance(value, str):
        raise _fail(key, value, source, f"a URL {FORMS}, or null")
    try:
        parse_remote_url(value)
    except ValueError as exc:
        raise _fail(key, value, source, f"a URL {FORMS}, or null ({exc})") from None
    return value.strip()


def _parse_secret(minimum: int) -> Callable[[str, Any, str], str | None]:
    def parse(key: str, value: Any, source: str) -> str | None:
        if _is_null(value):
            return None
        if not isinstance(value, str) or len(value) < minimum:
            raise _fail(key, value, source, f"a string of at least {minimum} characters, or null")
        return value

    return parse


def _parse_text(key: str, value: Any, source: str) -> str:
    if not isinstance(value, str) or not value.isprintable() or len(value) > 256:
        raise _fail(key, value, source, "a printable string of at most 256 characters")
    return value


def _parse_file(key: str, value: Any, source: str) -> str | None:
    """None, or the absolute path of a readable file (a TLS certificate or key)."""
    if _is_null(value):
        return None
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str):
        raise _fail(key, value, source, "the path of a readable file, or null")
    path = os.path.abspath(os.path.expanduser(value.strip()))
    if not os.path.isfile(path) or not os.access(path, os.R_OK):
        raise _fail(key, value, source, "the path of a readable file, or null (no such readable file)")
    return path


@dataclass(frozen=True)
class CacheConfig:
    """The cache's settings, checked and immutable; build it with `load_config`.

    Direct construction runs the same checks, naming the source ``CacheConfig()``.
    ``async_load`` null lets the device decide: on for a CUDA engine, off for a
    CPU one, whose steps last seconds, so a request parked for a background load
    waits behind a whole step (measured in benchmarks/RESULTS.md).
    ``cache_namespace`` enters every key: operators who change a
    model's weights without a cache reset set a new one per weights version.
    ``save_unfull_chunk`` is on by default (LMCache's is off): a grown prompt then
    hits its predecessor's last partial chunk too, as vLLM's prefix cache does
    (a chat's later rounds: benchmarks/RESULTS.md).
    ``kv_role`` is vLLM's (the connector sets it): a ``kv_producer`` (prefill
    instance) stores and never loads, a ``kv_consumer`` (decode instance) loads and
    stores only with ``save_decode_cache``, waiting up to ``pd_wait_ms`` for chunks a
    producer has marked in flight in the remote tier (its markers expire after
    ``pd_marker_ttl_ms``: a crashed producer's cost a bounded wait).
    """

    chunk_size: int = field(default=256, metadata={"parse": _int_parser(1, " (tokens per chunk)")})
    local_cpu: bool = field(default=True, metadata={"parse": _parse_bool})
    max_local_cpu_size: float = field(default=5.0, metadata={"parse": _size_parser(True, " (the host pool, per rank)")})
    local_disk: str | None = field(default=None, metadata={"parse": _parse_local_disk})
    max_local_disk_size: float = field(default=0.0, metadata={"parse": _size_parser(False, "")})
    remote_url: str | None = field(default=None, metadata={"parse": _parse_remote_url})
    remote_password: str | None = field(default=None, metadata={"parse": _parse_secret(1)})
    remote_tls_ca_file: str | None = field(default=None, metadata={"parse": _parse_file})
    remote_tls_cert_file: str | None = field(default=None, metadata={"parse": _parse_file})
    remote_tls_key_file: str | None = field(default=None, metadata={"parse": _parse_file})
    remote_tls_verify: bool = field(default=True, metadata={"parse": _parse_bool})
    remote_timeout_ms: int = field(default=1000, metadata={"parse": _int_parser(1, " (milliseconds)")})
    remote_ttl_s: int = field(default=0, metadata={"parse": _int_parser(0, " (seconds; 0 = no expiry)")})
    remote_connections: int = field(default=2, metadata={"parse": _int_parser(1, " (clients per process)", 64)})
    remote_key_prefix: str = field(default="lmcache_ext:", metadata={"parse": _parse_text})
    remote_max_value_bytes: int = field(
        default=4 << 20, metadata={"parse": _int_parser(65536, " (bytes; larger chunks are stored in parts)")}
    )
    remote_write_backlog: int = field(
        default=32, metadata={"parse": _int_parser(1, " (remote writes in flight; more are skipped)")}
    )
    remote_integrity_key: str | None = field(default=None, metadata={"parse": _parse_secret(16)})
    async_save: bool = field(default=True, metadata={"parse": _parse_bool})
    async_load: bool | None = field(default=None, metadata={"parse": _parse_optional_bool})
    save_unfull_chunk: bool = field(default=True, metadata={"parse": _parse_bool})
    save_decode_cache: bool = field(default=False, metadata={"parse": _parse_bool})
    use_layerwise: bool = field(default=False, metadata={"parse": _parse_bool})
    cross_layer_blocks: bool | None = field(default=None, metadata={"parse": _parse_optional_bool})
    cuda_copy_path: str = field(default="kernel", metadata={"parse": _choice_parser(CUDA_COPY_PATHS)})
    cache_policy: str = field(default="LRU", metadata={"parse": _choice_parser(CACHE_POLICIES)})
    disk_o_direct: bool = field(default=True, metadata={"parse": _parse_bool})
    disk_io_threads: int = field(default=2, metadata={"parse": _int_parser(1, "")})
    cpu_copy_threads: int = field(
        default=0, metadata={"parse": _int_parser(0, " (0 = the default)", MAX_CPU_COPY_THREADS)}
    )
    pin_host_memory: str = field(default="auto", metadata={"parse": _choice_parser(PIN_HOST_MEMORY_MODES)})
    cache_namespace: str = field(default="", metadata={"parse": _parse_cache_namespace})
    kv_role: str = field(default="kv_both", metadata={"parse": _choice_parser(KV_ROLES)})
    pd_wait_ms: int = field(default=5000, metadata={"parse": _int_parser(0, " (milliseconds; 0 = never wait)")})
    pd_marker_ttl_ms: int = field(default=30000, metadata={"parse": _int_parser(1, " (milliseconds)")})
    sources: InitVar[Mapping[str, str] | None] = None

    def __post_init__(self, sources: Mapping[str, str] | None) -> None:
        source_of = {f.name: DIRECT_SOURCE for f in fields(self)} | dict(sources or {})
        for f in fields(self):
            object.__setattr__(self, f.name, f.metadata["parse"](f.name, getattr(self, f.name), source_of[f.name]))
        self._check_disk(source_of)
        self._check_remote(source_of)

    def _check_disk(self, source_of: Mapping[str, str]) -> None:
        """With a disk path: a size above 0, and a writable directory there or creatable there."""
        if self.local_disk is None:
            return
        if self.max_local_disk_size == 0:
            raise ConfigError(
                f"local_disk = {self.local_disk!r} from {source_of['local_disk']} needs a disk size, but "
                f"max_local_disk_size = {self.max_local_disk_size!r} from {source_of['max_local_disk_size']}: "
                "expected max_local_disk_size > 0, or local_disk null"
            )
        problem = _unwritable_reason(self.local_disk)
        if problem:
            raise _fail("local_disk", self.local_disk, source_of["local_disk"], f"a writable directory ({problem})")

    def _check_remote(self, source_of: Mapping[str, str]) -> None:
        """TLS files only with a TLS URL, a client certificate only with its key."""
        tls_keys = ("remote_tls_ca_file", "remote_tls_cert_file", "remote_tls_key_file")
        endpoint = parse_remote_url(self.remote_url) if self.remote_url else None
        if endpoint is not None and not _importable("glide_sync"):
            raise ConfigError(
                f"remote_url = {_shown('remote_url', self.remote_url)} from {source_of['remote_url']} needs the "
                "remote tier's client, which is not installed: pip install 'lmcache_ext[remote]' "
                "(valkey-glide-sync), or remote_url null"
            )
        for key in tls_keys:
            value = getattr(self, key)
            if value is not None and (endpoint is None or not endpoint.tls):
                raise ConfigError(
                    f"{key} = {value!r} from {source_of[key]} needs a TLS remote_url, but remote_url = "
                    f"{_shown('remote_url', self.remote_url)} from {source_of['remote_url']}: expected "
                    "rediss://, valkeys:// or rediss-cluster://"
                )
        if (self.remote_tls_cert_file is None) != (self.remote_tls_key_file is None):
            have = "remote_tls_cert_file" if self.remote_tls_cert_file else "remote_tls_key_file"
            raise ConfigError(
                f"{have} from {source_of[have]} is set without its pair: expected both remote_tls_cert_file "
                "and remote_tls_key_file, or neither"
            )

    @property
    def loads(self) -> bool:
        """Whether hits are looked up and loaded: not on a prefill instance (kv_producer)."""
        return self.kv_role != "kv_producer"

    @property
    def stores(self) -> bool:
        """Whether computed chunks are stored: not on a decode instance (kv_consumer)
        unless it keeps its decode caches (save_decode_cache)."""
        return self.kv_role != "kv_consumer" or self.save_decode_cache

    @property
    def announces_stores(self) -> bool:
        """A prefill instance with a remote tier marks its chunks in flight there, so a
        decode instance waits for them instead of missing."""
        return self.kv_role == "kv_producer" and self.remote_url is not None

    @property
    def pd_wait_s(self) -> float:
        """How long a decode instance waits for chunks in flight (0 elsewhere)."""
        return self.pd_wait_ms / 1000 if self.kv_role == "kv_consumer" and self.remote_url else 0.0

    @property
    def host_bytes(self) -> int:
        """max_local_cpu_size in bytes (GB of 1024**3 bytes)."""
        return round(self.max_local_cpu_size * GB)

    def loads_async(self, device_type: str) -> bool:
        """Whether lower-tier hits load in the background on a `device_type` engine
        (``async_load``, or when null: on for CUDA, off for a CPU engine)."""
        return self.async_load if self.async_load is not None else device_type != "cpu"

    @property
    def disk_bytes(self) -> int:
        """Byte cap of the disk tier (max_local_disk_size GB of 1024**3 bytes); 0 without one."""
        return round(self.max_local_disk_size * GB) if self.local_disk is not None else 0

    def check_block_size(self, block_size: int) -> None:
        """Raise ValueError unless chunk_size is a whole number of blocks of `block_size` tokens."""
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
            raise ValueError(f"block_size = {block_size!r}: expected a positive integer (tokens per block)")
        if self.chunk_size % block_size:
            raise ValueError(
                f"chunk_size = {self.chunk_size} is not a multiple of block_size = {block_size}: "
                f"expected a chunk_size of whole blocks, e.g. {block_size * max(1, self.chunk_size // block_size)}"
            )

    def required_kv_layout(self, *, mla: bool = False) -> str | None:
        """The KV layout to ask vLLM for: cross-layer blocks (BLNHC) where whole steps move
        (cross_layer_blocks unset or true, use_layerwise off), else no preference. Never
        for an MLA model (`mla`): vLLM's MLA backends declare no layouts, yet several
        (CPU_MLA, AMX_MLA, FlashInfer MLA, ROCm AITER MLA) view a layer's cache as one
        contiguous tensor, which a cross-layer view is not; an MLA page (one latent
        per token) is already a large piece to copy."""
        if self.use_layerwise or self.cross_layer_blocks is False or mla:
            return None
        return CROSS_LAYER_LAYOUT

    def to_dict(self) -> dict[str, Any]:
        """The settings by key, for logs; a password in remote_url is masked."""
        settings = {f.name: getattr(self, f.name) for f in fields(self)}
        if self.remote_url is not None:
            settings["remote_url"] = mask_password(self.remote_url)
        for key in SECRET_KEYS:
            if settings[key] is not None:
                settings[key] = "***"
        return settings

    def __repr__(self) -> str:
        return "CacheConfig(" + ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items()) + ")"


def _importable(module: str) -> bool:
    """Whether `module` imports: a package that is found but fails to import (a broken or
    hidden install) counts as missing, so the start-up error names it instead of a crash
    deep in a tier."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def _unwritable_reason(path: str) -> str:
    """Why the engine could not keep files in `path` (creating it if absent); '' when it can."""
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    what = "it" if existing == path else f"its nearest existing parent {existing!r}"
    if not os.path.isdir(existing):
        return f"{what} is not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{what} is not writable"
    return ""


_FIELDS = {f.name: f for f in fields(CacheConfig)}


def load_config(overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None) -> CacheConfig:
    """Build the config from defaults, the LMCACHE_CONFIG_FILE YAML, LMCACHE_* env vars and
    `overrides` (vLLM's kv_connector_extra_config), later sources winning.

    `environ` defaults to os.environ. Raises ConfigError naming the key, value and source.
    """
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    sources = {name: DEFAULT_SOURCE for name in _FIELDS}
    for key, value, source in _read_sources(overrides or {}, environ):
        if key in _FIELDS:
            values[key] = _FIELDS[key].metadata["parse"](key, value, source)
            sources[key] = source
        else:
            logger.warning(
                "ignoring LMCache key %s = %s from %s: lmcache_ext does not implement %s",
                key,
                _shown(key, value),
                source,
                IGNORED_LMCACHE_KEYS[key],
            )
    return CacheConfig(**values, sources=sources)


def _read_sources(overrides: Mapping[str, Any], environ: Mapping[str, str]) -> Iterator[tuple[str, Any, str]]:
    """(key, raw value, source) of each setting, lowest precedence first; unknown keys raise."""
    path = environ.get(CONFIG_FILE_ENV)
    if path:
        source = f"config file {path}"
        yield from _known(_read_yaml(path).items(), source, lambda key: key)
    for key in (*_FIELDS, *IGNORED_LMCACHE_KEYS):
        name = ENV_PREFIX + key.upper()
        if name in environ:
            yield key, environ[name], f"env {name}"
    yield from _known(overrides.items(), EXTRA_CONFIG_SOURCE, _strip_extra_prefix)


def _known(
    items: Iterable[tuple[Any, Any]], source: str, to_key: Callable[[Any], Any]
) -> Iterator[tuple[str, Any, str]]:
    """The items of one mapping source as settings; a key that is neither ours nor LMCache's raises."""
    for raw_key, value in items:
        key = to_key(raw_key)
        if key not in _FIELDS and key not in IGNORED_LMCACHE_KEYS:
            raise _unknown_key(raw_key, value, source)
        yield key, value, source


def _strip_extra_prefix(key: Any) -> Any:
    return key[len(EXTRA_CONFIG_PREFIX) :] if isinstance(key, str) and key.startswith(EXTRA_CONFIG_PREFIX) else key


def _unknown_key(key: Any, value: Any, source: str) -> ConfigError:
    close = difflib.get_close_matches(str(_strip_extra_prefix(key)), list(_FIELDS), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return ConfigError(
        f"unknown config key {key!r} (= {value!r}) from {source}: {hint}"
        f"expected one of {', '.join(_FIELDS)}, or an LMCache key that lmcache_ext ignores "
        "(lmcache_ext.config.IGNORED_LMCACHE_KEYS)"
    )


def _read_yaml(path: str) -> dict[Any, Any]:
    """The top-level mapping of the YAML file at `path` (an empty file is an empty mapping)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"{CONFIG_FILE_ENV} = {path!r}: cannot read the config file ({e.strerror})") from e
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{CONFIG_FILE_ENV} = {path!r}: not valid YAML ({e})") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{CONFIG_FILE_ENV} = {path!r}: the top level is a {type(data).__name__}; expected a mapping of keys"
        )
    return data
