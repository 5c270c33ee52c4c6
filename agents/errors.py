"""The agents package's error root; asyncpg errors are translated in agents/db.py."""


class AgentsError(Exception):
    """Root of every error the agents raise."""


class ArchiveUnavailable(AgentsError):
    """PostgreSQL could not be reached or dropped the connection; retry with backoff."""


class MigrationError(AgentsError):
    """A migration failed; the schema is left as it was before the run."""
