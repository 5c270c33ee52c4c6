"""Settings from the environment: one documented class per process, checked at start-up.

Every variable is `TICKWAVE_<FIELD>`; the connection URLs also accept the usual
`REDIS_URL` and `DATABASE_URL`. A bad value stops the process before it does
anything, with a message naming the variable.
"""

from __future__ import annotations

import socket
from typing import Any, TypeVar

from pydantic import AliasChoices, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class ConfigError(Exception):
    """A setting's value is unusable; the message names the environment variable."""


class CommonSettings(BaseSettings):
    """What every tickwave process reads."""

    model_config = SettingsConfigDict(env_prefix="TICKWAVE_", extra="ignore", frozen=True)

    redis_url: str | None = Field(
        None,
        validation_alias=AliasChoices("TICKWAVE_REDIS_URL", "REDIS_URL"),
        description="redis://, rediss:// or redis+cluster:// URL; unset: `tickwave run` starts one",
    )
    database_url: str | None = Field(
        None,
        validation_alias=AliasChoices("TICKWAVE_DATABASE_URL", "DATABASE_URL"),
        description="postgresql:// URL; unset: `tickwave run` starts one",
    )
    key_prefix: str = Field("tw:", description="prefix of every Redis key; isolates deployments")
    tick_partitions: int = Field(8, ge=1, le=1024, description="partitions of the ticks topic")
    log_level: str = Field("INFO", description="DEBUG, INFO, WARNING or ERROR")
    log_format: str = Field("logfmt", description="'logfmt' or 'json' log lines")

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str | None) -> str | None:
        if value and not value.startswith(("redis://", "rediss://", "redis+cluster://", "rediss+cluster://", "unix://")):
            raise ValueError("must start with redis://, rediss://, redis+cluster:// or unix://")
        return value

    @field_validator("database_url")
    @classmethod
    def _pg_scheme(cls, value: str | None) -> str | None:
        if value and not value.startswith(("postgresql://", "postgres://")):
            raise ValueError("must start with postgresql://")
        return value

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        if value.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ValueError("must be DEBUG, INFO, WARNING or ERROR")
        return value.upper()

    @field_validator("key_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not value or any(c in value for c in "{} \t\n"):
            raise ValueError("must be non-empty, without braces or spaces")
        return value


class IngestSettings(CommonSettings):
    """`tickwave ingest`: sources appending ticks."""

    ingest_metrics_port: int = Field(9101, ge=0, le=65535, description="/metrics port (0: off)")
    tick_maxlen: int = Field(1_000_000, ge=1000, description="approximate entries kept per tick partition")
    tushare_token: str | None = Field(None, description="Tushare Pro token (required for --source tushare)")
    tushare_interval: float = Field(3.0, gt=0, description="seconds between Tushare polls")
    tushare_codes: str = Field("", description="comma-separated ts_codes polled from Tushare")


T = TypeVar("T", bound=BaseSettings)


def load(cls: type[T], **overrides: Any) -> T:
    """Build settings or raise ConfigError naming each bad variable."""
    try:
        return cls(**overrides)
    except ValidationError as exc:
        prefix = cls.model_config.get("env_prefix", "")
        problems = []
        for err in exc.errors(include_url=False):
            name = str(err["loc"][0]) if err["loc"] else "?"
            var = name if name.isupper() else f"{prefix}{name}".upper()
            problems.append(f"{var}: {err['msg']}")
        raise ConfigError("bad settings: " + "; ".join(problems)) from None


class ArchiverSettings(CommonSettings):
    """`tickwave archive`: copies every strategy stream into PostgreSQL."""

    archive_group: str = Field("archiver", description="consumer group name on every strategy stream")
    archive_consumer: str = Field(
        default_factory=socket.gethostname,
        description="consumer name; stable across restarts so a restarted archiver re-reads its own pending",
    )
    archive_batch: int = Field(2000, ge=1, le=100_000, description="entries read per stream per round")
    archive_claim_idle_ms: int = Field(30_000, ge=10, description="reclaim other consumers' entries pending this long")
    archive_refresh_s: float = Field(5.0, gt=0, description="how often new strategies are picked up")
    archive_metrics_port: int = Field(9103, ge=0, le=65535, description="/metrics port (0: off)")


class EventsSettings(CommonSettings):
    """Event stream writers (`tickwave events generate`, the join agent)."""

    event_retention_ms: int = Field(24 * 3600 * 1000, ge=1000, description="events kept in Redis (MINID ~)")
    event_maxlen: int | None = Field(None, ge=100, description="if set, keep about this many events instead")


class EdgeSettings(CommonSettings):
    """`tickwave edge`: the WebSocket and HTTP service."""

    edge_host: str = Field("0.0.0.0", description="listen address")
    edge_port: int = Field(8000, ge=1, le=65535, description="listen port (WebSocket, API, /metrics)")
    edge_node: str = Field(
        default_factory=socket.gethostname,
        description="node name; its consumer group is edge:<node>, stable across restarts",
    )
    edge_heartbeat_s: float = Field(30.0, gt=0, description="server ping interval; no pong in half of it closes")
    edge_max_frame_bytes: int = Field(64 * 1024, ge=256, description="larger client frames are closed with 1009")
    edge_max_subscriptions: int = Field(50, ge=1, description="subscriptions per connection")
    edge_rate_per_s: float = Field(20.0, gt=0, description="client messages per second, sustained")
    edge_rate_burst: int = Field(40, ge=1, description="client messages allowed in a burst")
    edge_max_connections_per_ip: int = Field(200, ge=1, description="concurrent connections from one address")
    edge_send_queue_bytes: int = Field(1 << 20, ge=4096, description="per-connection send queue cap; past it prices conflate")
    edge_socket_sndbuf: int = Field(
        256 * 1024, ge=4096, description="kernel send buffer per WebSocket: bounds what hides from the queue's cap"
    )
    edge_max_replay: int = Field(50_000, ge=1, description="resume replays at most this many events, else a snapshot")
    edge_ready_max_lag: int = Field(10_000, ge=0, description="/readyz fails when a tail is further behind than this")
    edge_allowed_origins: str = Field("", description="comma-separated Origin allow-list; empty allows any")
    edge_jwt_secret: str | None = Field(None, description="HS256 secret; setting it (or the public key) turns auth on")
    edge_jwt_public_key: str | None = Field(None, description="RS256 public key (PEM)")
    edge_jwt_audience: str | None = Field(None, description="required `aud` claim, if any")

    @property
    def origins(self) -> frozenset[str]:
        return frozenset(o.strip() for o in self.edge_allowed_origins.split(",") if o.strip())

    @property
    def auth_enabled(self) -> bool:
        return bool(self.edge_jwt_secret or self.edge_jwt_public_key)
