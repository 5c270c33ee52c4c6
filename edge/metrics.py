"""Edge metrics (prometheus-client), all in one place."""

from prometheus_client import Counter, Gauge, Histogram

# gauges sum over the processes of `tickwave edge --workers N` (multiprocess mode; ignored otherwise)
CONNECTIONS = Gauge("tickwave_edge_connections", "Open WebSocket connections", multiprocess_mode="livesum")
SUBSCRIPTIONS = Gauge("tickwave_edge_subscriptions", "Active subscriptions", ["kind", "target"],
                      multiprocess_mode="livesum")
MESSAGES_SENT = Counter("tickwave_edge_messages_sent_total", "Frames sent to clients", ["type"])
BYTES_SENT = Counter("tickwave_edge_bytes_sent_total", "Bytes sent to clients")
REPLAYED = Counter("tickwave_edge_replayed_events_total", "Events replayed on resume")
RESUMES = Counter("tickwave_edge_resumes_total", "Subscribe verdicts", ["recovered"])
PUSH_LATENCY = Histogram(
    "tickwave_edge_push_latency_seconds", "Event ingest time to send",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
CONFLATIONS = Counter("tickwave_edge_conflations_total", "Send queues conflated to the latest price per stock")
SLOW_CLOSES = Counter("tickwave_edge_slow_closes_total", "Clients closed with 4008 for not keeping up")
REFUSALS = Counter("tickwave_edge_refusals_total", "Refused connections, frames and subscriptions", ["reason"])
CONSUMER_LAG = Gauge("tickwave_edge_consumer_lag", "Entries not yet read by this node's group", ["strategy", "group"],
                     multiprocess_mode="livemax")
EVENTS_READ = Counter("tickwave_edge_events_read_total", "Events read from strategy streams", ["strategy"])
FAILOVER_RESYNCS = Counter(
    "tickwave_edge_failover_resyncs_total",
    "Subscribers closed (4012) because a failover lost event ids they had been sent", ["strategy"])


def observe_many(histogram: Histogram, value: float, n: int) -> None:
    """`histogram.observe(value)` n times, at the cost of one: a frame shared by n clients was
    sent to all of them at the same moment. prometheus-client's observe takes no count; this
    does what it does (sum, then the first bucket the value fits) with n."""
    try:
        total, buckets, bounds = histogram._sum, histogram._buckets, histogram._upper_bounds
    except AttributeError:  # a labelled parent or another client version: the plain way
        for _ in range(n):
            histogram.observe(value)
        return
    total.inc(value * n)
    for bucket, bound in zip(buckets, bounds):
        if value <= bound:
            bucket.inc(n)
            break
