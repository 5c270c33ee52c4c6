"""Settings of the agents' processes: ingest, the archiver, event writers."""

from __future__ import annotations

import socket
from typing import Literal

from pydantic import Field

from streams.settings import CommonSettings


class TushareSettings(CommonSettings):
    """What reaching Tushare Pro needs (`tickwave universe fetch`, and ingest's Tushare source)."""

    tushare_token: str | None = Field(
        None, description="Tushare Pro token (required for --source tushare and `tickwave universe fetch`)")


class IngestSettings(TushareSettings):
    """`tickwave ingest`: sources appending ticks."""

    ingest_metrics_port: int = Field(9101, ge=0, le=65535, description="/metrics port (0: off)")
    tick_maxlen: int = Field(1_000_000, ge=1000, description="approximate entries kept per tick partition")
    tushare_interval: float = Field(3.0, gt=0, description="seconds between Tushare polls")
    tushare_codes: str = Field("", description="comma-separated ts_codes polled from Tushare")


class ArchiverSettings(CommonSettings):
    """`tickwave archive`: copies every strategy stream into PostgreSQL (its group: `archive_group`)."""

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

    event_retention_ms: int = Field(
        24 * 3600 * 1000, ge=1000,
        description="events kept in Redis (MINID ~); never trims what the archive group has not acknowledged")
    event_maxlen: int | None = Field(None, ge=100, description="if set, keep about this many events instead")
    event_hold_max_bytes: int = Field(
        1 << 30, ge=0,
        description="ceiling of a stream's memory while the archive group holds its retention back; past it "
                    "trimming proceeds and the events lost are counted and recorded as a gap (0 = no ceiling)")


class WorkerSettings(EventsSettings):
    """`tickwave worker`: the faust join of ticks with signals."""

    worker_app_id: str = Field("tickwave-join", description="faust app id: workers sharing partitions share it")
    worker_metrics_port: int = Field(9102, ge=0, le=65535, description="/metrics port (0: off)")
    worker_batch: int = Field(500, ge=1, le=10_000, description="ticks joined per batch at most")
    worker_batch_window_s: float = Field(
        0.0, ge=0, le=1,
        description="0: join the ticks that have arrived at once; above 0, wait up to this long for a batch to "
                    "fill (fewer, larger appends; adds to join latency)")
    worker_commit_interval: float = Field(0.5, gt=0, description="seconds between offset commits")
    worker_standby_replicas: int = Field(0, ge=0, le=3, description="standby copies of the signals table")
    worker_replica_wait_ms: int = Field(
        0, ge=0, le=1000,
        description="Redis Cluster only: after each event append, WAIT up to this many ms for a replica to have it "
                    "(0: off). An append acknowledged in time survives a failover to that replica; one that is not "
                    "is counted (tickwave_events_replica_unacknowledged_total) and the join goes on. See "
                    "docs/operations.md (WAIT)")
    worker_datadir: str | None = Field(None, description="faust's data directory (default: a new temporary one)")
    worker_breadth: bool = Field(True, description="run the market breadth agent beside the join")
    breadth_interval_s: float = Field(
        3.0, ge=0.1, le=3600,
        description="seconds between market breadth computations (one `market` stream entry each, when a tick "
                    "arrived since the last)")
    worker_broker_options: str = Field(
        "", description="driver URL parameters added to the broker URL, e.g. 'session_timeout=3&heartbeat_interval=0.5'"
                        " (see docs/faust-redis.md)")
    kline_enabled: bool = Field(True, description="run the K-line agent: 1-minute bars of every stock")
    kline_sessions: Literal["exchange", "always"] = Field(
        "exchange", description="'exchange': bars on the A-share session clock; 'always': every minute is a bar "
                                "minute (a simulator that ignores the exchange's clock)")
    kline_grace_ms: int = Field(
        500, ge=0, le=60_000,
        description="a bar closes once its partition's clock passes the minute's end by this much (ticks of "
                    "other stocks stamped slightly earlier still count)")
    kline_maxlen: int = Field(480, ge=0, description="1-minute bars kept in Redis per stock (0: all)")
    kline_timer_s: float = Field(0.05, gt=0, le=5, description="how often quiet partitions' bars are closed by the clock")
    kline_live_s: float = Field(
        1.0, ge=0, le=60, description="how often the open 1-minute bars that changed are published to kline "
                                      "subscribers as live partial bars (closed: false); 0: never")


class RelaySettings(CommonSettings):
    """`tickwave relay`: moves signal outbox rows to the `signals` topic (one leads, others stand by)."""

    relay_batch: int = Field(500, ge=1, le=100_000, description="outbox rows read per round")
    relay_poll_s: float = Field(
        1.0, gt=0, description="seconds between outbox polls when no NOTIFY came (the fallback for a lost one)"
    )
    relay_standby_s: float = Field(1.0, gt=0, description="seconds between a standby's tries to take the lead")
    relay_metrics_port: int = Field(9104, ge=0, le=65535, description="/metrics port (0: off)")
