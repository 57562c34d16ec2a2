//! The SQLite schema. Idempotent: runs at every open.

/// Pragmas and tables.
pub const SCHEMA: &str = "
PRAGMA journal_mode = WAL;
PRAGMA synchronous = NORMAL;
PRAGMA busy_timeout = 5000;
PRAGMA foreign_keys = ON;

CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE IF NOT EXISTS agents (
    agent_id      TEXT PRIMARY KEY,
    hostname      TEXT NOT NULL,
    labels        TEXT NOT NULL,
    version       TEXT NOT NULL,
    boot_id       TEXT NOT NULL,
    last_seq      INTEGER NOT NULL DEFAULT 0,
    first_seen_ms INTEGER NOT NULL,
    last_seen_ms  INTEGER NOT NULL,
    connected     INTEGER NOT NULL DEFAULT 0,
    heartbeat_ms  INTEGER NOT NULL DEFAULT 0
);

CREATE TABLE IF NOT EXISTS events (
    agent_id             TEXT NOT NULL,
    seq                  INTEGER NOT NULL,
    check_name           TEXT NOT NULL,
    labels               TEXT NOT NULL,
    state                TEXT NOT NULL,
    previous             TEXT NOT NULL,
    value                REAL,
    unit                 TEXT NOT NULL,
    threshold            REAL,
    message              TEXT NOT NULL,
    observed_at_ms       INTEGER NOT NULL,
    breach_started_at_ms INTEGER NOT NULL,
    flapping             INTEGER NOT NULL,
    received_at_ms       INTEGER NOT NULL,
    PRIMARY KEY (agent_id, seq)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS checks (
    fingerprint TEXT PRIMARY KEY,
    agent_id    TEXT NOT NULL,
    check_name  TEXT NOT NULL,
    labels      TEXT NOT NULL,
    state       TEXT NOT NULL,
    value       REAL,
    unit        TEXT NOT NULL,
    since_ms    INTEGER NOT NULL,
    updated_ms  INTEGER NOT NULL
);

CREATE TABLE IF NOT EXISTS incidents (
    id                   INTEGER PRIMARY KEY AUTOINCREMENT,
    dedup_key            TEXT NOT NULL DEFAULT '',
    fingerprint          TEXT NOT NULL,
    node                 TEXT NOT NULL,
    check_name           TEXT NOT NULL,
    labels               TEXT NOT NULL,
    severity             TEXT NOT NULL,
    status               TEXT NOT NULL,
    state                TEXT NOT NULL,
    value                REAL,
    unit                 TEXT NOT NULL,
    threshold            REAL,
    summary              TEXT NOT NULL,
    breach_started_at_ms INTEGER NOT NULL,
    triggered_at_ms      INTEGER NOT NULL,
    acknowledged_at_ms   INTEGER,
    resolved_at_ms       INTEGER,
    resolution           TEXT
);
CREATE INDEX IF NOT EXISTS incidents_open ON incidents (fingerprint) WHERE status != 'resolved';

CREATE TABLE IF NOT EXISTS silences (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    matchers    TEXT NOT NULL,
    starts_ms   INTEGER NOT NULL,
    ends_ms     INTEGER NOT NULL,
    created_by  TEXT NOT NULL,
    reason      TEXT NOT NULL,
    created_ms  INTEGER NOT NULL,
    expired_by  TEXT
);

CREATE TABLE IF NOT EXISTS timeline (
    id          INTEGER PRIMARY KEY,
    incident_id INTEGER NOT NULL REFERENCES incidents (id),
    at_ms       INTEGER NOT NULL,
    kind        TEXT NOT NULL,
    actor       TEXT NOT NULL,
    note        TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS timeline_incident ON timeline (incident_id);

CREATE TABLE IF NOT EXISTS outbox (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    incident_id     INTEGER NOT NULL REFERENCES incidents (id),
    channel         TEXT NOT NULL,
    kind            TEXT NOT NULL,
    status          TEXT NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    payload         TEXT NOT NULL,
    last_error      TEXT,
    created_ms      INTEGER NOT NULL,
    next_attempt_ms INTEGER NOT NULL,
    delivered_ms    INTEGER,
    idempotency_key TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS outbox_pending ON outbox (channel, id) WHERE status = 'pending';
CREATE INDEX IF NOT EXISTS outbox_pending_incident ON outbox (channel, incident_id, id) WHERE status = 'pending';
CREATE INDEX IF NOT EXISTS outbox_incident ON outbox (incident_id);
";
