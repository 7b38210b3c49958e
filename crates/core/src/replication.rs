//! The `replication` invalidation source's pure logic (design:
//! `logical-replication.md`): which cache keys a decoded change names, the
//! visibility barrier's snapshot test, the progress marker kept in Redis and
//! the rule that decides, on every (re)connection, between resuming from the
//! marker and a gap flush.
//!
//! Whatever cannot be mapped exactly to the keys READ would use becomes a
//! flush of the table; whatever breaks continuity, a gap flush. So this
//! source is never less safe than triggers and NOTIFY.

use crate::key::canonical_pk_value;
use crate::pgoutput::{format_lsn, parse_lsn, Datum, Lsn, Message, OldKind, ReplicaIdentity};
use crate::schema::TableSchema;
use serde_json::{Map, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

// ---------------------------------------------------------------------------
// the visibility barrier

/// `pg_current_snapshot()`: transactions below `xmin` have ended, those at
/// or above `xmax` had not started, `xip` were running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub xmin: u64,
    pub xmax: u64,
    pub xip: Vec<u64>,
}

impl Snapshot {
    /// Parses `pg_snapshot`'s text form, `xmin:xmax:xip,xip,...`.
    pub fn parse(text: &str) -> Option<Snapshot> {
        let mut parts = text.trim().split(':');
        let xmin = parts.next()?.parse().ok()?;
        let xmax = parts.next()?.parse().ok()?;
        let list = parts.next()?;
        if parts.next().is_some() || xmin > xmax {
            return None;
        }
        let xip = if list.is_empty() {
            Vec::new()
        } else {
            list.split(',')
                .map(|x| x.parse().ok())
                .collect::<Option<Vec<u64>>>()?
        };
        Some(Snapshot { xmin, xmax, xip })
    }

    /// The 64-bit id of a 32-bit xid pgoutput sent: the epoch of `xmax`,
    /// one less when that would put the xid at or above `xmax` (a decoded
    /// transaction has started, so it is below `xmax`).
    pub fn widen(&self, xid: u32) -> u64 {
        let epoch = self.xmax >> 32;
        let full = (epoch << 32) | u64::from(xid);
        if full >= self.xmax && epoch > 0 {
            full - (1 << 32)
        } else {
            full
        }
    }

    /// Whether the commit of `xid` is visible to a session taking this
    /// snapshot (and so to every fill that starts later).
    pub fn visible(&self, xid: u32) -> bool {
        let full = self.widen(xid);
        full < self.xmin || (full < self.xmax && !self.xip.contains(&full))
    }
}

// ---------------------------------------------------------------------------
// the progress marker

/// Progress kept in Redis, beside the entries it covers: every change up to
/// `lsn` (the end of the last applied commit) has been applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Marker {
    pub system_id: String,
    pub timeline: u32,
    pub database: String,
    pub slot: String,
    pub lsn: Lsn,
    /// The tables (key names, sorted) the publications covered: a table
    /// missing from them at the next connection left the publications
    /// meanwhile, its changes unstreamed, so its entries are flushed.
    pub tables: std::sync::Arc<[String]>,
}

/// 2: with `tables`.
const MARKER_VERSION: u64 = 2;

impl Marker {
    pub fn encode(&self) -> String {
        serde_json::json!({
            "v": MARKER_VERSION,
            "system_id": self.system_id,
            "timeline": self.timeline,
            "database": self.database,
            "slot": self.slot,
            "lsn": format_lsn(self.lsn),
            "tables": &*self.tables,
        })
        .to_string()
    }

    pub fn decode(text: &[u8]) -> Result<Marker, String> {
        let v: Value = serde_json::from_slice(text).map_err(|e| format!("not JSON: {e}"))?;
        let field = |name: &str| v.get(name).ok_or_else(|| format!("'{name}' is missing"));
        let string = |name: &str| -> Result<String, String> {
            field(name)?
                .as_str()
                .map(str::to_owned)
                .ok_or_else(|| format!("'{name}' is not a string"))
        };
        if field("v")?.as_u64() != Some(MARKER_VERSION) {
            return Err(format!("unknown version {}", field("v")?));
        }
        let timeline = field("timeline")?
            .as_u64()
            .and_then(|t| u32::try_from(t).ok())
            .ok_or("'timeline' is not a timeline")?;
        let lsn = parse_lsn(&string("lsn")?).ok_or("'lsn' is not a WAL position")?;
        let tables = field("tables")?
            .as_array()
            .and_then(|a| {
                a.iter()
                    .map(|t| t.as_str().map(str::to_owned))
                    .collect::<Option<Vec<String>>>()
            })
            .ok_or("'tables' is not a list of names")?;
        Ok(Marker {
            system_id: string("system_id")?,
            timeline,
            database: string("database")?,
            slot: string("slot")?,
            lsn,
            tables: tables.into(),
        })
    }
}

/// The server a replication connection reached (`IDENTIFY_SYSTEM`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    pub system_id: String,
    pub timeline: u32,
    pub database: String,
    /// Where its WAL ends now: entries are trusted once applied reaches it.
    pub xlogpos: Lsn,
}

/// The slot as `pg_replication_slots` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotState {
    pub plugin: String,
    pub database: String,
    pub confirmed_flush: Option<Lsn>,
    /// `reserved`, `extended`, `unreserved` or `lost`.
    pub wal_status: String,
}

/// Why the source drops everything instead of resuming.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GapReason {
    NoMarker,
    OtherServer,
    OtherTimeline,
    OtherDatabase,
    OtherSlot,
    SlotMissing,
    SlotLost,
    /// The slot was acknowledged past the marker (recreated, advanced, or
    /// the data set is older than what was acknowledged).
    SlotAhead,
    /// Changes could not be applied (the stream or the module failed).
    Internal,
}

impl GapReason {
    pub fn as_str(self) -> &'static str {
        match self {
            GapReason::NoMarker => "no_marker",
            GapReason::OtherServer => "other_server",
            GapReason::OtherTimeline => "other_timeline",
            GapReason::OtherDatabase => "other_database",
            GapReason::OtherSlot => "other_slot",
            GapReason::SlotMissing => "slot_missing",
            GapReason::SlotLost => "slot_lost",
            GapReason::SlotAhead => "slot_ahead",
            GapReason::Internal => "internal",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            GapReason::NoMarker => "no progress marker in Redis",
            GapReason::OtherServer => "the progress marker is of another PostgreSQL server",
            GapReason::OtherTimeline => "PostgreSQL is on another timeline (promoted or restored)",
            GapReason::OtherDatabase => "the progress marker is of another database",
            GapReason::OtherSlot => "the progress marker is of another replication slot",
            GapReason::SlotMissing => "the replication slot does not exist",
            GapReason::SlotLost => {
                "the replication slot lost WAL it needed (max_slot_wal_keep_size)"
            }
            GapReason::SlotAhead => {
                "the replication slot is past the progress marker (recreated, advanced, or Redis restored older data)"
            }
            GapReason::Internal => "changes could not be applied",
        }
    }
}

/// What to do on connecting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Stream from the marker; nothing is flushed.
    Resume { from: Lsn },
    /// Create the slot (when `create`; else drop and recreate it), stream
    /// from where it starts, and flush everything cached.
    Gap { reason: GapReason, slot: SlotAction },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotAction {
    /// Stream from the slot's own position.
    Use,
    Create,
    Recreate,
}

/// The resume rule (design §5).
pub fn plan(
    marker: Option<&Marker>,
    server: &Server,
    slot_name: &str,
    slot: Option<&SlotState>,
) -> Plan {
    let gap = |reason, slot| Plan::Gap { reason, slot };
    let Some(slot) = slot else {
        return gap(GapReason::SlotMissing, SlotAction::Create);
    };
    if slot.wal_status == "lost" || slot.plugin != "pgoutput" || slot.database != server.database {
        return gap(GapReason::SlotLost, SlotAction::Recreate);
    }
    let Some(marker) = marker else {
        return gap(GapReason::NoMarker, SlotAction::Use);
    };
    let reason = if marker.system_id != server.system_id {
        Some(GapReason::OtherServer)
    } else if marker.timeline != server.timeline {
        Some(GapReason::OtherTimeline)
    } else if marker.database != server.database {
        Some(GapReason::OtherDatabase)
    } else if marker.slot != slot_name {
        Some(GapReason::OtherSlot)
    } else if slot.confirmed_flush.is_some_and(|c| marker.lsn < c) {
        Some(GapReason::SlotAhead)
    } else {
        None
    };
    match reason {
        Some(r) => gap(r, SlotAction::Use),
        None => Plan::Resume { from: marker.lsn },
    }
}

// ---------------------------------------------------------------------------
// relations and keys

/// A published table as its latest Relation message described it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    pub oid: u32,
    pub schema: String,
    pub name: String,
    pub identity: ReplicaIdentity,
    /// Column names with their key flags, in tuple order.
    pub columns: Vec<(String, bool)>,
}

impl Relation {
    pub fn from_message(m: &Message<'_>) -> Option<Relation> {
        let Message::Relation {
            oid,
            namespace,
            name,
            identity,
            columns,
        } = m
        else {
            return None;
        };
        Some(Relation {
            oid: *oid,
            schema: (*namespace).to_owned(),
            name: (*name).to_owned(),
            identity: *identity,
            columns: columns.iter().map(|c| (c.name.to_owned(), c.key)).collect(),
        })
    }

    pub fn key_name(&self) -> String {
        crate::schema::key_name(&self.schema, &self.name)
    }
}

/// Where a table's primary-key columns sit in its tuples.
#[derive(Debug, Clone)]
pub struct KeyMap {
    pub table: Arc<TableSchema>,
    identity: ReplicaIdentity,
    /// Per `table.pk` column, its index in the tuple.
    positions: Vec<usize>,
    width: usize,
}

/// Maps `table` (the module's catalog) onto `rel` (what pgoutput says). An
/// error when they disagree: the table's entries are then flushed and the
/// table looked up again.
pub fn key_map(table: Arc<TableSchema>, rel: &Relation) -> Result<KeyMap, String> {
    if table.oid != 0 && table.oid != rel.oid {
        return Err(format!(
            "{} is another table now (oid {} was {})",
            rel.key_name(),
            rel.oid,
            table.oid
        ));
    }
    let mut positions = Vec::with_capacity(table.pk.len());
    for c in &table.pk {
        let Some(i) = rel.columns.iter().position(|(n, _)| n == &c.name) else {
            return Err(format!(
                "{}: the primary-key column '{}' is not published",
                rel.key_name(),
                c.name
            ));
        };
        positions.push(i);
    }
    if rel.identity == ReplicaIdentity::Default {
        let flagged: BTreeSet<&str> = rel
            .columns
            .iter()
            .filter(|(_, k)| *k)
            .map(|(n, _)| n.as_str())
            .collect();
        let pk: BTreeSet<&str> = table.pk.iter().map(|c| c.name.as_str()).collect();
        if flagged != pk {
            return Err(format!(
                "{}: the replica identity's columns are not the primary key",
                rel.key_name()
            ));
        }
    }
    Ok(KeyMap {
        table,
        identity: rel.identity,
        positions,
        width: rel.columns.len(),
    })
}

/// The canonical pk (as READ builds it) of a tuple's key columns.
pub fn tuple_key(map: &KeyMap, tuple: &[Datum<'_>]) -> Result<String, String> {
    if tuple.len() != map.width {
        return Err(format!(
            "a tuple of {} has {} columns, its relation {}",
            map.table.key_name,
            tuple.len(),
            map.width
        ));
    }
    let mut object = Map::with_capacity(map.positions.len());
    for (col, &i) in map.table.pk.iter().zip(&map.positions) {
        let text = match tuple[i] {
            Datum::Text(bytes) => std::str::from_utf8(bytes)
                .map_err(|_| format!("'{}' is not UTF-8 text", col.name))?,
            Datum::Null => return Err(format!("'{}' is null", col.name)),
            Datum::Unchanged => return Err(format!("'{}' was not sent (TOASTed)", col.name)),
            Datum::Binary(_) => return Err(format!("'{}' came in binary", col.name)),
        };
        object.insert(col.name.clone(), Value::String(text.to_owned()));
    }
    canonical_pk_value(&map.table, Value::Object(object))
        .map(|k| k.json)
        .map_err(|e| e.to_string())
}

/// The keys one change drops, or why its table must be flushed instead.
pub fn change_keys(map: &KeyMap, change: &Message<'_>) -> Result<Vec<String>, String> {
    let index_identity = || {
        format!(
            "{} has replica identity USING INDEX: its old keys are not sent",
            map.table.key_name
        )
    };
    let mut keys = Vec::with_capacity(2);
    let mut add = |k: String| {
        if !keys.contains(&k) {
            keys.push(k);
        }
    };
    match change {
        Message::Insert { new, .. } => add(tuple_key(map, new)?),
        Message::Update { old, new, .. } => {
            if map.identity == ReplicaIdentity::Index || map.identity == ReplicaIdentity::Nothing {
                return Err(index_identity());
            }
            if let Some((kind, old)) = old {
                add(old_key(map, *kind, old)?);
            }
            add(tuple_key(map, new)?);
        }
        Message::Delete {
            old: (kind, old), ..
        } => {
            if map.identity == ReplicaIdentity::Index || map.identity == ReplicaIdentity::Nothing {
                return Err(index_identity());
            }
            add(old_key(map, *kind, old)?);
        }
        _ => {}
    }
    Ok(keys)
}

/// An old tuple: `K` carries the identity's columns (the others null), `O`
/// the whole row; the key columns are set in both.
fn old_key(map: &KeyMap, _kind: OldKind, old: &[Datum<'_>]) -> Result<String, String> {
    tuple_key(map, old)
}

// ---------------------------------------------------------------------------
// what a batch of transactions drops

/// Keys and tables one batch of committed transactions drops.
#[derive(Debug, Default)]
pub struct Drops {
    /// Per table key name: its schema and canonical pks, each with the
    /// operation of its latest change (events carry it).
    pub keys: BTreeMap<String, (Arc<TableSchema>, BTreeMap<String, &'static str>)>,
    /// Tables flushed whole, by key name, with the operation that did it.
    pub tables: BTreeMap<String, (Option<Arc<TableSchema>>, &'static str)>,
    /// Changes counted in (every insert, update and delete).
    pub changes: u64,
}

impl Drops {
    /// Adds the keys of a change (`op`); past `limit` keys of one table,
    /// the table is flushed instead (a huge transaction must not become a
    /// huge DEL).
    pub fn add_keys(
        &mut self,
        table: &Arc<TableSchema>,
        keys: impl IntoIterator<Item = String>,
        op: &'static str,
        limit: usize,
    ) {
        self.add_keys_with(table, keys.into_iter().map(|k| (k, op)), limit);
    }

    fn add_keys_with(
        &mut self,
        table: &Arc<TableSchema>,
        keys: impl Iterator<Item = (String, &'static str)>,
        limit: usize,
    ) {
        if self.tables.contains_key(&table.key_name) {
            return;
        }
        let entry = self
            .keys
            .entry(table.key_name.clone())
            .or_insert_with(|| (table.clone(), BTreeMap::new()));
        let mut last = "UPDATE";
        for (key, op) in keys {
            entry.1.insert(key, op);
            last = op;
        }
        if entry.1.len() > limit {
            self.flush_table(table.key_name.clone(), Some(table.clone()), last);
        }
    }

    pub fn flush_table(
        &mut self,
        key_name: String,
        table: Option<Arc<TableSchema>>,
        op: &'static str,
    ) {
        self.keys.remove(&key_name);
        self.tables.entry(key_name).or_insert((table, op));
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty() && self.tables.is_empty()
    }

    pub fn key_count(&self) -> usize {
        self.keys.values().map(|(_, k)| k.len()).sum()
    }

    /// Adds a later transaction's drops (its operations win).
    pub fn merge(&mut self, other: Drops, limit: usize) {
        self.changes += other.changes;
        for (name, (table, op)) in other.tables {
            self.flush_table(name, table, op);
        }
        for (_, (table, keys)) in other.keys {
            self.add_keys_with(&table, keys.into_iter(), limit);
        }
    }
}

/// The notes table `sql/pgcache.sql` publishes: a TRUNCATE of a partition
/// (which pgoutput does not send when publishing via the root) writes a row
/// naming the root there.
pub const TRUNCATION_NOTES: &str = "pgcache_truncations";

/// Where a notes relation keeps the root's schema and name, if `rel` is one.
pub fn truncation_note_columns(rel: &Relation) -> Option<(usize, usize)> {
    if rel.name != TRUNCATION_NOTES {
        return None;
    }
    let at = |n: &str| rel.columns.iter().position(|(c, _)| c == n);
    Some((at("root_schema")?, at("root_name")?))
}

/// The root a note names (schema, name), from its new tuple.
pub fn truncation_note(columns: (usize, usize), change: &Message<'_>) -> Option<(String, String)> {
    let new = match change {
        Message::Insert { new, .. } | Message::Update { new, .. } => new,
        _ => return None,
    };
    let text = |i: usize| match new.get(i)? {
        Datum::Text(b) => std::str::from_utf8(b).ok().map(str::to_owned),
        _ => None,
    };
    Some((text(columns.0)?, text(columns.1)?))
}

/// The name an operation goes by in events and logs.
pub fn operation(change: &Message<'_>) -> &'static str {
    match change {
        Message::Insert { .. } => "INSERT",
        Message::Update { .. } => "UPDATE",
        Message::Delete { .. } => "DELETE",
        Message::Truncate { .. } => "TRUNCATE",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::{test_table, PkKind};

    #[test]
    fn snapshots_parse_and_decide_visibility() {
        let s = Snapshot::parse("760:765:760,763").unwrap();
        assert!(s.visible(759));
        assert!(!s.visible(760), "running");
        assert!(s.visible(761));
        assert!(!s.visible(763));
        assert!(!s.visible(765), "not started");
        assert!(Snapshot::parse("5:5:").unwrap().visible(4));
        for bad in ["", "1:2", "3:2:", "1:2:x", "1:2:3:4", "a:b:"] {
            assert_eq!(Snapshot::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn xids_take_the_epoch_of_xmax() {
        let epoch = 3u64 << 32;
        let s = Snapshot {
            xmin: epoch + 10,
            xmax: epoch + 20,
            xip: vec![epoch + 15],
        };
        assert_eq!(s.widen(15), epoch + 15);
        assert!(!s.visible(15) && s.visible(12) && s.visible(5));
        // Just below an epoch boundary: xmax wrapped, the xid did not.
        let s = Snapshot {
            xmin: epoch - 5,
            xmax: epoch + 2,
            xip: vec![epoch - 1],
        };
        assert_eq!(s.widen(u32::MAX), epoch - 1);
        assert!(!s.visible(u32::MAX));
        assert!(s.visible(u32::MAX - 10));
        assert!(s.visible(1));
    }

    fn marker(lsn: Lsn) -> Marker {
        Marker {
            system_id: "7300".into(),
            timeline: 1,
            database: "app".into(),
            slot: "pgcache".into(),
            lsn,
            tables: vec!["app.accounts".to_owned(), "users".to_owned()].into(),
        }
    }

    #[test]
    fn markers_round_trip_and_are_checked() {
        let m = marker(0x1_0000_0010);
        assert_eq!(Marker::decode(m.encode().as_bytes()).unwrap(), m);
        assert!(m.encode().contains("\"lsn\":\"1/10\""));
        assert!(m.encode().contains(r#""tables":["app.accounts","users"]"#));
        for bad in [
            "",
            "{}",
            r#"{"v":1,"system_id":"1","timeline":1,"database":"d","slot":"s","lsn":"0/1"}"#,
            r#"{"v":3,"system_id":"1","timeline":1,"database":"d","slot":"s","lsn":"0/1","tables":[]}"#,
            r#"{"v":2,"system_id":"1","timeline":-1,"database":"d","slot":"s","lsn":"0/1","tables":[]}"#,
            r#"{"v":2,"system_id":"1","timeline":1,"database":"d","slot":"s","lsn":"zz","tables":[]}"#,
            r#"{"v":2,"system_id":"1","timeline":1,"database":"d","slot":"s","lsn":"0/1"}"#,
            r#"{"v":2,"system_id":"1","timeline":1,"database":"d","slot":"s","lsn":"0/1","tables":[1]}"#,
        ] {
            assert!(Marker::decode(bad.as_bytes()).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_resume_rule() {
        let server = Server {
            system_id: "7300".into(),
            timeline: 1,
            database: "app".into(),
            xlogpos: 500,
        };
        let slot = SlotState {
            plugin: "pgoutput".into(),
            database: "app".into(),
            confirmed_flush: Some(100),
            wal_status: "reserved".into(),
        };
        let gap = |reason, slot| Plan::Gap { reason, slot };
        assert_eq!(
            plan(Some(&marker(100)), &server, "pgcache", Some(&slot)),
            Plan::Resume { from: 100 }
        );
        assert_eq!(
            plan(Some(&marker(300)), &server, "pgcache", Some(&slot)),
            Plan::Resume { from: 300 }
        );
        assert_eq!(
            plan(Some(&marker(99)), &server, "pgcache", Some(&slot)),
            gap(GapReason::SlotAhead, SlotAction::Use)
        );
        assert_eq!(
            plan(None, &server, "pgcache", Some(&slot)),
            gap(GapReason::NoMarker, SlotAction::Use)
        );
        assert_eq!(
            plan(Some(&marker(100)), &server, "pgcache", None),
            gap(GapReason::SlotMissing, SlotAction::Create)
        );
        let lost = SlotState {
            wal_status: "lost".into(),
            ..slot.clone()
        };
        assert_eq!(
            plan(Some(&marker(100)), &server, "pgcache", Some(&lost)),
            gap(GapReason::SlotLost, SlotAction::Recreate)
        );
        assert_eq!(
            plan(Some(&marker(100)), &server, "other", Some(&slot)),
            gap(GapReason::OtherSlot, SlotAction::Use)
        );
        let promoted = Server {
            timeline: 2,
            ..server.clone()
        };
        assert_eq!(
            plan(Some(&marker(100)), &promoted, "pgcache", Some(&slot)),
            gap(GapReason::OtherTimeline, SlotAction::Use)
        );
        let other = Server {
            system_id: "9".into(),
            ..server.clone()
        };
        assert_eq!(
            plan(Some(&marker(100)), &other, "pgcache", Some(&slot)),
            gap(GapReason::OtherServer, SlotAction::Use)
        );
    }

    fn rel(identity: ReplicaIdentity, cols: &[(&str, bool)]) -> Relation {
        Relation {
            oid: 1,
            schema: "public".into(),
            name: "users".into(),
            identity,
            columns: cols.iter().map(|(n, k)| (n.to_string(), *k)).collect(),
        }
    }

    #[test]
    fn keys_of_changes_are_reads_keys() {
        let table = Arc::new(test_table("users", &[("id", PkKind::Int32)]));
        let r = rel(ReplicaIdentity::Default, &[("id", true), ("name", false)]);
        let map = key_map(table.clone(), &r).unwrap();
        let ins = Message::Insert {
            oid: 0,
            new: vec![Datum::Text(b"0042"), Datum::Text(b"a")],
        };
        assert_eq!(change_keys(&map, &ins).unwrap(), vec![r#"{"id":42}"#]);
        let upd = Message::Update {
            oid: 0,
            old: Some((OldKind::Key, vec![Datum::Text(b"1"), Datum::Null])),
            new: vec![Datum::Text(b"2"), Datum::Unchanged],
        };
        assert_eq!(
            change_keys(&map, &upd).unwrap(),
            vec![r#"{"id":1}"#, r#"{"id":2}"#]
        );
        let del = Message::Delete {
            oid: 0,
            old: (OldKind::Key, vec![Datum::Text(b"7"), Datum::Null]),
        };
        assert_eq!(change_keys(&map, &del).unwrap(), vec![r#"{"id":7}"#]);
        // A key not sent, a null key, a short tuple: the table is flushed.
        for new in [
            vec![Datum::Unchanged, Datum::Text(b"a")],
            vec![Datum::Null, Datum::Text(b"a")],
            vec![Datum::Text(b"1")],
            vec![Datum::Text(b"x"), Datum::Text(b"a")],
        ] {
            assert!(change_keys(&map, &Message::Insert { oid: 0, new }).is_err());
        }
    }

    #[test]
    fn composite_and_typed_keys_follow_canonicalisation() {
        let table = Arc::new(test_table(
            "t",
            &[
                ("b", PkKind::Uuid),
                ("a", PkKind::Timestamptz),
                ("c", PkKind::Bpchar),
            ],
        ));
        let r = rel(
            ReplicaIdentity::Default,
            &[("a", true), ("b", true), ("c", true), ("v", false)],
        );
        let map = key_map(table, &r).unwrap();
        let ins = Message::Insert {
            oid: 0,
            new: vec![
                Datum::Text(b"2024-01-02 03:04:05+00"),
                Datum::Text(b"A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11"),
                Datum::Text(b"ab  "),
                Datum::Null,
            ],
        };
        let keys = change_keys(&map, &ins).unwrap();
        assert_eq!(keys.len(), 1);
        assert!(
            keys[0].contains("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
            "{}",
            keys[0]
        );
        assert!(keys[0].contains(r#""c":"ab""#), "{}", keys[0]);
    }

    #[test]
    fn identities_other_than_the_key() {
        let table = Arc::new(test_table("users", &[("id", PkKind::Int32)]));
        // Key flags that are not the primary key: refused (table flushed).
        let r = rel(ReplicaIdentity::Default, &[("id", false), ("email", true)]);
        assert!(key_map(table.clone(), &r).is_err());
        let r = rel(ReplicaIdentity::Default, &[("name", false)]);
        assert!(key_map(table.clone(), &r).is_err(), "pk not published");
        // FULL: every column flagged, the old row's key is used.
        let r = rel(ReplicaIdentity::Full, &[("id", true), ("name", true)]);
        let map = key_map(table.clone(), &r).unwrap();
        let del = Message::Delete {
            oid: 0,
            old: (OldKind::Full, vec![Datum::Text(b"3"), Datum::Text(b"x")]),
        };
        assert_eq!(change_keys(&map, &del).unwrap(), vec![r#"{"id":3}"#]);
        // USING INDEX: inserts map, updates and deletes flush the table.
        let r = rel(ReplicaIdentity::Index, &[("id", false), ("email", true)]);
        let map = key_map(table, &r).unwrap();
        assert!(change_keys(
            &map,
            &Message::Insert {
                oid: 0,
                new: vec![Datum::Text(b"1"), Datum::Text(b"e")]
            }
        )
        .is_ok());
        assert!(change_keys(
            &map,
            &Message::Delete {
                oid: 0,
                old: (OldKind::Key, vec![Datum::Null, Datum::Text(b"e")])
            }
        )
        .is_err());
    }

    #[test]
    fn truncation_notes_name_their_root() {
        let notes = Relation {
            oid: 9,
            schema: "public".into(),
            name: TRUNCATION_NOTES.into(),
            identity: ReplicaIdentity::Default,
            columns: vec![
                ("root_schema".into(), true),
                ("root_name".into(), true),
                ("truncated_at".into(), false),
            ],
        };
        let cols = truncation_note_columns(&notes).unwrap();
        let ins = Message::Insert {
            oid: 9,
            new: vec![Datum::Text(b"app"), Datum::Text(b"orders"), Datum::Null],
        };
        assert_eq!(
            truncation_note(cols, &ins),
            Some(("app".to_owned(), "orders".to_owned()))
        );
        assert_eq!(
            truncation_note_columns(&rel(ReplicaIdentity::Default, &[("id", true)])),
            None
        );
    }

    #[test]
    fn drops_flush_a_table_past_the_key_limit() {
        let table = Arc::new(test_table("users", &[("id", PkKind::Int32)]));
        let mut d = Drops::default();
        d.add_keys(&table, ["1".into(), "2".into()], "INSERT", 3);
        assert_eq!(d.key_count(), 2);
        d.add_keys(&table, ["2".into(), "3".into()], "UPDATE", 3);
        assert_eq!(d.key_count(), 3);
        assert_eq!(d.keys["users"].1["1"], "INSERT");
        assert_eq!(d.keys["users"].1["2"], "UPDATE", "the latest change's");
        let mut later = Drops::default();
        later.add_keys(&table, ["1".into()], "DELETE", 3);
        d.merge(later, 3);
        assert_eq!(d.keys["users"].1["1"], "DELETE", "a later transaction's");
        d.add_keys(&table, ["4".into()], "DELETE", 3);
        assert_eq!(d.key_count(), 0);
        assert_eq!(d.tables["users"].1, "DELETE");
        d.add_keys(&table, ["5".into()], "INSERT", 3);
        assert_eq!(d.key_count(), 0, "a flushed table needs no keys");
        let mut other = Drops::default();
        other.flush_table("t".into(), None, "TRUNCATE");
        d.merge(other, 3);
        assert_eq!(d.tables.len(), 2);
    }
}
