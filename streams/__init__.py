"""Redis Streams layer: keys, partitioner, codec, partition logs, groups, dead letters."""
