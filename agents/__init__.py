"""faust apps: ingest sources, signals relay, join, and the archiver."""
