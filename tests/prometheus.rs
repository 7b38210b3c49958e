//! contrib/prometheus/pgcache.lua under the stock redis_exporter (Debian's
//! prometheus-redis-exporter), scraped over HTTP, and the Grafana dashboard
//! contrib/grafana/pgcache.json over the metrics it produces.

mod common;

use common::*;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// `$REDIS_EXPORTER`, else prometheus-redis-exporter (Debian) or
/// redis_exporter (upstream's name) on PATH or in /usr/bin.
fn exporter_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("REDIS_EXPORTER") {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "REDIS_EXPORTER={}: no such file (`make deps` installs prometheus-redis-exporter)",
            p.display()
        );
        return p;
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::env::split_paths(&path).chain([PathBuf::from("/usr/bin")]);
    for dir in dirs {
        for name in ["prometheus-redis-exporter", "redis_exporter"] {
            let p = dir.join(name);
            if p.is_file() {
                return p;
            }
        }
    }
    panic!(
        "redis_exporter not found (prometheus-redis-exporter on PATH or in /usr/bin): \
         run `make deps` (Debian package prometheus-redis-exporter), or set REDIS_EXPORTER"
    );
}

/// A redis_exporter with the pgcache script, killed when dropped (also
/// when the test panics).
struct Exporter {
    child: Child,
    port: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Exporter {
    fn start(redis_port: u16) -> Exporter {
        let bin = exporter_bin();
        let script = repo_file("contrib/prometheus/pgcache.lua");
        let mut last = String::new();
        for _ in 0..5 {
            let dir = tempfile::Builder::new()
                .prefix("pgcache-test-exporter-")
                .tempdir()
                .expect("tempdir");
            let log = dir.path().join("exporter.log");
            let out = std::fs::File::create(&log).expect("exporter log");
            let port = free_port();
            let mut cmd = Command::new(&bin);
            cmd.arg("-redis.addr")
                .arg(format!("redis://127.0.0.1:{redis_port}"))
                .arg("-web.listen-address")
                .arg(format!("127.0.0.1:{port}"))
                .arg("-script")
                .arg(&script)
                .stdin(Stdio::null())
                .stdout(out.try_clone().unwrap())
                .stderr(out);
            die_with_parent(&mut cmd);
            let child = cmd
                .spawn()
                .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
            let mut exporter = Exporter {
                child,
                port,
                log,
                _dir: dir,
            };
            match exporter.wait_listening() {
                Ok(()) => return exporter,
                Err(log) if log.contains("address already in use") => last = log,
                Err(log) => panic!("{} did not start:\n{log}", bin.display()),
            }
        }
        panic!("no free port for the exporter:\n{last}");
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_listening(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + HANG;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("exited ({status}); log:\n{}", self.log()));
            }
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "not listening after {HANG:?}; log:\n{}",
                    self.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// GET /metrics: the body of the answer.
    fn metrics_text(&self) -> String {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).expect("connect to the exporter");
        s.set_read_timeout(Some(HANG)).unwrap();
        // HTTP/1.0 without Accept-Encoding: a plain body, then the server closes.
        write!(
            s,
            "GET /metrics HTTP/1.0\r\nHost: 127.0.0.1:{}\r\n\r\n",
            self.port
        )
        .unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).expect("read /metrics");
        let (head, body) = answer
            .split_once("\r\n\r\n")
            .unwrap_or_else(|| panic!("not an HTTP answer: {answer:?}"));
        assert!(
            head.starts_with("HTTP/1.") && head.contains(" 200 "),
            "GET /metrics: {head}\n{}",
            self.log()
        );
        body.to_string()
    }

    fn scrape(&self) -> Scrape {
        let text = self.metrics_text();
        Scrape {
            values: script_values(&text),
            text,
        }
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One answer of /metrics.
struct Scrape {
    text: String,
    /// redis_script_values by key.
    values: BTreeMap<String, f64>,
}

impl Scrape {
    /// redis_script_values{key="<key>"}; panics (with the metrics) if absent.
    #[track_caller]
    fn value(&self, key: &str) -> f64 {
        *self.values.get(key).unwrap_or_else(|| {
            panic!(
                "no redis_script_values{{key={key:?}}} in /metrics; script values: {:?}\n{}",
                self.values,
                self.lines_of("redis_")
            )
        })
    }

    /// A metric without labels (`redis_up`).
    #[track_caller]
    fn plain(&self, name: &str) -> f64 {
        self.text
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /metrics:\n{}", self.text))
    }

    fn lines_of(&self, prefix: &str) -> String {
        self.text
            .lines()
            .filter(|l| l.starts_with(prefix) && !l.starts_with("redis_commands"))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// The `redis_script_values` samples of a /metrics text, by their `key`
/// label (later exporters add a `filename` label; it is ignored).
fn script_values(text: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("redis_script_values{") else {
            continue;
        };
        let (labels, value) = rest.split_once("} ").expect("a sample line");
        let key = labels
            .split(',')
            .find_map(|l| l.strip_prefix("key=\"")?.strip_suffix('"'))
            .unwrap_or_else(|| panic!("a script value without a key label: {line}"));
        let value: f64 = value
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("{line}: {e}"));
        assert!(
            out.insert(key.to_string(), value).is_none(),
            "key {key} twice in /metrics"
        );
    }
    out
}

/// Each `key="..."` a PromQL expression names.
fn keys_named(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("key") {
        rest = &rest[at + 3..];
        let after = rest.trim_start();
        if let Some(v) = after.strip_prefix("=\"") {
            let end = v.find('"').expect("a closed label value");
            out.push(v[..end].to_string());
        } else {
            assert!(
                !after.starts_with("=~") && !after.starts_with("!"),
                "the dashboard should match keys exactly (key=\"...\"): {expr}"
            );
        }
    }
    out
}

/// Every PromQL expression of the dashboard: its panels' `expr` and its
/// variables' queries.
fn dashboard_exprs(dashboard: &Value) -> Vec<String> {
    fn walk(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("expr" | "definition", Value::String(s)) => out.push(s.clone()),
                        ("query", Value::String(s)) => out.push(s.clone()),
                        _ => walk(v, out),
                    }
                }
            }
            Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(dashboard, &mut out);
    out
}

fn dashboard() -> Value {
    let path = repo_file("contrib/grafana/pgcache.json");
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// The integer figures of a PGCACHE.STATS answer.
fn figures(stats: &Value) -> BTreeMap<String, i64> {
    stats
        .as_object()
        .expect("STATS is an object")
        .iter()
        .filter_map(|(k, v)| Some((k.clone(), v.as_i64()?)))
        .collect()
}

#[test]
fn exporter_exposes_stats_and_the_dashboard_uses_them() {
    let pg = watched_pg();
    let r = RedisServer::with_pg(&pg, &[]);
    let mut c = r.con();
    // misses, then hits, and one row that does not exist
    for id in 1..=3 {
        read_row(&mut c, "users", &format!(r#"{{"id": {id}}}"#));
    }
    for id in [1, 2, 1] {
        read_row(&mut c, "users", &format!(r#"{{"id": {id}}}"#));
    }
    assert_eq!(read(&mut c, "users", r#"{"id": 999999}"#).unwrap(), None);

    let exporter = Exporter::start(r.port());
    let before = stats(&mut c);
    let first = exporter.scrape();
    let after = stats(&mut c);

    // what the README shows (cargo test ... -- --nocapture)
    println!("{}", first.lines_of("redis_script_values"));
    assert_eq!(first.plain("redis_up"), 1.0, "{}", exporter.log());
    assert_eq!(first.value("pgcache_up"), 1.0);
    assert_eq!(stat_of(&after, "hits"), 3, "{after}");
    assert_eq!(stat_of(&after, "misses"), 4, "{after}");
    assert_eq!(first.value("pgcache_hits"), 3.0);
    assert_eq!(first.value("pgcache_misses"), 4.0);
    assert_eq!(first.value("pgcache_not_found"), 1.0);
    // Every integer figure is there; those that did not move while the
    // exporter scraped have STATS's value.
    let (b, a) = (figures(&before), figures(&after));
    for (name, value) in &a {
        let got = first.value(&format!("pgcache_{name}"));
        if b.get(name) == Some(value) {
            assert_eq!(got, *value as f64, "pgcache_{name}: STATS says {value}");
        }
    }
    // the listener and the trust state, one-hot
    assert_eq!(stat_str(&after, "listener"), "connected");
    assert_eq!(first.value("pgcache_listener_connected"), 1.0);
    assert_eq!(first.value("pgcache_listener_error"), 0.0);
    for (state, want) in [
        ("connected", 1.0),
        ("connecting", 0.0),
        ("disconnected", 0.0),
        ("off", 0.0),
    ] {
        assert_eq!(
            first.value(&format!("pgcache_listener_state_{state}")),
            want
        );
    }
    assert_eq!(stat_str(&after, "trust_state"), "trusted");
    assert_eq!(first.value("pgcache_trust_state_trusted"), 1.0);
    assert_eq!(first.value("pgcache_trust_state_flushing"), 0.0);
    assert_eq!(
        first.value("pgcache_version"),
        200.0,
        "0.2.0 as MODULE LIST shows it"
    );
    // nothing but numbers: figures, the version and the one-hot states
    let expected_count = a.len() + 1 + 1 + 1 + 4 + 1 + 6;
    assert_eq!(
        first.values.len(),
        expected_count,
        "script values: {:?}",
        first.values
    );

    // another hit and an UPDATE-driven invalidation show on the next scrape
    read_row(&mut c, "users", r#"{"id": 3}"#);
    pg.execute("UPDATE users SET name = 'renamed' WHERE id = 1");
    wait_gone(&mut c, &user_key(1));
    let second = exporter.scrape();
    assert_eq!(
        second.value("pgcache_hits"),
        first.value("pgcache_hits") + 1.0
    );
    assert_eq!(
        second.value("pgcache_misses"),
        first.value("pgcache_misses")
    );
    assert_eq!(
        second.value("pgcache_entries_invalidated"),
        first.value("pgcache_entries_invalidated") + 1.0
    );
    assert_eq!(second.plain("redis_up"), 1.0);

    // The dashboard names only keys the script emits.
    let dash = dashboard();
    let exprs = dashboard_exprs(&dash);
    assert!(exprs.len() >= 8, "the dashboard's queries: {exprs:?}");
    let mut used = BTreeSet::new();
    for expr in &exprs {
        assert!(
            expr.contains("redis_script_values{"),
            "a dashboard query outside the script's metric: {expr}"
        );
        let keys = keys_named(expr);
        assert!(!keys.is_empty(), "a query naming no key: {expr}");
        for key in keys {
            assert!(
                second.values.contains_key(&key),
                "the dashboard names {key:?}, which the script does not emit: {expr}\nemitted: {:?}",
                second.values.keys().collect::<Vec<_>>()
            );
            used.insert(key);
        }
    }
    for key in [
        "pgcache_hits",
        "pgcache_misses",
        "pgcache_fill_latency_p50_us",
        "pgcache_fill_latency_p99_us",
        "pgcache_fills_in_flight",
        "pgcache_entries_invalidated",
        "pgcache_invalidations",
        "pgcache_listener_state_connected",
        "pgcache_busy_rejections",
    ] {
        assert!(used.contains(key), "the dashboard should show {key}");
    }
}

#[test]
fn without_the_module_the_script_says_pgcache_up_0() {
    let r = RedisServer::start_plain();
    let exporter = Exporter::start(r.port());
    let s = exporter.scrape();
    // Not an error: redis_exporter would report the whole Redis down.
    assert_eq!(s.plain("redis_up"), 1.0, "{}", exporter.log());
    assert_eq!(s.value("pgcache_up"), 0.0);
    assert_eq!(s.values.len(), 1, "only pgcache_up: {:?}", s.values);
}

#[test]
fn the_dashboard_imports() {
    let dash = dashboard();
    let inputs = dash["__inputs"].as_array().expect("__inputs");
    assert!(
        inputs
            .iter()
            .any(|i| i["name"] == "DS_PROMETHEUS" && i["pluginId"] == "prometheus"),
        "a DS_PROMETHEUS datasource input: {inputs:?}"
    );
    let schema = dash["schemaVersion"].as_i64().expect("schemaVersion");
    assert!((36..=39).contains(&schema), "schemaVersion {schema}");
    let panels = dash["panels"].as_array().expect("panels");
    let mut ids = BTreeSet::new();
    for p in panels {
        let title = p["title"].as_str().expect("a panel title");
        assert!(
            ids.insert(p["id"].as_i64().expect("a panel id")),
            "{title}: id twice"
        );
        assert_eq!(
            p["datasource"]["uid"], "${DS_PROMETHEUS}",
            "{title}: the datasource input"
        );
        let pos = &p["gridPos"];
        let (x, w) = (pos["x"].as_i64().unwrap(), pos["w"].as_i64().unwrap());
        assert!(x >= 0 && w > 0 && x + w <= 24, "{title}: gridPos {pos}");
        for t in p["targets"].as_array().expect("targets") {
            assert_eq!(t["datasource"]["uid"], "${DS_PROMETHEUS}", "{title}");
            assert!(t["expr"].is_string(), "{title}: a target without expr");
        }
    }
}
