"""Settings of `tickwave edge`."""

from __future__ import annotations

import socket

from pydantic import Field

from streams.settings import CommonSettings


class EdgeSettings(CommonSettings):
    """`tickwave edge`: the WebSocket and HTTP service."""

    edge_host: str = Field("0.0.0.0", description="listen address")
    edge_port: int = Field(8000, ge=1, le=65535, description="listen port (WebSocket, API, /metrics)")
    edge_node: str = Field(
        default_factory=socket.gethostname,
        description="node name; its consumer group is edge:<node>, stable across restarts",
    )
    edge_workers: int = Field(
        1, ge=1, le=64,
        description="`tickwave edge` processes sharing the port (SO_REUSEPORT), one per core; each is node "
                    "<edge_node>-<i> with its own consumer group",
    )
    edge_reuse_port: bool = Field(
        False, description="bind with SO_REUSEPORT (set by `tickwave edge --workers N` for its processes)"
    )
    edge_heartbeat_s: float = Field(30.0, gt=0, description="server ping interval; no pong in half of it closes")
    edge_max_frame_bytes: int = Field(64 * 1024, ge=256, description="larger client frames are closed with 1009")
    edge_max_subscriptions: int = Field(50, ge=1, description="subscriptions per connection")
    edge_rate_per_s: float = Field(20.0, gt=0, description="client messages per second, sustained")
    edge_rate_burst: int = Field(40, ge=1, description="client messages allowed in a burst")
    edge_max_connections_per_ip: int = Field(200, ge=1, description="concurrent connections from one address")
    edge_max_tails: int = Field(
        1000, ge=1,
        description="streams one node follows at once (strategy streams and tick partitions); a subscribe that "
                    "needs one more gets a node_full error",
    )
    edge_redis_connections: int = Field(
        4, ge=1,
        description="the node's shared Redis pool (subscribes, history, acks, lag); a command waits for a free "
                    "connection. Blocking reads have their own: one for strategy streams, one for tick "
                    "partitions, so a node holds at most this + 2 (standalone Redis)",
    )
    edge_cluster_poll_ms: int = Field(
        50, ge=1, le=5000,
        description="Redis Cluster only: how often the node polls the streams it follows (a blocking read "
                    "cannot name keys of different slots)",
    )
    edge_batch_window_ms: float = Field(
        5.0, ge=0, le=50,
        description="when events arrive faster than one read per this window, the next read of the strategy "
                    "streams waits out the window and takes them all: one frame per subscriber per window, "
                    "not one per event. An event after a quiet spell is read at once. 0 turns it off",
    )
    edge_shutdown_s: float = Field(
        2.0, gt=0,
        description="on SIGTERM/SIGINT every WebSocket is closed with 1001 at once; requests in flight "
                    "(history downloads) get this long before the process exits",
    )
    edge_send_queue_bytes: int = Field(1 << 20, ge=4096, description="per-connection send queue cap; past it prices conflate")
    edge_socket_sndbuf: int = Field(
        256 * 1024, ge=4096, description="kernel send buffer per WebSocket: bounds what hides from the queue's cap"
    )
    edge_ws_compress: bool = Field(
        False,
        description="permessage-deflate for clients that offer it. Off by default: a compressed connection "
                    "cannot be written the one frame built per batch for every subscriber, and deflating every "
                    "frame per client costs more CPU than fan-out itself",
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
