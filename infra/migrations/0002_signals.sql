-- Strategy signals and their outbox (streams/signals.py is the one writer of both).
--
-- `signals` holds the current list: one active row per (strategy, ts_code); a removed
-- signal's row is deleted, and its history lives in the outbox.
CREATE TABLE signals (
    strategy      text             NOT NULL,
    ts_code       text             NOT NULL,
    name          text             NOT NULL DEFAULT '',
    side          text             NOT NULL DEFAULT 'buy' CHECK (side IN ('buy', 'sell')),
    signal_date   date             NOT NULL,
    -- double precision, not numeric: the value round-trips the model's float exactly
    signal_price  double precision CHECK (signal_price IS NULL OR signal_price > 0),
    confidence    double precision CHECK (confidence IS NULL OR confidence BETWEEN 0 AND 1),
    reason        text             NOT NULL DEFAULT '',
    updated_at    timestamptz      NOT NULL DEFAULT now(),
    PRIMARY KEY (strategy, ts_code)
);

-- the edge's list call: one strategy's buy signals
CREATE INDEX signals_by_side ON signals (strategy, side);

-- One row per change, written in the transaction that makes the change. Writers hold a
-- transaction-level advisory lock from their first statement to COMMIT, so ids are
-- handed out in commit order (see streams/signals.py); the relay moves rows to the
-- `signals` topic in id order.
CREATE TABLE signal_outbox (
    id            bigserial        PRIMARY KEY,
    strategy      text             NOT NULL,
    ts_code       text             NOT NULL,
    action        text             NOT NULL CHECK (action IN ('add', 'remove')),
    -- the SignalChange JSON exactly as the topic carries it (text, not jsonb: the bytes are kept)
    change        text             NOT NULL,
    -- clock time of the insert, the transaction's last statement before COMMIT
    committed_at  timestamptz      NOT NULL DEFAULT clock_timestamp(),
    -- set by the relay once the row is in the topic (bookkeeping for backlog and lag;
    -- the topic itself is what the relay resumes from)
    relayed_at    timestamptz
);

CREATE INDEX signal_outbox_unrelayed ON signal_outbox (id) WHERE relayed_at IS NULL;
