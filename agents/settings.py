"""Settings of the agents' processes: ingest, the archiver, event writers."""

from __future__ import annotations

import socket

from pydantic import Field

from streams.settings import CommonSettings


class IngestSettings(CommonSettings):
    """`tickwave ingest`: sources appending ticks."""

    ingest_metrics_port: int = Field(9101, ge=0, le=65535, description="/metrics port (0: off)")
    tick_maxlen: int = Field(1_000_000, ge=1000, description="approximate entries kept per tick partition")
    tushare_token: str | None = Field(None, description="Tushare Pro token (required for --source tushare)")
    tushare_interval: float = Field(3.0, gt=0, description="seconds between Tushare polls")
    tushare_codes: str = Field("", description="comma-separated ts_codes polled from Tushare")


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


class RelaySettings(CommonSettings):
    """`tickwave relay`: moves signal outbox rows to the `signals` topic (one leads, others stand by)."""

    relay_batch: int = Field(500, ge=1, le=100_000, description="outbox rows read per round")
    relay_poll_s: float = Field(
        1.0, gt=0, description="seconds between outbox polls when no NOTIFY came (the fallback for a lost one)"
    )
    relay_standby_s: float = Field(1.0, gt=0, description="seconds between a standby's tries to take the lead")
    relay_metrics_port: int = Field(9104, ge=0, le=65535, description="/metrics port (0: off)")
