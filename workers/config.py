"""Configuration in one place: flags, `CCARCHIVE_*` environment variables, a TOML file and,
for users migrating from cc-backend, the `metric-store` section of its `config.json`.

Precedence (highest first): arguments (CLI flags) > environment > TOML file (`config`) >
cc-backend config (`cc_backend_config`) > defaults. Every process (CLI, embedded runner,
Celery worker, beat) builds one `Settings` and passes plain values from it to the steps,
which never read the environment themselves.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import ssl
import tomllib
from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

# Celery-free: the settings check routes and queue names with the distributed pipeline's rules.
from .distributed.routing import check_queue, parse_routes

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_UNIT_SECONDS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
# Go's time.Duration is int64 nanoseconds: ParseDuration refuses anything longer.
_MAX_DURATION_SECONDS = (2**63 - 1) / 1e9


def _state_dir() -> Path:
    """Where this machine keeps the archiver's own records.

    `$STATE_DIRECTORY` (systemd sets it for `StateDirectory=ccarchive`: /var/lib/ccarchive,
    already ours), else `$XDG_STATE_HOME/ccarchive`, else `~/.local/state/ccarchive`.
    """
    # systemd joins several StateDirectory= entries with ':'; the first is ours.
    service = (os.environ.get("STATE_DIRECTORY") or "").split(":")[0]
    if service:
        return Path(service)
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "state"
    )
    return Path(base) / "ccarchive"


def default_workers() -> int:
    """cc-backend's default (`min(NumCPU/2+1, 10)`): the node is shared with the metric store."""
    return min((os.cpu_count() or 1) // 2 + 1, 10)


def location_id(url: str) -> str:
    """A location as one canonical string: the same place always gives the same string.

    Local paths (and file:// URLs) are resolved (`ar` and its absolute path are one
    place, `arc` in two working directories are two); S3 becomes `s3://bucket/prefix`.
    """
    from .roots import location_key  # deferred: config stays importable on its own

    kind, parts = location_key(url)
    return "/" + "/".join(parts) if kind == "file" else f"{kind}://" + "/".join(parts)


def default_run_log(where: str) -> str:
    """The default run-record directory of an archive (or checkpoint root, in delete mode)."""
    key = hashlib.sha1(location_id(where).encode()).hexdigest()[:12]
    return str(_state_dir() / "runs" / key)


def parse_duration(text: str) -> float:
    """Seconds in a Go duration string such as `48h`, `1h30m` or `90s`; ValueError if invalid."""
    s = text.strip()
    if s in ("0", "+0", "-0"):
        return 0.0
    sign = -1.0 if s.startswith("-") else 1.0
    body = s.lstrip("+-")
    pos, total = 0, 0.0
    while pos < len(body):
        m = _DURATION_PART.match(body, pos)
        if m is None:
            raise ValueError(f"invalid duration {text!r} (expected e.g. 48h, 1h30m, 90s)")
        total += float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
        pos = m.end()
    if not body:
        raise ValueError(f"invalid duration {text!r} (expected e.g. 48h, 1h30m, 90s)")
    if total > _MAX_DURATION_SECONDS:  # also "inf" from hundreds of digits
        raise ValueError(f"invalid duration {text!r} (longer than Go's maximum, about 292 years)")
    return sign * total


class Settings(BaseSettings):
    """All settings of the archiver; env vars are the field names upper-cased, prefixed CCARCHIVE_.

    Documented for operators in docs/operations.md (every setting, where it can come from),
    docs/distributed.md (broker, queues, routes, timeouts, Redis password and TLS) and
    docs/s3.md (`s3_*`). Secrets (`s3_secret_access_key`, `s3_session_token`) are
    SecretStr; a password in `broker_url`/`result_backend` is masked in `repr()`.
    """

    model_config = SettingsConfigDict(env_prefix="CCARCHIVE_", extra="ignore")

    # Where more settings come from (`--config`, `--cc-backend-config`); see `load_settings`.
    config: str | None = None  # TOML file; keys are the field names below
    cc_backend_config: str | None = None  # cc-backend config.json (its "metric-store" section)

    # Observability (workers.metrics, workers.logs); see docs/operations.md.
    metrics_port: int = Field(default=0, ge=0, le=65535)  # Prometheus endpoint; 0 = off
    metrics_addr: str = "0.0.0.0"  # address the endpoint binds; Prometheus scrapes remotely
    metrics_textfile: str | None = None  # also write a node_exporter textfile (one-shot runs)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "WARNING"
    # Run records for `ccarchive status` (<run_log>/<cluster>/<end>-<run_id>.json), a
    # directory or URL such as <archive>/_runs ("_": skipped by dataset readers). Unset: a
    # directory per archive under $STATE_DIRECTORY, $XDG_STATE_HOME or ~/.local/state (see
    # `_state_dir`); "off": none. Pruned after each record: the newest `run_log_keep` per
    # cluster, none older than `run_log_max_age`.
    run_log: str | None = None
    run_log_keep: int = Field(default=500, ge=1)
    run_log_max_age: str = "2160h"  # 90 days

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Highest first: arguments > CCARCHIVE_* env > TOML file > cc-backend config > defaults."""
        # Each file source finds its path among what the sources before it produced, so
        # `--config` or CCARCHIVE_CONFIG names the TOML file, and the TOML file (or a flag,
        # or the env) may name the cc-backend config.
        return (
            init_settings,
            env_settings,
            TomlConfigSource(settings_cls),
            CcBackendConfigSource(settings_cls),
        )

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    checkpoints: str | None = None
    archive: str | None = None
    staging: str | None = None
    mode: Literal["archive", "delete"] = "archive"
    retention: str | None = None  # Go duration, e.g. "48h"
    interval: str | None = None  # beat interval; defaults to the retention
    workers: int = Field(default_factory=lambda: default_workers(), ge=1)

    # redis:// or rediss:// (TLS); a password goes in the URL: redis://:PASSWORD@host:6379/0.
    # Log lines, `repr(settings)` and task messages only ever show it masked (`mask_url`).
    broker_url: str = "redis://127.0.0.1:6379/0"
    result_backend: str | None = None  # defaults to the broker
    # TLS for rediss:// URLs (broker, results, locks). The server certificate is always
    # verified: against this CA bundle (PEM), or the system's CAs when unset. A URL's own
    # `ssl_*` query parameters (Celery style, e.g. ?ssl_cert_reqs=CERT_REQUIRED) win.
    redis_ca_cert: str | None = None
    redis_client_cert: str | None = None  # mutual TLS (`tls-auth-clients yes`): PEM cert
    redis_client_key: str | None = None  # ... and its key

    # Distributed pipeline (workers.distributed); see docs/distributed.md.
    default_queue: str = "celery"  # plan, discovery, launch, and hosts no route matches
    finalize_queue: str | None = None  # finalize + staging cleanup; None: the default queue
    # JSON object in CCARCHIVE_ROUTES, e.g. {"fritz": "storage-a", "alex/a0*": "storage-b"}
    routes: dict[str, str] = Field(default_factory=dict)
    task_retries: int = Field(default=2, ge=0)  # extra attempts of a failing load/finalize
    retry_delay: float = Field(default=10.0, ge=0)  # seconds before the first retry, doubling
    visibility_timeout: str = "2h"  # Redis redelivers an unacked task after this: > longest task
    lock_timeout: str = "24h"  # a cluster lock left behind by a lost run expires after this
    # Connecting to Redis (TCP connect and TLS handshake) and the first PING must succeed
    # within this, or the CLI, workers and beat stop with one line (exit 2) instead of
    # waiting silently: a rediss:// URL to a plaintext Redis otherwise never returns.
    connect_timeout: str = "5s"

    row_group_rows: int = Field(default=1_048_576, ge=1)
    page_rows: int = Field(default=65_536, ge=1)  # rows per data page: the page index's grain
    zstd_level: int = Field(default=3, ge=1, le=22)
    chunk_compression: Literal["lz4", "zstd", "none"] = "lz4"

    # S3 and S3-compatible stores (MinIO, Ceph RGW) for s3:// archive and staging URLs; see
    # docs/s3.md. Whatever is unset here comes from boto's usual chain: AWS_ENDPOINT_URL_S3,
    # AWS_ENDPOINT_URL, AWS_DEFAULT_REGION, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
    # AWS_SESSION_TOKEN, AWS_PROFILE, ~/.aws/{config,credentials}, instance roles.
    s3_endpoint_url: str | None = None  # e.g. http://minio.example:9000
    s3_region: str | None = None
    s3_access_key_id: str | None = None
    s3_secret_access_key: SecretStr | None = None
    s3_session_token: SecretStr | None = None
    s3_addressing_style: Literal["auto", "path", "virtual"] = "auto"  # path: most MinIO/RGW
    s3_part_size_mib: int = Field(default=16, ge=5, le=5 * 1024)  # multipart upload part
    # Temporary archive files and staging runs older than this belong to dead runs.
    recovery_grace: str = "6h"

    @model_validator(mode="after")
    def _default_run_log(self) -> Settings:
        # Local state, not the archive: the archive holds only <cluster>/<T>.parquet files.
        if self.run_log is None:
            where = self.archive or self.checkpoints
            if where:
                self.run_log = default_run_log(where)
        elif self.run_log.lower() in ("off", "none", ""):
            self.run_log = None
        return self

    @field_validator("retention", "interval", "recovery_grace", "run_log_max_age")
    @classmethod
    def _valid_duration(cls, value: str | None) -> str | None:
        if value is not None and parse_duration(value) <= 0:
            raise ValueError("must be a positive duration")
        return value

    @field_validator("visibility_timeout", "lock_timeout", "connect_timeout")
    @classmethod
    def _valid_pipeline_duration(cls, value: str) -> str:
        if parse_duration(value) <= 0:
            raise ValueError("must be a positive duration")
        return value

    @field_validator("routes")
    @classmethod
    def _valid_routes(cls, value: dict[str, str]) -> dict[str, str]:
        parse_routes(value)  # raises ValueError naming the offending pattern or queue
        return value

    @field_validator("broker_url", "result_backend")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        # Only Redis is supported; anything else would end in a kombu KeyError traceback.
        if value is not None and urlsplit(value).scheme.lower() not in ("redis", "rediss"):
            raise ValueError(f"{mask_url(value)!r} is not a redis:// or rediss:// URL")
        return value

    @field_validator("default_queue", "finalize_queue")
    @classmethod
    def _valid_queue(cls, value: str | None) -> str | None:
        return None if value is None else check_queue(value)

    @model_validator(mode="after")
    def _s3_key_pair(self) -> Settings:
        if (self.s3_access_key_id is None) != (self.s3_secret_access_key is None):
            raise ValueError("set s3_access_key_id and s3_secret_access_key together")
        return self

    def storage_options(self) -> dict[str, dict[str, Any]]:
        """fsspec options per protocol (for `storage.configure`); holds secrets in clear."""
        s3: dict[str, Any] = {"default_block_size": self.s3_part_size_mib << 20}
        if self.s3_endpoint_url:
            s3["endpoint_url"] = self.s3_endpoint_url
        if self.s3_region:
            s3["client_kwargs"] = {"region_name": self.s3_region}
        if self.s3_access_key_id and self.s3_secret_access_key:
            s3["key"] = self.s3_access_key_id
            s3["secret"] = self.s3_secret_access_key.get_secret_value()
            if self.s3_session_token:
                s3["token"] = self.s3_session_token.get_secret_value()
        if self.s3_addressing_style != "auto":
            s3["config_kwargs"] = {"s3": {"addressing_style": self.s3_addressing_style}}
        return {"s3": s3}

    @property
    def retention_seconds(self) -> float | None:
        """The retention as seconds, if configured."""
        return parse_duration(self.retention) if self.retention else None

    @property
    def run_log_max_age_seconds(self) -> float:
        """How old a run record may get before it is pruned, in seconds."""
        return parse_duration(self.run_log_max_age)

    @property
    def connect_seconds(self) -> float:
        """The Redis connect timeout (`connect_timeout`) in seconds."""
        return parse_duration(self.connect_timeout)

    @property
    def grace_seconds(self) -> float:
        """The recovery grace period in seconds."""
        return parse_duration(self.recovery_grace)

    @property
    def results_url(self) -> str:
        """Where Celery keeps task results."""
        return self.result_backend or self.broker_url

    def redis_tls(self, url: str) -> dict[str, Any] | None:
        """TLS options for a rediss:// URL, None for any other: the form Celery takes as
        `broker_use_ssl`/`redis_backend_use_ssl` and redis-py as keyword arguments."""
        if not url.lower().startswith("rediss://"):
            return None
        options: dict[str, Any] = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
        for key, value in (
            ("ssl_ca_certs", self.redis_ca_cert),
            ("ssl_certfile", self.redis_client_cert),
            ("ssl_keyfile", self.redis_client_key),
        ):
            if value:
                options[key] = value
        return options

    def __repr_args__(self) -> Any:
        # Settings get printed in errors and debug output: never with a Redis password.
        for name, value in super().__repr_args__():
            if name in ("broker_url", "result_backend") and isinstance(value, str):
                value = mask_url(value)
            yield name, value

    @property
    def ipc_compression(self) -> str | None:
        """Arrow IPC codec for staging chunks (None = uncompressed)."""
        return None if self.chunk_compression == "none" else self.chunk_compression


def mask_url(url: str) -> str:
    """The URL with its password (if any) replaced by `**`, for log lines and messages."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return url if "@" not in url else "<url with credentials>"
    if not password:
        return url
    host = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:**@{host}"))


# --- configuration files --------------------------------------------------------------


class ConfigError(ValueError):
    """A configuration problem, as one line that names the key (or file) at fault."""


#: Where each setting read from a file came from, as the operator wrote it
#: (`metric-store.num-workers in /etc/cc-backend/config.json`), so an invalid value can be
#: named that way. Set by `load_settings` for the duration of one `Settings()` call.
_ORIGINS: ContextVar[dict[str, str] | None] = ContextVar("ccarchive_config_origins", default=None)

#: Fields holding local paths: relative ones in a file are relative to that file's directory.
_PATH_FIELDS = frozenset(
    {
        "checkpoints",
        "archive",
        "staging",
        "metrics_textfile",
        "cc_backend_config",
        "run_log",
        "redis_ca_cert",
        "redis_client_cert",
        "redis_client_key",
    }
)


def _file_path(value: Any, base: Path) -> Any:
    """A relative local path from a config file, resolved against the file's directory."""
    if not isinstance(value, str) or not value or "://" in value:
        return value  # URLs (s3://, file://) and wrong types go to validation unchanged
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else Path(os.path.normpath(base / path)))


def _read_file(path: str, what: str) -> bytes:
    try:
        return Path(path).expanduser().read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def read_toml_config(path: str) -> tuple[dict[str, Any], dict[str, str]]:
    """Settings in a TOML file and where each came from; top-level keys are field names.

    `row-group-rows` and `row_group_rows` are the same key. An unknown key is an error: a
    typo must not silently leave a default (such as the mode) in place.
    """
    try:
        doc = tomllib.loads(_read_file(path, "config file").decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    base = Path(path).expanduser().parent
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for key, value in doc.items():
        name = key.replace("-", "_")
        if name not in Settings.model_fields or name == "config":
            raise ConfigError(f"unknown key {key!r} in config file {path}")
        values[name] = _file_path(value, base) if name in _PATH_FIELDS else value
        origins[name] = f"{key} in {path}"
    return values, origins


#: cc-backend `metric-store` keys (SPEC §7) -> settings. Not `cleanup.interval`: where it
#: exists its meaning differs between cc-backend versions, and "0s" is how an operator
#: switches cc-backend's own cleanup off when this archiver takes over.
_CC_BACKEND_KEYS = {
    "checkpoints.directory": "checkpoints",
    "cleanup.mode": "mode",
    "cleanup.directory": "archive",
    "retention-in-memory": "retention",
    "num-workers": "workers",
}


#: cc-backend configs already warned about in this process (see `cleanup_warning`).
_WARNED_CLEANUP: set[str] = set()


def cleanup_warning(section: Mapping[str, Any], path: str) -> str | None:
    """Why cc-backend's own cleanup still runs with this `metric-store` section, or None.

    Migration step 2 (docs/operations.md) switches it off with `cleanup.interval: "0s"`;
    without that, cc-backend archives or deletes the same files on its own schedule
    (every `retention-in-memory`, in `delete` mode when `cleanup.mode` is missing).
    """
    cleanup = section.get("cleanup")
    interval = cleanup.get("interval") if isinstance(cleanup, Mapping) else None
    if isinstance(interval, str):
        try:
            if parse_duration(interval) == 0:
                return None
        except ValueError:
            pass  # not a duration cc-backend would take as "off" either
        why = f'metric-store.cleanup.interval is "{interval}"'
    elif not isinstance(cleanup, Mapping):
        why = "metric-store has no cleanup section (cc-backend then deletes old checkpoints)"
    else:
        why = "metric-store.cleanup has no interval"
    return (
        f"cc-backend's own cleanup is still enabled in {path}: {why}; set "
        '"interval": "0s" there so that two archivers never take the same files (or, on '
        "versions without cleanup.interval, keep its mode at archive and ccarchive's "
        "retention shorter; docs/operations.md, migration step 2)"
    )


def warn_about_cleanup(path: str) -> None:
    """Log `cleanup_warning` for the cc-backend config at `path`, once per process.

    Called once the settings are valid: an invalid config is one error line, not a warning
    and an error.
    """
    if path in _WARNED_CLEANUP:
        return
    _WARNED_CLEANUP.add(path)
    try:
        doc = json.loads(_read_file(path, "cc-backend config"))
        section = doc["metric-store"]
    except (ConfigError, ValueError, TypeError, KeyError):
        return  # the settings were read from it a moment ago; nothing to add
    warning = cleanup_warning(section, path) if isinstance(section, Mapping) else None
    if warning is not None:
        logging.getLogger(__name__).warning("%s", warning)


def read_cc_backend_config(path: str) -> tuple[dict[str, Any], dict[str, str]]:
    """Settings implied by the `metric-store` section of a cc-backend config.json (SPEC §7).

    Relative directories are resolved against the file's directory (cc-backend is run from
    there). `num-workers: 0` means "automatic" upstream and leaves our default. A missing
    `cleanup.mode` is NOT read as upstream's implicit "delete": deleting must be asked for.
    """
    try:
        doc = json.loads(_read_file(path, "cc-backend config"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cc-backend config {path} is not valid JSON: {exc}") from None
    section = doc.get("metric-store") if isinstance(doc, dict) else None
    if not isinstance(section, dict):
        raise ConfigError(f'cc-backend config {path} has no "metric-store" object')
    base = Path(path).expanduser().parent
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for dotted, name in _CC_BACKEND_KEYS.items():
        node: Any = section
        for i, part in enumerate(dotted.split(".")):
            if node is None:
                break  # an absent object: none of its keys is set
            if not isinstance(node, dict):
                parent = ".".join(dotted.split(".")[:i])
                raise ConfigError(f"metric-store.{parent} in {path} must be an object")
            node = node.get(part)
        if node is None or (name == "workers" and node == 0):
            continue
        values[name] = _file_path(node, base) if name in _PATH_FIELDS else node
        origins[name] = f"metric-store.{dotted} in {path}"
    return values, origins


class _FileSource(PydanticBaseSettingsSource):
    """Settings from a file whose path a higher-priority source set in field `path_field`."""

    path_field = ""

    def read(self, path: str) -> tuple[dict[str, Any], dict[str, str]]:
        """The file's settings and where each came from."""
        raise NotImplementedError

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        """Unused: `__call__` reads the whole file at once."""
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path = self.current_state.get(self.path_field)
        if not path:
            return {}
        values, origins = self.read(str(path))
        record = _ORIGINS.get()
        if record is not None:
            for name in values:
                record.setdefault(name, origins[name])  # first (higher) file source wins
        return values


class TomlConfigSource(_FileSource):
    """The TOML file named by `--config` / CCARCHIVE_CONFIG."""

    path_field = "config"

    def read(self, path: str) -> tuple[dict[str, Any], dict[str, str]]:
        """See `read_toml_config`."""
        return read_toml_config(path)


class CcBackendConfigSource(_FileSource):
    """The cc-backend config.json named by `--cc-backend-config` (or env, or the TOML file)."""

    path_field = "cc_backend_config"

    def read(self, path: str) -> tuple[dict[str, Any], dict[str, str]]:
        """See `read_cc_backend_config`."""
        return read_cc_backend_config(path)


def _env_name(field: str) -> str | None:
    """The CCARCHIVE_* variable that set `field`, if one did (names are case-insensitive)."""
    wanted = f"{Settings.model_config.get('env_prefix', '')}{field}".upper()
    return next((k for k in os.environ if k.upper() == wanted), None)


def load_settings(overrides: Mapping[str, Any] | None = None) -> Settings:
    """Settings from `overrides` (CLI flags; None means not given) > env > TOML > cc-backend.

    Raises ConfigError with one line naming the key and where it was set, e.g.
    `invalid workers (from metric-store.num-workers in /etc/cc-backend/config.json): ...`.
    """
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    origins: dict[str, str] = {}
    token = _ORIGINS.set(origins)
    try:
        settings = Settings(**given)
    except SettingsError as exc:  # an env value that must be JSON (CCARCHIVE_ROUTES) is not
        raise ConfigError(_settings_error(exc)) from None
    except ValidationError as exc:
        errors = exc.errors()
        err = errors[0]
        loc = [str(p) for p in err["loc"]]
        field = loc[0] if loc else ""
        if not field:  # a check across fields: no single key to blame
            where = "the combined settings"
        elif field in given:
            where = "the command line"
        elif (env := _env_name(field)) is not None:
            where = env
        else:
            where = origins.get(field, "the defaults")
        message = str(err["msg"]).removeprefix("Value error, ")
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise ConfigError(
            f"invalid {'.'.join(loc) or 'settings'} (from {where}): {message}{more}"
        ) from None
    finally:
        _ORIGINS.reset(token)
    if settings.cc_backend_config:
        warn_about_cleanup(settings.cc_backend_config)
    return settings


def _settings_error(exc: SettingsError) -> str:
    """One line for a value pydantic-settings could not even parse: the variable, the reason."""
    found = re.search(r'field "([^"]+)"', str(exc))
    field = found.group(1) if found else ""
    env = _env_name(field) if field else None
    reason = exc.__cause__ or exc.__context__ or exc
    what = f"{env} (setting {field})" if env else (field or "a setting")
    return f"invalid {what}: not valid JSON: {reason}"


def configure_storage(settings: Settings) -> dict[str, dict[str, Any]]:
    """Apply the storage settings (S3 endpoint, region, credentials) to this process.

    Every process that touches storage calls this once at startup: the CLI, Celery workers
    (worker_process_init); the runner hands the result on to its pool's processes. Returns
    the options applied.
    """
    from . import storage  # deferred: importing fsspec is not free, `--help` stays instant

    options = settings.storage_options()
    storage.configure(options)
    return options
