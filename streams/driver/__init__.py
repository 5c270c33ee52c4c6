"""faust transport driver for Redis Streams: `faust.App(..., broker="redis://host:6379/0")`.

Registered under faust's `faust.transports` entry point for the schemes
redis, rediss, redis+cluster and rediss+cluster. See docs/faust-redis.md.
"""

from streams.driver.transport import Transport

__all__ = ["Transport"]
