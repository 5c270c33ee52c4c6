"""Settings from the environment: what every process reads, and `load`, which checks them.

Each process's own class lives with its package (agents.settings, edge.settings) and
extends `CommonSettings`. Every variable is `TICKWAVE_<FIELD>`; the connection URLs
also accept the usual `REDIS_URL` and `DATABASE_URL`. A bad value stops the process
before it does anything, with a message naming the variable.
"""

from __future__ import annotations

from pathlib import Path
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
    archive_group: str = Field(
        "archiver",
        description="the archiver's consumer group on every strategy stream; event writers keep retention "
                    "from trimming what it has not acknowledged ('' = no archive: nothing holds retention)",
    )
    tick_partitions: int = Field(8, ge=1, le=1024, description="partitions of the ticks topic")
    universe_file: Path | None = Field(
        None,
        description="CSV or Parquet stock universe (ts_code, name, board, pre_close, st, list_date) for the "
                    "simulator, validation and the join; unset: the built-in whole market",
    )
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

    @field_validator("universe_file", mode="before")
    @classmethod
    def _unset_when_empty(cls, value: Any) -> Any:
        # an empty variable means "not set", not the current directory
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        if value.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ValueError("must be DEBUG, INFO, WARNING or ERROR")
        return value.upper()

    @field_validator("archive_group")
    @classmethod
    def _group(cls, value: str) -> str:
        if any(c.isspace() for c in value) or len(value) > 100:
            raise ValueError("must be at most 100 characters without spaces ('' for none)")
        return value

    @field_validator("key_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not value or any(c in value for c in "{} \t\n"):
            raise ValueError("must be non-empty, without braces or spaces")
        return value


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
