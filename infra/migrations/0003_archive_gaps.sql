-- Gaps in the event archive: events of an epoch, ids first..last (inclusive), that were
-- removed from Redis before the archive group acknowledged them. Written by the archiver
-- (streams/archive.py); history answers `covered: false, reason: gap` for a range that
-- touches one rather than returning the hole.
CREATE TABLE archive_gaps (
    strategy     text        NOT NULL,
    epoch        text        NOT NULL,
    first_ms     bigint      NOT NULL,
    first_seq    bigint      NOT NULL,
    last_ms      bigint      NOT NULL,
    last_seq     bigint      NOT NULL,
    lost         bigint,                 -- events lost; NULL when the archiver could not tell
    reason       text        NOT NULL,   -- 'ceiling' | 'trimmed' | 'deleted' (docs/operations.md)
    detected_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (strategy, epoch, first_ms, first_seq),
    CHECK ((last_ms, last_seq) >= (first_ms, first_seq))
);
