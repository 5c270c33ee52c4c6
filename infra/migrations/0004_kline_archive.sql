-- K-line archive: 1-minute bars kept beyond Redis (streams/klines.py writes and reads it).
-- One row per bar as appended to its stock's stream; ids are Redis stream ids ms-seq.
CREATE TABLE kline_archive (
    ts_code      text        NOT NULL,
    epoch        text        NOT NULL,
    ms           bigint      NOT NULL,
    seq          bigint      NOT NULL,
    start        timestamptz NOT NULL,   -- the bar's open time
    bar          jsonb       NOT NULL,   -- the Bar without its event id
    archived_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (ts_code, epoch, ms, seq)
);

-- the kline API asks for one stock's bars by time
CREATE INDEX kline_archive_start ON kline_archive (ts_code, start);
