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
-- The dispatcher's next pick (`next_pending`) reads this in order instead of sorting
-- every pending row of the channel: O(1) per pick, not O(pending) (bench-notify).
CREATE INDEX IF NOT EXISTS outbox_pending_due ON outbox (channel, next_attempt_ms, id) WHERE status = 'pending';
CREATE INDEX IF NOT EXISTS outbox_incident ON outbox (incident_id);

CREATE TABLE IF NOT EXISTS incident_members (
    id          INTEGER PRIMARY KEY,
    incident_id INTEGER NOT NULL REFERENCES incidents (id),
    fingerprint TEXT NOT NULL,
    node        TEXT NOT NULL,
    check_name  TEXT NOT NULL,
    labels      TEXT NOT NULL,
    state       TEXT NOT NULL,
    value       REAL,
    message     TEXT NOT NULL,
    since_ms    INTEGER NOT NULL,
    updated_ms  INTEGER NOT NULL,
    unit        TEXT,
    threshold   REAL,
    UNIQUE (incident_id, fingerprint)
);
CREATE INDEX IF NOT EXISTS members_fingerprint ON incident_members (fingerprint);
CREATE INDEX IF NOT EXISTS members_node ON incident_members (node, check_name);

-- The post-mortem linked to an incident (at most one; a new link replaces it).
CREATE TABLE IF NOT EXISTS postmortems (
    incident_id  INTEGER PRIMARY KEY REFERENCES incidents (id),
    url          TEXT NOT NULL,
    linked_by    TEXT NOT NULL,
    linked_at_ms INTEGER NOT NULL
);
";

/// Columns added after the first release: `(table, column, declaration)`. Added in
/// place to existing databases by [`migrate`].
const ADDED_COLUMNS: &[(&str, &str, &str)] = &[
    // Group key of the incident (`correlate::group_key`); '' for incidents from before
    // grouping, which only their own fingerprint joins.
    ("incidents", "group_key", "TEXT NOT NULL DEFAULT ''"),
    // While set (Unix ms), the trigger waits for the group to gather (group_wait).
    ("incidents", "page_due_ms", "INTEGER"),
    // 1 while paging is held because the check is flapping.
    ("incidents", "flapping_hold", "INTEGER NOT NULL DEFAULT 0"),
    // The current trigger cycle starts after these outbox and timeline ids (a reopened
    // incident pages again and its resolve goes to the channels of the new trigger).
    ("incidents", "outbox_mark", "INTEGER NOT NULL DEFAULT 0"),
    ("incidents", "timeline_mark", "INTEGER NOT NULL DEFAULT 0"),
    // How many times the incident was reopened.
    ("incidents", "reopened", "INTEGER NOT NULL DEFAULT 0"),
    // When the current paging cycle began and its breach start on the node (Unix ms),
    // set when the incident reopens; NULL until then (the first cycle's are
    // `triggered_at_ms` and `breach_started_at_ms`).
    ("incidents", "cycle_triggered_at_ms", "INTEGER"),
    ("incidents", "cycle_breach_started_at_ms", "INTEGER"),
    // The silence ends when this incident resolves.
    ("silences", "ends_with_incident", "INTEGER"),
    // The paging cycle (the incident's `reopened` count) a route or a storm-held trigger
    // belongs to (`store::paging`).
    ("routing", "cycle", "INTEGER NOT NULL DEFAULT 0"),
    ("storm_held", "cycle", "INTEGER NOT NULL DEFAULT 0"),
    // The member's unit and threshold, so the incident shows the value of its worst
    // firing member with its unit (NULL for members from before: the incident's kept).
    ("incident_members", "unit", "TEXT"),
    ("incident_members", "threshold", "REAL"),
    // When the route escalated (Unix ms); NULL while it has not (`store::paging`).
    ("routing", "escalated_ms", "INTEGER"),
    // The highest severity the incident reached (P1 < P2 as text), kept by the
    // `incidents_peak_*` triggers: a P1 that calms to P2 before it resolves is a P1
    // for the KPIs and its post-mortem.
    ("incidents", "peak_severity", "TEXT NOT NULL DEFAULT ''"),
    // A hook run's key (`TOCSIN_RUN_KEY`, by which its processes are found) and what was
    // killed after it (`crate::hook::procs`); NULL for runs from before.
    ("hook_runs", "run_key", "TEXT"),
    ("hook_runs", "cleanup", "TEXT"),
    // The drill mark lives on the drill (`store::drills`): the end of the drill window
    // (Unix ms; NULL for drills from before, which mark nothing), whether the drill
    // pages the real routes at the real severity (`--page-real`), and when an
    // aggregator started while it was running (its run died).
    ("drills", "until_ms", "INTEGER"),
    ("drills", "page_real", "INTEGER NOT NULL DEFAULT 0"),
    ("drills", "restarted_ms", "INTEGER"),
    // The checks the drill mark applies to: a JSON array of SQL `LIKE` patterns
    // (`store::drills`); NULL for drills from before, whose mark applies to every check.
    ("drills", "scope", "TEXT"),
];

/// Triggers that keep `incidents.peak_severity` (created after the column exists).
const PEAK_TRIGGERS: &str = "
CREATE TRIGGER IF NOT EXISTS incidents_peak_insert AFTER INSERT ON incidents
BEGIN
    UPDATE incidents SET peak_severity = NEW.severity WHERE id = NEW.id;
END;
CREATE TRIGGER IF NOT EXISTS incidents_peak_update AFTER UPDATE OF severity ON incidents
WHEN NEW.peak_severity = '' OR NEW.severity < NEW.peak_severity
BEGIN
    UPDATE incidents SET peak_severity = NEW.severity WHERE id = NEW.id;
END;
UPDATE incidents SET peak_severity = severity WHERE peak_severity = '' OR severity < peak_severity;
";

/// Brings an existing database up to the current schema in place: adds missing columns
/// (checked with `pragma table_info`), then gives incidents from before grouping their
/// one member and their flapping hold. Idempotent; runs after [`SCHEMA`] and the paging
/// tables (`store::paging`) at every open.
///
/// # Errors
/// SQLite's.
pub fn migrate(conn: &rusqlite::Connection) -> rusqlite::Result<()> {
    let mut added_incident_columns = false;
    for (table, column, decl) in ADDED_COLUMNS {
        let exists: bool = conn
            .prepare(&format!(
                "SELECT 1 FROM pragma_table_info('{table}') WHERE name = ?1"
            ))?
            .exists([column])?;
        if !exists {
            conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {decl}"))?;
            // Not for the cycle columns, added long after grouping.
            added_incident_columns |= *table == "incidents" && !column.starts_with("cycle_");
            if (*table, *column) == ("routing", "escalated_ms") {
                // Escalations before the column: one per cycle, the `escalated` entry.
                conn.execute_batch(
                    "UPDATE routing SET escalated_ms =
                         (SELECT max(t.at_ms) FROM timeline t, incidents i
                          WHERE i.id = routing.incident_id AND t.incident_id = i.id
                            AND t.kind = 'escalated' AND t.id > i.timeline_mark)
                     WHERE cycle = (SELECT reopened FROM incidents WHERE id = routing.incident_id)",
                )?;
            }
        }
    }
    conn.execute_batch(
        "CREATE INDEX IF NOT EXISTS incidents_group ON incidents (group_key) WHERE status != 'resolved';",
    )?;
    conn.execute_batch(PEAK_TRIGGERS)?;
    if added_incident_columns {
        conn.execute_batch(
            "INSERT OR IGNORE INTO incident_members
                 (incident_id, fingerprint, node, check_name, labels, state, value, message, since_ms, updated_ms)
             SELECT id, fingerprint, node, check_name, labels,
                    CASE WHEN status = 'resolved' THEN 'ok' ELSE state END, value, summary,
                    triggered_at_ms, coalesce(resolved_at_ms, triggered_at_ms)
             FROM incidents;
             UPDATE incidents SET flapping_hold = 1
             WHERE status = 'triggered'
               AND EXISTS (SELECT 1 FROM timeline t WHERE t.incident_id = incidents.id AND t.kind = 'flapping')
               AND NOT EXISTS (SELECT 1 FROM timeline t WHERE t.incident_id = incidents.id AND t.kind = 'silenced')
               AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.incident_id = incidents.id AND o.kind = 'trigger');",
        )?;
    }
    Ok(())
}
