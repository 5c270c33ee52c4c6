"""Prometheus counters of the faust driver (faust's own monitor covers messages and lag)."""

from __future__ import annotations

from prometheus_client import Counter

REBALANCES = Counter("tickwave_driver_rebalances_total", "Rebalances this process took part in", ["group"])
COMMITS_FENCED = Counter(
    "tickwave_driver_commits_fenced_total",
    "Partition commits refused because another member owns the partition now", ["group"])
CORRUPT = Counter(
    "tickwave_driver_corrupt_records_total", "Topic entries that could not be decoded, dead-lettered", ["topic"])
STEP_ASIDES = Counter(
    "tickwave_driver_step_asides_total",
    "Rebalances this process stepped out of because its agents were still busy revoking", ["group"])
FAILOVER_REWINDS = Counter(
    "tickwave_driver_failover_rewinds_total",
    "Partitions rewound because a failover handed their offsets out again (a new partition generation)",
    ["topic"])
FAILOVER_REREAD = Counter(
    "tickwave_driver_failover_reread_records_total",
    "Offsets read before a failover and handed out again to new records after it (read again from the new generation)",
    ["topic"])
