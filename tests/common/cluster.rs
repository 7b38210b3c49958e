//! A Redis Cluster of real servers on loopback, each loading pgcache, for
//! tests/cluster.rs (issue 14, SPEC §10).
//!
//! `Cluster::builder(&pg)` ... `start()` starts N primaries and N × R
//! replicas of `redis_server_bin()` (so `PGCACHE_SERVER=valkey` gives a
//! Valkey cluster), each in its own temporary directory, each loading the
//! module pointed at one shared PostgreSQL; forms the cluster with
//! `redis-cli --cluster create` and returns once every node reports
//! `cluster_state:ok`, every replica's link is up, `redis-cli --cluster
//! check` agrees, and every primary's invalidation listener is connected.
//! Dropping it kills every node (a stopped one too). One cluster runs at a
//! time per test process: `start` waits for the previous one to be dropped,
//! whatever `--test-threads` says.
//!
//! Nodes are named by their index in the order they were started (stable
//! across failovers: the roles move, the indices do not). What a node is
//! (primary, replica of whom, which slots) is read from the live cluster
//! each time it is asked.
//!
//! `Router` is a small cluster client: it routes a command by the CRC16
//! slot of one argument (the pk, as a stock client does once the module
//! declares it as a key), follows MOVED and ASK, and never hangs on a
//! stopped node. redis-rs's own cluster client routes unknown commands by
//! argument 1 (the table), so the tests do not use it.
//!
//! `ReadUpdateLoad` runs READs of `users` rows through a `Router` and
//! UPDATEs of the same rows in PostgreSQL on background threads, counting
//! what it saw, for the failover and resharding tests.

use super::{die_with_parent, err_text, module_path, redis_server_bin, stat_of, stats, tail};
use super::{wait_until_within, PgServer};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Number of hash slots.
pub const SLOTS: u16 = 16384;

// ---------------------------------------------------------------------------
// the hash slot

/// CRC16/XMODEM (poly 0x1021, init 0, no reflection), as Redis's `crc16`.
pub fn crc16_xmodem(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in data {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// What Redis hashes of a key: the text between the first `{` and the next
/// `}` when it is not empty, else the whole key.
pub fn hash_tag(key: &[u8]) -> &[u8] {
    if let Some(open) = key.iter().position(|&b| b == b'{') {
        if let Some(len) = key[open + 1..].iter().position(|&b| b == b'}') {
            if len > 0 {
                return &key[open + 1..open + 1 + len];
            }
        }
    }
    key
}

/// The hash slot of a key (`keyHashSlot`, `CLUSTER KEYSLOT`).
pub fn slot_of(key: &[u8]) -> u16 {
    crc16_xmodem(hash_tag(key)) & (SLOTS - 1)
}

// ---------------------------------------------------------------------------
// ports

/// Ports for cluster nodes come from [LOW, LOW + SPAN), their buses 10000
/// higher: all below the ephemeral range (32768+), where `free_port()`,
/// PostgreSQL and outgoing connections get theirs.
const PORT_LOW: u16 = 12000;
const PORT_SPAN: u16 = 10000;
const BUS_OFFSET: u16 = 10000;

/// A port p such that p and p + 10000 (its cluster bus) were both free a
/// moment ago on 127.0.0.1, and not handed out before by this process.
pub fn reserve_cluster_port() -> u16 {
    static TAKEN: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    static STATE: AtomicU64 = AtomicU64::new(0);
    if STATE.load(Ordering::Relaxed) == 0 {
        let seed = (std::process::id() as u64) << 32
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
            | 1;
        let _ = STATE.compare_exchange(0, seed, Ordering::Relaxed, Ordering::Relaxed);
    }
    for _ in 0..10_000 {
        // xorshift64
        let mut x = STATE.load(Ordering::Relaxed);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        STATE.store(x, Ordering::Relaxed);
        let p = PORT_LOW + (x % u64::from(PORT_SPAN)) as u16;
        let mut taken = TAKEN.lock().unwrap();
        if taken.contains(&p) {
            continue;
        }
        let free = |port: u16| TcpListener::bind(("127.0.0.1", port)).is_ok();
        if free(p) && free(p + BUS_OFFSET) {
            taken.insert(p);
            return p;
        }
    }
    panic!(
        "no free port pair (p, p+10000) in {PORT_LOW}..{}",
        PORT_LOW + PORT_SPAN
    );
}

// ---------------------------------------------------------------------------
// running redis-cli

/// What a `redis-cli` run did.
#[derive(Debug)]
pub struct CliRun {
    /// None: killed after its time limit.
    pub status: Option<ExitStatus>,
    /// stdout then stderr, colour codes removed.
    pub output: String,
    pub elapsed: Duration,
}

impl CliRun {
    pub fn success(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }
}

/// Remove ANSI colour sequences (`redis-cli --cluster` colours its output).
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\x1b' && chars.peek() == Some(&'[') {
            chars.next();
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Run `redis-cli` with `args`; killed after `limit`.
pub fn redis_cli(args: &[String], limit: Duration) -> CliRun {
    let started = Instant::now();
    let mut cmd = Command::new("redis-cli");
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    die_with_parent(&mut cmd);
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run redis-cli (Debian: redis-tools): {e}"));
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = Vec::new();
            let _ = r.read_to_end(&mut s);
            s
        })
    };
    let out = drain(Box::new(child.stdout.take().unwrap()));
    let err = drain(Box::new(child.stderr.take().unwrap()));
    let deadline = started + limit;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
        }
    };
    let mut text = String::from_utf8_lossy(&out.join().unwrap()).into_owned();
    text.push_str(&String::from_utf8_lossy(&err.join().unwrap()));
    CliRun {
        status,
        output: strip_ansi(&text),
        elapsed: started.elapsed(),
    }
}

// ---------------------------------------------------------------------------
// CLUSTER NODES

/// One line of `CLUSTER NODES`: one node as another node sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeView {
    pub id: String,
    pub port: u16,
    /// `myself`, `master`, `slave`, `fail?`, `fail`, `handshake`, ...
    pub flags: Vec<String>,
    /// The primary's id, for a replica.
    pub master: Option<String>,
    pub link: String,
    /// Slot ranges served (inclusive).
    pub slots: Vec<(u16, u16)>,
    /// `[slot->-id]`: slots migrating to id.
    pub migrating: Vec<(u16, String)>,
    /// `[slot-<-id]`: slots importing from id.
    pub importing: Vec<(u16, String)>,
}

impl NodeView {
    pub fn is_master(&self) -> bool {
        self.flags.iter().any(|f| f == "master")
    }
    pub fn is_replica(&self) -> bool {
        self.flags.iter().any(|f| f == "slave")
    }
    pub fn failing(&self) -> bool {
        self.flags.iter().any(|f| f == "fail" || f == "fail?")
    }
    pub fn myself(&self) -> bool {
        self.flags.iter().any(|f| f == "myself")
    }
    pub fn serves(&self, slot: u16) -> bool {
        self.slots.iter().any(|&(a, b)| a <= slot && slot <= b)
    }
    pub fn slot_count(&self) -> usize {
        self.slots
            .iter()
            .map(|&(a, b)| usize::from(b - a) + 1)
            .sum()
    }
    /// What every node must agree on: role, primary, slots, migrations.
    fn signature(&self) -> String {
        let role = if self.is_master() { "master" } else { "slave" };
        format!(
            "{} {role} {} {:?} {:?} {:?}",
            self.id,
            self.master.as_deref().unwrap_or("-"),
            self.slots,
            self.migrating,
            self.importing
        )
    }
}

/// Parse `CLUSTER NODES`.
pub fn parse_cluster_nodes(text: &str) -> Vec<NodeView> {
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 8 {
            continue;
        }
        // ip:port@cport[,hostname]
        let port = f[1]
            .split('@')
            .next()
            .and_then(|a| a.rsplit(':').next())
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        let mut v = NodeView {
            id: f[0].to_string(),
            port,
            flags: f[2].split(',').map(str::to_string).collect(),
            master: (f[3] != "-").then(|| f[3].to_string()),
            link: f[7].to_string(),
            slots: Vec::new(),
            migrating: Vec::new(),
            importing: Vec::new(),
        };
        for s in &f[8..] {
            if let Some(inner) = s.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
                if let Some((slot, id)) = inner.split_once("->-") {
                    v.migrating
                        .push((slot.parse().unwrap_or(0), id.to_string()));
                } else if let Some((slot, id)) = inner.split_once("-<-") {
                    v.importing
                        .push((slot.parse().unwrap_or(0), id.to_string()));
                }
            } else if let Some((a, b)) = s.split_once('-') {
                v.slots
                    .push((a.parse().unwrap_or(0), b.parse().unwrap_or(0)));
            } else if let Ok(n) = s.parse() {
                v.slots.push((n, n));
            }
        }
        out.push(v);
    }
    out
}

// ---------------------------------------------------------------------------
// the cluster

struct Node {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
    id: String,
    /// SIGSTOPped by `pause` (or `failover`).
    stopped: bool,
}

impl Node {
    fn log(&self) -> String {
        // lossy: a crash report may quote binary arguments
        fs::read(self.dir.path().join("redis.log"))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The process has exited (a zombie: nobody waited for it yet).
    fn exited(&self) -> bool {
        let stat =
            fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        // pid (comm) state ...
        stat.rsplit_once(')')
            .map(|(_, rest)| rest.trim_start().starts_with(['Z', 'X']))
            .unwrap_or(true)
    }
}

/// The gist of a crash report in `log` (Redis or Valkey): the lines before
/// it, the assertion or signal, and the stack of the crashing thread
/// (Valkey marks it with `*`; Redis prints one backtrace).
pub fn crash_report(log: &str) -> Option<String> {
    let start = log.find("BUG REPORT START")?;
    let before: Vec<&str> = log[..start].lines().rev().take(3).collect();
    let mut out: Vec<&str> = before.into_iter().rev().collect();
    let lines: Vec<&str> = log[start..].lines().collect();
    let trace = lines
        .iter()
        .position(|l| l.starts_with("------ STACK TRACE"))
        .unwrap_or(lines.len());
    out.extend(&lines[..trace.min(lines.len())]);
    let rest = &lines[(trace + 1).min(lines.len())..];
    let from = rest
        .iter()
        .position(|l| l.ends_with(" *"))
        .unwrap_or_else(|| rest.iter().position(|l| !l.trim().is_empty()).unwrap_or(0));
    let mut seen = false;
    for l in rest[from..].iter().take(40) {
        if l.trim().is_empty() {
            if seen {
                break;
            }
            continue;
        }
        if l.starts_with("Backtrace:") {
            continue;
        }
        seen = true;
        out.push(l);
    }
    Some(out.join("\n"))
}

/// How a cluster is started: `Cluster::builder(&pg)`, options, `start()`.
#[derive(Clone)]
pub struct ClusterBuilder {
    primaries: usize,
    replicas_per_primary: usize,
    node_timeout_ms: u64,
    module_args: Vec<String>,
    server_args: Vec<String>,
}

impl ClusterBuilder {
    /// Number of primaries (at least 3: `redis-cli --cluster create` wants 3).
    pub fn primaries(mut self, n: usize) -> Self {
        self.primaries = n;
        self
    }
    /// Replicas of each primary (`--cluster-replicas`).
    pub fn replicas_per_primary(mut self, n: usize) -> Self {
        self.replicas_per_primary = n;
        self
    }
    /// `cluster-node-timeout` (default 2000 ms).
    pub fn node_timeout_ms(mut self, ms: u64) -> Self {
        self.node_timeout_ms = ms;
        self
    }
    /// More module arguments, after the PostgreSQL ones.
    pub fn module_args(mut self, args: &[&str]) -> Self {
        self.module_args.extend(args.iter().map(|a| a.to_string()));
        self
    }
    /// More redis-server options, after the harness's.
    pub fn server_args(mut self, args: &[&str]) -> Self {
        self.server_args.extend(args.iter().map(|a| a.to_string()));
        self
    }

    /// Start the nodes, form the cluster, wait until it is ok and every
    /// primary's module is ready. Panics (with the nodes' logs) otherwise.
    pub fn start(&self) -> Cluster {
        assert!(
            self.primaries >= 3,
            "redis-cli --cluster create needs 3 primaries"
        );
        let total = self.primaries * (1 + self.replicas_per_primary);
        let serial = ONE_CLUSTER_AT_A_TIME
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let started = Instant::now();
        let mut cluster = Cluster {
            nodes: Vec::with_capacity(total),
            builder: self.clone(),
            setup_time: Duration::ZERO,
            _serial: serial,
        };
        for _ in 0..total {
            let node = self.spawn_node(&cluster);
            cluster.nodes.push(node);
        }
        for i in 0..total {
            let id: String = redis::cmd("CLUSTER")
                .arg("MYID")
                .query(&mut cluster.con(i))
                .unwrap_or_else(|e| cluster.fail(&format!("CLUSTER MYID on node {i}: {e}")));
            cluster.nodes[i].id = id;
        }
        let mut args = vec!["--cluster".to_string(), "create".to_string()];
        args.extend(
            cluster
                .nodes
                .iter()
                .map(|n| format!("127.0.0.1:{}", n.port)),
        );
        args.extend([
            "--cluster-replicas".to_string(),
            self.replicas_per_primary.to_string(),
            "--cluster-yes".to_string(),
        ]);
        let run = redis_cli(&args, Duration::from_secs(60));
        if !run.success() {
            cluster.fail(&format!(
                "redis-cli {} failed ({:?}):\n{}",
                args.join(" "),
                run.status,
                run.output
            ));
        }
        cluster.wait_ok(Duration::from_secs(30));
        cluster.wait_modules_ready(Duration::from_secs(30));
        cluster.setup_time = started.elapsed();
        cluster
    }

    fn spawn_node(&self, cluster: &Cluster) -> Node {
        let mut last = String::new();
        for _ in 0..5 {
            let dir = tempfile::Builder::new()
                .prefix("pgcache-test-cluster-")
                .tempdir()
                .expect("tempdir");
            let port = reserve_cluster_port();
            let mut cmd = Command::new(redis_server_bin());
            cmd.arg("--port")
                .arg(port.to_string())
                .args(["--bind", "127.0.0.1"])
                .args(["--cluster-enabled", "yes"])
                .args(["--cluster-config-file", "nodes.conf"])
                .arg("--cluster-node-timeout")
                .arg(self.node_timeout_ms.to_string())
                .arg("--cluster-port")
                .arg((port + BUS_OFFSET).to_string())
                .args(["--save", ""])
                .args(["--appendonly", "no"])
                // a replica's first sync at once, not after the default 5 s
                .args(["--repl-diskless-sync-delay", "0"])
                // a crash ends the process at once (no memory test)
                .args(["--crash-memcheck-enabled", "no"])
                .arg("--dir")
                .arg(dir.path())
                .arg("--logfile")
                .arg(dir.path().join("redis.log"))
                .args(&self.server_args)
                .arg("--loadmodule")
                .arg(module_path())
                .args(&self.module_args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            die_with_parent(&mut cmd);
            let child = cmd.spawn().expect("spawn redis-server");
            let mut node = Node {
                child,
                port,
                dir,
                id: String::new(),
                stopped: false,
            };
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if let Ok(Some(status)) = node.child.try_wait() {
                    last = format!("exited ({status}); log:\n{}", tail(&node.log(), 40));
                    break;
                }
                if raw_ping(port, Duration::from_millis(200)) {
                    return node;
                }
                if Instant::now() > deadline {
                    let _ = node.child.kill();
                    cluster.fail(&format!(
                        "cluster node on port {port} neither answered PING nor exited; log:\n{}",
                        tail(&node.log(), 40)
                    ));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            if !last.contains("Address already in use") {
                break;
            }
        }
        cluster.fail(&format!("a cluster node did not start: {last}"))
    }
}

/// PING over a plain socket with a time limit: false for a stopped node.
pub fn raw_ping(port: u16, limit: Duration) -> bool {
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let Ok(mut s) = TcpStream::connect_timeout(&addr, limit) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(limit));
    if s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 64];
    matches!(s.read(&mut buf), Ok(n) if buf[..n].starts_with(b"+PONG"))
}

/// A running cluster. Nodes are named by index (`0..nodes()`).
pub struct Cluster {
    nodes: Vec<Node>,
    builder: ClusterBuilder,
    setup_time: Duration,
    /// One cluster at a time in a test process (`make test` runs two test
    /// threads; two clusters on two cores would make the timings
    /// meaningless). Released after the nodes are killed.
    _serial: std::sync::MutexGuard<'static, ()>,
}

static ONE_CLUSTER_AT_A_TIME: Mutex<()> = Mutex::new(());

/// What `failover` saw, timed from the CLUSTER FAILOVER (manual) or the
/// SIGSTOP of the primary (automatic).
#[derive(Clone, Debug)]
pub struct FailoverReport {
    pub manual: bool,
    pub old_primary: usize,
    pub new_primary: usize,
    /// The replica says it is a primary (ROLE).
    pub promoted_after: Duration,
    /// Every running node says `cluster_state:ok` and they agree.
    pub cluster_ok_after: Duration,
    /// Automatic: the old primary was continued (after `cluster_ok_after`)
    /// and has rejoined as a replica of the new one; the cluster is ok
    /// and `redis-cli --cluster check` agrees. Manual: when the old primary
    /// is a replica with its link up.
    pub rejoined_after: Duration,
    /// The new primary's listener is connected and its gap flush is over.
    pub listener_ready_after: Duration,
}

impl std::fmt::Display for FailoverReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} failover of node {} to node {}: promoted after {:?}, cluster ok after {:?}, \
             old primary rejoined as replica after {:?}, new primary's listener ready after {:?}",
            if self.manual { "manual" } else { "automatic" },
            self.old_primary,
            self.new_primary,
            self.promoted_after,
            self.cluster_ok_after,
            self.rejoined_after,
            self.listener_ready_after
        )
    }
}

impl Cluster {
    /// 3 primaries, no replicas, node timeout 2000 ms, the module pointed at
    /// `pg`.
    pub fn builder(pg: &PgServer) -> ClusterBuilder {
        ClusterBuilder {
            primaries: 3,
            replicas_per_primary: 0,
            node_timeout_ms: 2000,
            module_args: pg.module_args(),
            server_args: Vec::new(),
        }
    }

    /// `primaries` primaries with `replicas_per_primary` replicas each.
    pub fn start(pg: &PgServer, primaries: usize, replicas_per_primary: usize) -> Cluster {
        Self::builder(pg)
            .primaries(primaries)
            .replicas_per_primary(replicas_per_primary)
            .start()
    }

    /// From spawning the first node to the cluster being ok and ready.
    pub fn setup_time(&self) -> Duration {
        self.setup_time
    }

    pub fn nodes(&self) -> usize {
        self.nodes.len()
    }

    pub fn port(&self, i: usize) -> u16 {
        self.nodes[i].port
    }

    /// The node's cluster id (40 hex digits).
    pub fn id(&self, i: usize) -> &str {
        &self.nodes[i].id
    }

    pub fn pid(&self, i: usize) -> u32 {
        self.nodes[i].child.id()
    }

    pub fn is_stopped(&self, i: usize) -> bool {
        self.nodes[i].stopped
    }

    pub fn index_of_id(&self, id: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.id == id)
    }

    pub fn index_of_port(&self, port: u16) -> Option<usize> {
        self.nodes.iter().position(|n| n.port == port)
    }

    pub fn log(&self, i: usize) -> String {
        self.nodes[i].log()
    }

    /// The last `lines` lines of every node's log, for a failure message.
    pub fn logs_tail(&self, lines: usize) -> String {
        let mut s = String::new();
        for (i, n) in self.nodes.iter().enumerate() {
            s.push_str(&format!(
                "---- node {i} (port {}{}) log tail ----\n{}\n",
                n.port,
                if n.stopped { ", stopped" } else { "" },
                tail(&n.log(), lines)
            ));
        }
        s
    }

    /// Panic with `what` and the nodes' log tails.
    #[track_caller]
    pub fn fail(&self, what: &str) -> ! {
        panic!("{what}{}\n{}", self.crashes(), self.logs_tail(25))
    }

    /// Has node `i`'s process exited?
    pub fn exited(&self, i: usize) -> bool {
        self.nodes[i].exited()
    }

    /// "node i has exited" and its crash report, for every node that
    /// exited or is writing a crash report (then it is given 3 s to exit).
    pub fn crashes(&self) -> String {
        let mut s = String::new();
        for (i, n) in self.nodes.iter().enumerate() {
            if !n.exited() && n.log().contains("BUG REPORT START") {
                let deadline = Instant::now() + Duration::from_secs(3);
                while !n.exited() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            if n.exited() {
                let log = n.log();
                s.push_str(&format!(
                    "\n==== node {i} (port {}) has exited ====\n{}",
                    n.port,
                    crash_report(&log).unwrap_or_else(|| tail(&log, 30))
                ));
            }
        }
        s
    }

    /// A plain connection to node `i` (no read timeout; see
    /// `RedisServer::con`). Panics if the node is stopped.
    pub fn con(&self, i: usize) -> redis::Connection {
        assert!(!self.nodes[i].stopped, "node {i} is stopped");
        redis::Client::open(format!("redis://127.0.0.1:{}/", self.nodes[i].port))
            .unwrap()
            .get_connection_with_timeout(Duration::from_secs(10))
            .unwrap_or_else(|e| self.fail(&format!("connect to cluster node {i}: {e}")))
    }

    /// A connection to node `i` after `READONLY`: a replica serves reads
    /// of its primary's slots on it.
    pub fn con_readonly(&self, i: usize) -> redis::Connection {
        let mut c = self.con(i);
        let _: () = redis::cmd("READONLY").query(&mut c).unwrap();
        c
    }

    /// A connection to every node, by index (None for a stopped one).
    pub fn cons(&self) -> Vec<Option<redis::Connection>> {
        (0..self.nodes())
            .map(|i| (!self.is_stopped(i)).then(|| self.con(i)))
            .collect()
    }

    /// `CLUSTER NODES` of node `i`, parsed.
    pub fn cluster_nodes(&self, i: usize) -> Result<Vec<NodeView>, String> {
        let mut c = self.con(i);
        let text: String = redis::cmd("CLUSTER")
            .arg("NODES")
            .query(&mut c)
            .map_err(|e| e.to_string())?;
        Ok(parse_cluster_nodes(&text))
    }

    /// The cluster as the first running node sees it.
    pub fn view(&self) -> Vec<NodeView> {
        let i = (0..self.nodes())
            .find(|&i| !self.is_stopped(i))
            .expect("every node is stopped");
        self.cluster_nodes(i)
            .unwrap_or_else(|e| self.fail(&format!("CLUSTER NODES on node {i}: {e}")))
    }

    fn index_in(&self, v: &NodeView) -> usize {
        self.index_of_id(&v.id)
            .unwrap_or_else(|| panic!("CLUSTER NODES names an unknown node {v:?}"))
    }

    /// The primaries (not failed), ordered by their first slot.
    pub fn primaries(&self) -> Vec<usize> {
        let mut p: Vec<&NodeView> = Vec::new();
        let view = self.view();
        for v in &view {
            if v.is_master() && !v.flags.iter().any(|f| f == "fail") {
                p.push(v);
            }
        }
        p.sort_by_key(|v| v.slots.first().map(|s| s.0).unwrap_or(SLOTS));
        p.into_iter().map(|v| self.index_in(v)).collect()
    }

    /// The replicas of primary `p`.
    pub fn replicas_of(&self, p: usize) -> Vec<usize> {
        let id = self.id(p).to_string();
        let mut r: Vec<usize> = self
            .view()
            .iter()
            .filter(|v| v.is_replica() && v.master.as_deref() == Some(id.as_str()))
            .map(|v| self.index_in(v))
            .collect();
        r.sort();
        r
    }

    /// The primary of replica `r` (None if it is a primary).
    pub fn primary_of(&self, r: usize) -> Option<usize> {
        let view = self.view();
        let v = view.iter().find(|v| v.id == self.id(r))?;
        v.master.as_deref().and_then(|m| self.index_of_id(m))
    }

    /// The primary serving `slot`.
    pub fn node_for_slot(&self, slot: u16) -> usize {
        let view = self.view();
        let v = view
            .iter()
            .find(|v| v.is_master() && v.serves(slot))
            .unwrap_or_else(|| self.fail(&format!("no primary serves slot {slot}: {view:?}")));
        self.index_in(v)
    }

    /// For every slot, the index of the primary serving it (from one view;
    /// `usize::MAX` for a slot nobody serves).
    pub fn slot_owners(&self) -> Vec<usize> {
        let view = self.view();
        let mut owners = vec![usize::MAX; usize::from(SLOTS)];
        for v in view.iter().filter(|v| v.is_master()) {
            let i = self.index_in(v);
            for &(a, b) in &v.slots {
                for s in a..=b {
                    owners[usize::from(s)] = i;
                }
            }
        }
        owners
    }

    /// The primary serving the slot of `key`.
    pub fn node_for_key(&self, key: &[u8]) -> usize {
        self.node_for_slot(slot_of(key))
    }

    /// The slot ranges node `i` serves: its own as a primary, its
    /// primary's as a replica.
    pub fn served_slots(&self, i: usize) -> Vec<(u16, u16)> {
        served_slots_in(&self.view(), self.id(i))
    }

    /// An integer field of node `i`'s `PGCACHE.STATS`.
    pub fn stat(&self, i: usize, name: &str) -> i64 {
        stat_of(&stats(&mut self.con(i)), name)
    }

    /// `DBSIZE` of node `i`.
    pub fn dbsize(&self, i: usize) -> i64 {
        redis::cmd("DBSIZE").query(&mut self.con(i)).unwrap()
    }

    /// `DBSIZE` of every running node (None for a stopped one).
    pub fn dbsizes(&self) -> Vec<Option<i64>> {
        (0..self.nodes())
            .map(|i| (!self.is_stopped(i)).then(|| self.dbsize(i)))
            .collect()
    }

    /// `CLUSTER KEYSLOT key` on node `i`.
    pub fn keyslot(&self, i: usize, key: &[u8]) -> u16 {
        redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query(&mut self.con(i))
            .unwrap()
    }

    /// `CLUSTER COUNTKEYSINSLOT slot` on node `i` (its own keys in that
    /// slot, whether it serves the slot or not).
    pub fn count_keys_in_slot(&self, i: usize, slot: u16) -> i64 {
        redis::cmd("CLUSTER")
            .arg("COUNTKEYSINSLOT")
            .arg(slot)
            .query(&mut self.con(i))
            .unwrap()
    }

    /// Every key of node `i` matching `pattern` (SCAN; sorted).
    pub fn scan_keys(&self, i: usize, pattern: &str) -> Vec<String> {
        let mut c = self.con(i);
        let mut cursor: u64 = 0;
        let mut out = Vec::new();
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(1000)
                .query(&mut c)
                .unwrap();
            out.extend(keys);
            if next == 0 {
                break;
            }
            cursor = next;
        }
        out.sort();
        out
    }

    /// Run `f` on a connection to every running node.
    pub fn on_every_node(&self, mut f: impl FnMut(usize, &mut redis::Connection)) {
        for i in 0..self.nodes() {
            if !self.is_stopped(i) {
                f(i, &mut self.con(i));
            }
        }
    }

    // -- state checks

    /// Ok when every running node says `cluster_state:ok`, knows every
    /// node, sees no running node failing, all agree on roles and slots,
    /// no slot is migrating, every running replica's link is up, and (when
    /// no node is stopped) `redis-cli --cluster check` agrees.
    pub fn check_state(&self) -> Result<(), String> {
        if (0..self.nodes()).any(|i| self.exited(i)) {
            self.fail("a cluster node has exited");
        }
        let running: Vec<usize> = (0..self.nodes()).filter(|&i| !self.is_stopped(i)).collect();
        let mut signature: Option<(usize, Vec<String>)> = None;
        for &i in &running {
            let mut c = self.con(i);
            let info: String = redis::cmd("CLUSTER")
                .arg("INFO")
                .query(&mut c)
                .map_err(|e| format!("node {i}: CLUSTER INFO: {e}"))?;
            if !info.contains("cluster_state:ok") {
                return Err(format!(
                    "node {i} (port {}): {}",
                    self.port(i),
                    info.lines().next().unwrap_or("")
                ));
            }
            if !info.contains(&format!("cluster_known_nodes:{}\r", self.nodes())) {
                return Err(format!("node {i} does not know every node yet"));
            }
            let view = self.cluster_nodes(i)?;
            for v in &view {
                let Some(j) = self.index_of_id(&v.id) else {
                    return Err(format!("node {i} sees an unknown node {v:?}"));
                };
                if !self.is_stopped(j) && (v.failing() || v.flags.iter().any(|f| f == "handshake"))
                {
                    return Err(format!("node {i} sees node {j} as {:?}", v.flags));
                }
                if !v.migrating.is_empty() || !v.importing.is_empty() {
                    return Err(format!("node {i} sees open slots on node {j}: {v:?}"));
                }
            }
            let mut sig: Vec<String> = view
                .iter()
                .filter(|v| self.index_of_id(&v.id).is_some_and(|j| !self.is_stopped(j)))
                .map(NodeView::signature)
                .collect();
            sig.sort();
            match &signature {
                None => signature = Some((i, sig)),
                Some((first, s)) if *s != sig => {
                    return Err(format!(
                        "nodes {first} and {i} disagree:\n{}\nvs\n{}",
                        s.join("\n"),
                        sig.join("\n")
                    ))
                }
                Some(_) => {}
            }
            if view.iter().any(|v| v.myself() && v.is_replica()) {
                let repl: String = redis::cmd("INFO")
                    .arg("replication")
                    .query(&mut c)
                    .map_err(|e| e.to_string())?;
                if !repl.contains("master_link_status:up") {
                    return Err(format!("replica node {i}: link to its primary not up"));
                }
            }
        }
        if running.len() == self.nodes() {
            let run = self.cluster_check();
            let agree = run
                .output
                .contains("[OK] All nodes agree about slots configuration.");
            let covered = run.output.contains("[OK] All 16384 slots covered.");
            if !run.success() || !agree || !covered || run.output.contains("[ERR]") {
                return Err(format!(
                    "redis-cli --cluster check ({:?}):\n{}",
                    run.status, run.output
                ));
            }
        }
        Ok(())
    }

    /// `redis-cli --cluster check` through the first running node.
    pub fn cluster_check(&self) -> CliRun {
        let i = (0..self.nodes()).find(|&i| !self.is_stopped(i)).unwrap();
        redis_cli(
            &[
                "--cluster".into(),
                "check".into(),
                format!("127.0.0.1:{}", self.port(i)),
            ],
            Duration::from_secs(20),
        )
    }

    /// Wait until `check_state` passes; panics after `bound` with the last
    /// reason and the logs.
    #[track_caller]
    pub fn wait_ok(&self, bound: Duration) {
        let deadline = Instant::now() + bound;
        loop {
            match self.check_state() {
                Ok(()) => return,
                Err(why) if Instant::now() > deadline => {
                    self.fail(&format!("the cluster was not ok within {bound:?}: {why}"))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    fn listener_expected(&self) -> bool {
        let a = &self.builder.module_args;
        !a.windows(2)
            .any(|w| w[0] == "invalidation_channel" && w[1].is_empty())
    }

    /// Whether node `i`'s module is ready: a primary's listener connected
    /// and no gap flush running (or no listener configured).
    pub fn module_ready(&self, i: usize) -> Result<(), String> {
        let s = stats(&mut self.con(i));
        let listener = s["listener"].as_str().unwrap_or("").to_string();
        if !self.listener_expected()
            || (listener == "connected" && stat_of(&s, "gap_flush_running") == 0)
        {
            Ok(())
        } else {
            Err(format!("node {i}: {s}"))
        }
    }

    /// Wait until every running primary's module is ready.
    #[track_caller]
    pub fn wait_modules_ready(&self, bound: Duration) {
        let primaries = self.primaries();
        wait_until_within("every primary's pgcache listener is ready", bound, || {
            for &p in &primaries {
                if !self.is_stopped(p) {
                    self.module_ready(p)?;
                }
            }
            Ok(())
        });
    }

    // -- stopping nodes, failover, resharding

    /// SIGSTOP node `i`.
    pub fn pause(&mut self, i: usize) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.pid(i) as libc::pid_t, libc::SIGSTOP);
        }
        self.nodes[i].stopped = true;
    }

    /// SIGCONT node `i`.
    pub fn resume(&mut self, i: usize) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.pid(i) as libc::pid_t, libc::SIGCONT);
        }
        self.nodes[i].stopped = false;
    }

    fn role(&self, i: usize) -> Option<String> {
        let mut c = self.con(i);
        let v: redis::Value = redis::cmd("ROLE").query(&mut c).ok()?;
        match v {
            redis::Value::Array(items) => match items.first() {
                Some(redis::Value::BulkString(b)) => Some(String::from_utf8_lossy(b).into_owned()),
                Some(redis::Value::SimpleString(s)) => Some(s.clone()),
                _ => None,
            },
            _ => None,
        }
    }

    /// Fail primary-of-`replica` over to `replica`.
    ///
    /// Manual: `CLUSTER FAILOVER` on the replica; the replica must be a
    /// primary within 10 s. Automatic: SIGSTOP the primary; the replica must
    /// be promoted and the running nodes ok within 30 s; then SIGCONT, and
    /// the old primary must rejoin as a replica. Either way returns once the
    /// cluster is ok, agreed and the new primary's listener ready.
    pub fn failover(&mut self, replica: usize, manual: bool) -> FailoverReport {
        let old = self
            .primary_of(replica)
            .unwrap_or_else(|| self.fail(&format!("node {replica} is not a replica")));
        let t0 = Instant::now();
        if manual {
            let r: redis::RedisResult<String> = redis::cmd("CLUSTER")
                .arg("FAILOVER")
                .query(&mut self.con(replica));
            if let Err(e) = r {
                self.fail(&format!("CLUSTER FAILOVER on node {replica}: {e}"));
            }
        } else {
            self.pause(old);
        }
        let promote_bound = if manual {
            Duration::from_secs(10)
        } else {
            Duration::from_secs(30)
        };
        loop {
            if self.role(replica).as_deref() == Some("master") {
                break;
            }
            if t0.elapsed() > promote_bound {
                let how = if manual {
                    "CLUSTER FAILOVER"
                } else {
                    "SIGSTOP of its primary"
                };
                if !manual {
                    self.resume(old);
                }
                self.fail(&format!(
                    "{how}: replica node {replica} was not promoted within {promote_bound:?} \
                     (ROLE: {:?})",
                    self.role(replica)
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let promoted_after = t0.elapsed();
        // the running nodes agree that the cluster is ok
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match self.check_state() {
                Ok(()) => break,
                Err(why) if Instant::now() > deadline => {
                    if !manual {
                        self.resume(old);
                    }
                    self.fail(&format!(
                        "after the failover to node {replica} the cluster was not ok within 30 s: {why}"
                    ));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        let cluster_ok_after = t0.elapsed();
        if !manual {
            self.resume(old);
        }
        self.wait_ok(Duration::from_secs(30));
        let new_id = self.id(replica).to_string();
        wait_until_within(
            "the old primary rejoins as a replica of the new one",
            Duration::from_secs(30),
            || {
                let view = self.cluster_nodes(old)?;
                match view.iter().find(|v| v.myself()) {
                    Some(v) if v.is_replica() && v.master.as_deref() == Some(&new_id) => Ok(()),
                    other => Err(format!("{other:?}")),
                }
            },
        );
        self.wait_ok(Duration::from_secs(30));
        let rejoined_after = t0.elapsed();
        wait_until_within(
            "the new primary's listener is ready",
            Duration::from_secs(30),
            || self.module_ready(replica),
        );
        FailoverReport {
            manual,
            old_primary: old,
            new_primary: replica,
            promoted_after,
            cluster_ok_after,
            rejoined_after,
            listener_ready_after: t0.elapsed(),
        }
    }

    /// `redis-cli --cluster reshard` of `slots` slots from primary `from`
    /// to primary `to` (killed after 45 s).
    pub fn reshard(&self, from: usize, to: usize, slots: usize) -> CliRun {
        redis_cli(
            &[
                "--cluster".into(),
                "reshard".into(),
                format!("127.0.0.1:{}", self.port(from)),
                "--cluster-from".into(),
                self.id(from).to_string(),
                "--cluster-to".into(),
                self.id(to).to_string(),
                "--cluster-slots".into(),
                slots.to_string(),
                "--cluster-yes".into(),
            ],
            Duration::from_secs(45),
        )
    }
}

/// The slots node `id` serves in `view` (a replica: its primary's).
pub fn served_slots_in(view: &[NodeView], id: &str) -> Vec<(u16, u16)> {
    let Some(v) = view.iter().find(|v| v.id == id) else {
        return Vec::new();
    };
    if v.is_master() {
        v.slots.clone()
    } else {
        v.master
            .as_deref()
            .and_then(|m| view.iter().find(|w| w.id == m))
            .map(|m| m.slots.clone())
            .unwrap_or_default()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}{}", self.logs_tail(30), self.crashes());
        }
        for n in &mut self.nodes {
            // SIGKILL ends a stopped process too
            let _ = n.child.kill();
            let _ = n.child.wait();
        }
    }
}

// ---------------------------------------------------------------------------
// a small cluster client

/// Routes a command by the slot of one argument, follows MOVED and ASK,
/// never hangs on a stopped node (new connections are PINGed first with a
/// time limit; every connection has a read timeout).
pub struct Router {
    ports: Vec<u16>,
    /// slot → port of its primary, 0 when unknown.
    slots: Vec<u16>,
    cons: HashMap<u16, redis::Connection>,
    read_timeout: Duration,
    need_refresh: bool,
    last_refresh: Option<Instant>,
    /// MOVED redirects followed.
    pub moved: u64,
    /// ASK redirects followed.
    pub asked: u64,
}

impl Router {
    pub fn new(cluster: &Cluster, read_timeout: Duration) -> Router {
        let mut r = Router {
            ports: (0..cluster.nodes()).map(|i| cluster.port(i)).collect(),
            slots: vec![0; usize::from(SLOTS)],
            cons: HashMap::new(),
            read_timeout,
            need_refresh: true,
            last_refresh: None,
            moved: 0,
            asked: 0,
        };
        r.refresh();
        r
    }

    fn con(&mut self, port: u16) -> redis::RedisResult<&mut redis::Connection> {
        if !self.cons.contains_key(&port) {
            if !raw_ping(port, self.read_timeout) {
                return Err(redis::RedisError::from(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("node on port {port} does not answer PING"),
                )));
            }
            let c = redis::Client::open(format!("redis://127.0.0.1:{port}/"))?
                .get_connection_with_timeout(self.read_timeout)?;
            c.set_read_timeout(Some(self.read_timeout))?;
            c.set_write_timeout(Some(self.read_timeout))?;
            self.cons.insert(port, c);
        }
        Ok(self.cons.get_mut(&port).unwrap())
    }

    /// Reload the slot map from the first node that answers `CLUSTER
    /// NODES` (at most every 100 ms); true on success.
    pub fn refresh(&mut self) -> bool {
        if self
            .last_refresh
            .is_some_and(|t| t.elapsed() < Duration::from_millis(100))
        {
            return false;
        }
        self.last_refresh = Some(Instant::now());
        for port in self.ports.clone() {
            let Ok(c) = self.con(port) else { continue };
            let text: redis::RedisResult<String> = redis::cmd("CLUSTER").arg("NODES").query(c);
            match text {
                Ok(text) => {
                    let view = parse_cluster_nodes(&text);
                    for v in view.iter().filter(|v| v.is_master() && !v.failing()) {
                        for &(a, b) in &v.slots {
                            for s in a..=b {
                                self.slots[usize::from(s)] = v.port;
                            }
                        }
                    }
                    self.need_refresh = false;
                    return true;
                }
                Err(_) => {
                    self.cons.remove(&port);
                }
            }
        }
        false
    }

    /// The port the router would send a command for `slot` to.
    pub fn port_for_slot(&mut self, slot: u16) -> u16 {
        if self.need_refresh || self.slots[usize::from(slot)] == 0 {
            self.refresh();
        }
        match self.slots[usize::from(slot)] {
            0 => self.ports[0],
            p => p,
        }
    }

    /// Send `cmd` to the primary of `slot_of(route_key)`, following up to
    /// 5 MOVED/ASK redirects. An I/O error drops the connection and makes
    /// the next call reload the slot map; any other error is returned.
    pub fn query<T: redis::FromRedisValue>(
        &mut self,
        cmd: &redis::Cmd,
        route_key: &[u8],
    ) -> redis::RedisResult<T> {
        let slot = slot_of(route_key);
        let mut port = self.port_for_slot(slot);
        let mut asking = false;
        for _ in 0..6 {
            let r = match self.con(port) {
                Ok(c) => {
                    if asking {
                        redis::cmd("ASKING")
                            .query::<()>(c)
                            .and_then(|()| cmd.query(c))
                    } else {
                        cmd.query(c)
                    }
                }
                Err(e) => Err(e),
            };
            match r {
                Ok(v) => return Ok(v),
                Err(e) if e.kind() == redis::ErrorKind::Moved => {
                    let Some((_, p)) = redirect_of(&e) else {
                        return Err(e);
                    };
                    self.moved += 1;
                    self.slots[usize::from(slot)] = p;
                    self.need_refresh = true;
                    port = p;
                    asking = false;
                }
                Err(e) if e.kind() == redis::ErrorKind::Ask => {
                    let Some((_, p)) = redirect_of(&e) else {
                        return Err(e);
                    };
                    self.asked += 1;
                    port = p;
                    asking = true;
                }
                Err(e) => {
                    if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() {
                        self.cons.remove(&port);
                    }
                    if e.kind() != redis::ErrorKind::ResponseError {
                        self.need_refresh = true;
                    }
                    return Err(e);
                }
            }
        }
        Err(redis::RedisError::from((
            redis::ErrorKind::ClientError,
            "too many redirects",
        )))
    }

    /// PGCACHE.READ `table` `pk`, routed by the pk.
    pub fn read(&mut self, table: &str, pk: &str) -> redis::RedisResult<Option<String>> {
        let mut cmd = redis::cmd("PGCACHE.READ");
        cmd.arg(table).arg(pk);
        self.query(&cmd, pk.as_bytes())
    }
}

/// (slot, port) of a MOVED or ASK error (`MOVED 3999 127.0.0.1:6381`).
/// redis-rs's `redirect_node` answers (address, slot).
pub fn redirect_of(e: &redis::RedisError) -> Option<(u16, u16)> {
    if !matches!(e.kind(), redis::ErrorKind::Moved | redis::ErrorKind::Ask) {
        return None;
    }
    let mut words = e.detail()?.split_ascii_whitespace();
    let slot = words.next()?.parse().ok()?;
    let port = words.next()?.rsplit(':').next()?.parse().ok()?;
    Some((slot, port))
}

/// A short name for an error: its code (`MOVED`, `CLUSTERDOWN`, `ERR`...)
/// or `io`.
pub fn error_class(e: &redis::RedisError) -> String {
    if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() {
        return "io".into();
    }
    e.code()
        .map(str::to_string)
        .unwrap_or_else(|| format!("{:?}", e.kind()))
}

// ---------------------------------------------------------------------------
// background READ/UPDATE load

/// What the load does: READs of `users` rows `read_ids` (round robin)
/// through a `Router`, READs of rows `miss_ids` (each once), and UPDATEs
/// of rows `update_ids` in PostgreSQL every `update_every`.
#[derive(Clone, Debug)]
pub struct LoadSpec {
    pub read_ids: Vec<i64>,
    pub update_ids: Vec<i64>,
    pub update_every: Duration,
    /// Reader threads.
    pub readers: usize,
    /// One more reader reads these rows in order, each once (so each is a
    /// miss: fills run all along), then stops.
    pub miss_ids: Vec<i64>,
}

/// What the load saw.
#[derive(Clone, Debug, Default)]
pub struct LoadReport {
    pub ran_for: Duration,
    pub reads_ok: u64,
    /// READs that answered nil (every row read exists).
    pub reads_nil: u64,
    /// Errors by class (`error_class`).
    pub read_errors: BTreeMap<String, u64>,
    /// The first errors (seconds since the load started, text).
    pub first_errors: Vec<(f64, String)>,
    /// The longest time without a successful READ (per reader).
    pub longest_gap: Duration,
    /// Seconds since start of every successful READ.
    pub ok_times: Vec<f32>,
    pub moved: u64,
    pub asked: u64,
    /// READs of `miss_ids` sent.
    pub miss_reads: u64,
    pub updates: u64,
    pub update_errors: u64,
}

impl LoadReport {
    pub fn errors(&self) -> u64 {
        self.read_errors.values().sum()
    }
    /// Successful READs at or after `secs` seconds since the start.
    pub fn oks_after(&self, secs: f64) -> usize {
        self.ok_times
            .iter()
            .filter(|&&t| f64::from(t) >= secs)
            .count()
    }
}

impl std::fmt::Display for LoadReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "load for {:.1?}: reads answered {} (nil {}), read errors {} {:?}, longest gap \
             without an answer {:?}, MOVED followed {}, ASK followed {}, READs of rows \
             not read before (misses) {}, updates {} (errors {})",
            self.ran_for,
            self.reads_ok,
            self.reads_nil,
            self.errors(),
            self.read_errors,
            self.longest_gap,
            self.moved,
            self.asked,
            self.miss_reads,
            self.updates,
            self.update_errors
        )?;
        if !self.first_errors.is_empty() {
            write!(f, "; first errors:")?;
            for (t, e) in &self.first_errors {
                write!(f, "\n    at {t:.3}s: {e}")?;
            }
        }
        Ok(())
    }
}

/// READ/UPDATE load running in the background until `stop`.
pub struct ReadUpdateLoad {
    stop: Arc<AtomicBool>,
    started: Instant,
    readers: Vec<JoinHandle<LoadReport>>,
    updater: Option<JoinHandle<(u64, u64)>>,
}

impl ReadUpdateLoad {
    pub fn start(cluster: &Cluster, pg: &PgServer, spec: LoadSpec) -> ReadUpdateLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let mut readers = Vec::new();
        let mut lists: Vec<(Vec<i64>, usize, bool)> = (0..spec.readers.max(1))
            .map(|r| (spec.read_ids.clone(), r, true))
            .collect();
        if !spec.miss_ids.is_empty() {
            lists.push((spec.miss_ids.clone(), 0, false));
        }
        for (ids, offset, cycle) in lists {
            let mut router = Router::new(cluster, Duration::from_millis(1000));
            let stop = stop.clone();
            readers.push(std::thread::spawn(move || {
                let mut rep = LoadReport::default();
                let mut last_ok = Instant::now();
                let mut n = offset;
                while !stop.load(Ordering::Relaxed) && (cycle || n < ids.len()) {
                    let id = ids[n % ids.len()];
                    n += 1;
                    let pk = format!(r#"{{"id":{id}}}"#);
                    match router.read("users", &pk) {
                        Ok(v) => {
                            let now = Instant::now();
                            rep.longest_gap = rep.longest_gap.max(now - last_ok);
                            last_ok = now;
                            rep.ok_times.push((now - started).as_secs_f32());
                            if v.is_some() {
                                rep.reads_ok += 1;
                            } else {
                                rep.reads_nil += 1;
                            }
                        }
                        Err(e) => {
                            *rep.read_errors.entry(error_class(&e)).or_default() += 1;
                            if rep.first_errors.len() < 8 {
                                rep.first_errors
                                    .push((started.elapsed().as_secs_f64(), err_text(&e)));
                            }
                            std::thread::sleep(Duration::from_millis(10));
                        }
                    }
                }
                if cycle {
                    rep.longest_gap = rep.longest_gap.max(last_ok.elapsed());
                } else {
                    rep.miss_reads = n as u64;
                }
                rep.moved = router.moved;
                rep.asked = router.asked;
                rep
            }));
        }
        let updater = (!spec.update_ids.is_empty()).then(|| {
            let stop = stop.clone();
            let conn = pg.conn_string();
            let ids = spec.update_ids.clone();
            let every = spec.update_every;
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    let (client, connection) =
                        tokio_postgres::connect(&conn, tokio_postgres::NoTls)
                            .await
                            .expect("load: connect to PostgreSQL");
                    tokio::spawn(connection);
                    let (mut ok, mut failed) = (0u64, 0u64);
                    let mut n: usize = 0;
                    while !stop.load(Ordering::Relaxed) {
                        let id = ids[n % ids.len()];
                        n += 1;
                        let r = client
                            .execute(
                                "/* pgcache-harness */ UPDATE users SET name = $1 WHERE id = $2",
                                &[&format!("load {n}"), &(id as i32)],
                            )
                            .await;
                        match r {
                            Ok(_) => ok += 1,
                            Err(_) => failed += 1,
                        }
                        tokio::time::sleep(every).await;
                    }
                    (ok, failed)
                })
            })
        });
        ReadUpdateLoad {
            stop,
            started,
            readers,
            updater,
        }
    }

    /// Seconds since the load started (to compare with `LoadReport`'s
    /// times).
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Stop, join, and sum up.
    pub fn stop(mut self) -> LoadReport {
        self.stop.store(true, Ordering::Relaxed);
        let mut total = LoadReport {
            ran_for: self.started.elapsed(),
            ..LoadReport::default()
        };
        for h in self.readers.drain(..) {
            let r = h.join().expect("a load reader panicked");
            total.reads_ok += r.reads_ok;
            total.reads_nil += r.reads_nil;
            for (k, v) in r.read_errors {
                *total.read_errors.entry(k).or_default() += v;
            }
            total.first_errors.extend(r.first_errors);
            total.longest_gap = total.longest_gap.max(r.longest_gap);
            total.ok_times.extend(r.ok_times);
            total.moved += r.moved;
            total.asked += r.asked;
            total.miss_reads += r.miss_reads;
        }
        total
            .first_errors
            .sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap());
        total.first_errors.truncate(8);
        if let Some(u) = self.updater.take() {
            let (ok, failed) = u.join().expect("the load updater panicked");
            total.updates = ok;
            total.update_errors = failed;
        }
        total
    }
}

impl Drop for ReadUpdateLoad {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl Cluster {
    /// The directory of node `i`'s files (nodes.conf, redis.log).
    pub fn dir(&self, i: usize) -> PathBuf {
        self.nodes[i].dir.path().to_path_buf()
    }
}
