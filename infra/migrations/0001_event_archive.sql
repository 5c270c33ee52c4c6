-- The event archive: every strategy event, kept beyond Redis retention.
-- Ids are Redis stream ids ms-seq, stored as two integers so they sort.
CREATE TABLE event_archive (
    strategy        text        NOT NULL,
    epoch           text        NOT NULL,
    ms              bigint      NOT NULL,
    seq             bigint      NOT NULL,
    ts_code         text        NOT NULL DEFAULT '',
    kind            text        NOT NULL,          -- 'price' | 'signal'
    schema_version  smallint    NOT NULL,
    event           jsonb       NOT NULL,
    archived_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (strategy, epoch, ms, seq)
);

-- analysts ask for one stock's history within a strategy
CREATE INDEX event_archive_stock ON event_archive (strategy, ts_code, ms);
