//! Property test of `vireo serve`'s control plane: random sequences of attach (blk and
//! scsi controllers under names drawn from a small pool that makes clashes likely:
//! "A" and "At0", "B" and "Bt0l1"), detach, `bdev_get_bdevs`,
//! `bdev_virtio_scsi_get_devices`, `framework_get_config`, the NBD methods, NBD clients
//! that open and close an export, and `bdev_virtio_blk_set_hotplug`, against one
//! `vireo serve --nbd` and in-tree vhost-user targets started once for the whole test:
//! two blk targets, two scsi targets with 2 LUNs each, and a socket nobody listens on.
//!
//! After every step, against a model of what must be attached:
//! - bdev names are unique in `bdev_get_bdevs`, and they are the model's, each of the
//!   controller the model says;
//! - `save_config` and `framework_get_config` list exactly the model's controllers (and
//!   so agree with `bdev_get_bdevs`), with their socket and type, and the hot-plug
//!   setting last applied;
//! - `bdev_virtio_scsi_get_devices` lists the model's scsi controllers, none failed;
//! - `nbd_get_disks` has no export name twice;
//! - every call answered within [`DEADLINE`].
//!
//! At the end of a case every NBD client closes and every controller is detached (a
//! controller whose bdev an NBD client used gets [`RELEASE_GRACE`] to release it); the
//! registry must then be empty.
//!
//! The sequences are reproducible (a fixed seed; `PROPTEST_CASES` changes the number of
//! cases) and shrink: a failure panics with the smallest failing sequence found and the
//! steps it ran. `VIREO_PROPTEST_VERBOSE=1` prints every passing case's steps and what
//! each answered (with `--nocapture`).
//!
//! A vhost-user target serves one front-end at a time, so an attach whose name is free
//! goes to a target instance nobody uses (a busy one would only answer after the reply
//! timeout); with none free the step is skipped. An attach whose name is taken goes to a
//! busy instance if need be: the name is checked before connecting, so it must fail at
//! once.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestError, TestRng, TestRunner};
use serde_json::{json, Value};
use vireo_target::{
    spawn_blk_target, spawn_scsi_target, Backing, BlkTargetConfig, LunConfig, ScsiTargetConfig,
    ScsiTargetHandle, TargetHandle,
};

const BIN: &str = env!("CARGO_BIN_EXE_vireo");

/// Every RPC call must answer within this.
const DEADLINE: Duration = Duration::from_secs(15);
/// How long a controller whose bdev an NBD client used may keep refusing its detach
/// after the client closed (the export's I/O thread closes its channel).
const RELEASE_GRACE: Duration = Duration::from_secs(3);
/// Cases by default (`PROPTEST_CASES` overrides).
const CASES: u32 = 16;
/// Steps of a case at most.
const MAX_STEPS: usize = 12;
/// The seed of the sequences.
const SEED: [u8; 32] = *b"vireo-rpc-properties-seed-000001";

/// Controller names: a scsi controller "A" has bdevs "At0" and "At0l1", so it clashes
/// with a controller named "At0" or "At0l1"; "B" with "Bt0l1".
const NAMES: &[&str] = &["A", "At0", "Bt0l1", "At0l1", "B"];
/// Names a query or an NBD start may name (bdevs that may exist, and one that never does).
const BDEV_NAMES: &[&str] = &["A", "At0", "At0l1", "B", "Bt0", "Bt0l1", "Z"];
/// Export names: bdev names (their default exports) and others.
const EXPORTS: &[&str] = &["A", "At0", "At0l1", "Bt0l1", "x", "y"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dev {
    Blk,
    Scsi,
}

impl Dev {
    fn name(self) -> &'static str {
        match self {
            Dev::Blk => "blk",
            Dev::Scsi => "scsi",
        }
    }
}

/// Which back-end an attach goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum To {
    /// A target of the controller's type.
    Same,
    /// A target of the other type (the attach must fail and leave the target free).
    Other,
    /// The socket nobody listens on.
    Dead,
}

#[derive(Debug, Clone)]
enum Op {
    Attach {
        name: &'static str,
        dev: Dev,
        to: To,
    },
    Detach(&'static str),
    GetBdevs(Option<&'static str>),
    ScsiGetDevices,
    FrameworkGetConfig,
    NbdStart {
        bdev: Pick,
        export: Option<&'static str>,
    },
    NbdStop(Pick),
    NbdGetDisks,
    /// An NBD client opens the export and reads a block (so the export's I/O channel is
    /// open), and stays connected.
    NbdOpen(Pick),
    /// Every NBD client disconnects.
    NbdCloseAll,
    Hotplug {
        enable: bool,
        period_us: Option<u64>,
    },
}

/// A bdev or export name: a fixed one (which may exist or not), or the n-th of those
/// that exist when the step runs (so that sequences reach existing ones often).
#[derive(Debug, Clone, Copy)]
enum Pick {
    Named(&'static str),
    Existing(usize),
}

impl Pick {
    /// The name: `existing` are the names that exist now.
    fn resolve(self, existing: &[String]) -> String {
        match self {
            Pick::Named(n) => n.to_string(),
            Pick::Existing(_) if existing.is_empty() => "none".to_string(),
            Pick::Existing(i) => existing[i % existing.len()].clone(),
        }
    }
}

fn pick(names: &'static [&'static str]) -> impl Strategy<Value = Pick> {
    prop_oneof![
        prop::sample::select(names).prop_map(Pick::Named),
        (0..4usize).prop_map(Pick::Existing),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let name = || prop::sample::select(NAMES);
    let bdev = || prop::sample::select(BDEV_NAMES);
    let export = || prop::sample::select(EXPORTS);
    let to = || prop_oneof![6 => Just(To::Same), 1 => Just(To::Other), 1 => Just(To::Dead)];
    // Clashes are likely: a blk controller mostly takes a scsi bdev's name, a scsi
    // controller mostly "A" or "B" (whose bdevs are "At0", "At0l1", "Bt0", "Bt0l1").
    let blk = prop_oneof![3 => prop::sample::select(&NAMES[1..3]).boxed(), 1 => name().boxed()];
    let scsi = prop_oneof![3 => prop::sample::select(&["A", "B"][..]).boxed(), 1 => name().boxed()];
    prop_oneof![
        5 => (blk, to()).prop_map(|(name, to)| Op::Attach { name, dev: Dev::Blk, to }),
        5 => (scsi, to()).prop_map(|(name, to)| Op::Attach { name, dev: Dev::Scsi, to }),
        4 => name().prop_map(Op::Detach),
        1 => prop::option::of(bdev()).prop_map(Op::GetBdevs),
        1 => Just(Op::ScsiGetDevices),
        1 => Just(Op::FrameworkGetConfig),
        2 => (pick(BDEV_NAMES), prop::option::of(export()))
            .prop_map(|(bdev, export)| Op::NbdStart { bdev, export }),
        2 => pick(EXPORTS).prop_map(Op::NbdStop),
        1 => Just(Op::NbdGetDisks),
        3 => pick(EXPORTS).prop_map(Op::NbdOpen),
        2 => Just(Op::NbdCloseAll),
        1 => (any::<bool>(), prop::option::of(prop::sample::select(&[1000u64, 250_000][..])))
            .prop_map(|(enable, period_us)| Op::Hotplug { enable, period_us }),
    ]
}

/// The back-ends, started once.
struct Targets {
    _dir: tempfile::TempDir,
    blk: Vec<(PathBuf, TargetHandle)>,
    scsi: Vec<(PathBuf, ScsiTargetHandle)>,
    dead: PathBuf,
}

impl Targets {
    fn start() -> Targets {
        let dir = tempfile::tempdir().unwrap();
        let ram = |mib: u64| Backing::Ram {
            size_bytes: mib << 20,
        };
        let blk = (0..2)
            .map(|i| {
                let p = dir.path().join(format!("blk{i}.sock"));
                let h = spawn_blk_target(
                    &p,
                    BlkTargetConfig {
                        backend: ram(8),
                        ..Default::default()
                    },
                )
                .unwrap();
                (p, h)
            })
            .collect();
        let scsi = (0..2)
            .map(|i| {
                let p = dir.path().join(format!("scsi{i}.sock"));
                let lun = |mib| LunConfig {
                    backend: ram(mib),
                    ..Default::default()
                };
                let h = spawn_scsi_target(
                    &p,
                    ScsiTargetConfig {
                        luns: BTreeMap::from([((0, 0), lun(8)), ((0, 1), lun(4))]),
                        ..Default::default()
                    },
                )
                .unwrap();
                (p, h)
            })
            .collect();
        // Bound, then closed: the file stays, nobody listens (ECONNREFUSED).
        let dead = dir.path().join("dead.sock");
        drop(std::os::unix::net::UnixListener::bind(&dead).unwrap());
        Targets {
            _dir: dir,
            blk,
            scsi,
            dead,
        }
    }

    fn sockets(&self, dev: Dev) -> Vec<PathBuf> {
        match dev {
            Dev::Blk => self.blk.iter().map(|(p, _)| p.clone()).collect(),
            Dev::Scsi => self.scsi.iter().map(|(p, _)| p.clone()).collect(),
        }
    }
}

/// `vireo serve -r RPC --nbd unix:NBD`, killed on drop.
struct Serve {
    child: Child,
    dir: tempfile::TempDir,
    rpc: PathBuf,
    nbd: PathBuf,
    stats: std::rc::Rc<Stats>,
}

/// Calls made, and the longest and its method, over every server of the test.
#[derive(Default)]
struct Stats {
    calls: std::cell::Cell<u64>,
    slowest: std::cell::Cell<(Duration, &'static str)>,
    restarts: std::cell::Cell<u64>,
}

impl Serve {
    fn start(stats: std::rc::Rc<Stats>) -> Serve {
        let dir = tempfile::tempdir().unwrap();
        let rpc = dir.path().join("rpc.sock");
        let nbd = dir.path().join("nbd.sock");
        let log = std::fs::File::create(dir.path().join("serve.log")).unwrap();
        let child = Command::new(BIN)
            .arg("serve")
            .arg("-r")
            .arg(&rpc)
            .arg("--nbd")
            .arg(format!("unix:{}", nbd.display()))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut s = Serve {
            child,
            dir,
            rpc,
            nbd,
            stats,
        };
        let t0 = Instant::now();
        while UnixStream::connect(&s.rpc).is_err() {
            if let Some(st) = s.child.try_wait().unwrap() {
                panic!("vireo serve exited with {st}: {}", s.log());
            }
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "vireo serve did not listen: {}",
                s.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        s
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("serve.log")).unwrap_or_default()
    }

    /// One request on a fresh connection, answered within [`DEADLINE`]: `Ok(result)` or
    /// `Err((code, message))`. A late, missing or malformed answer fails the case.
    fn call(
        &self,
        method: &'static str,
        params: Option<Value>,
    ) -> Result<Result<Value, (i64, String)>, TestCaseError> {
        let mut req = json!({"jsonrpc": "2.0", "id": 1, "method": method});
        if let Some(p) = &params {
            req["params"] = p.clone();
        }
        let t0 = Instant::now();
        let answer = (|| -> std::io::Result<Value> {
            let mut s = UnixStream::connect(&self.rpc)?;
            s.set_read_timeout(Some(DEADLINE))?;
            s.set_write_timeout(Some(DEADLINE))?;
            s.write_all(req.to_string().as_bytes())?;
            let mut it = serde_json::Deserializer::from_reader(BufReader::new(&s)).into_iter();
            match it.next() {
                Some(v) => Ok(v?),
                None => Err(std::io::Error::other("connection closed without an answer")),
            }
        })();
        let took = t0.elapsed();
        let st = &self.stats;
        st.calls.set(st.calls.get() + 1);
        if took > st.slowest.get().0 {
            st.slowest.set((took, method));
        }
        let r = answer.map_err(|e| {
            TestCaseError::fail(format!(
                "{method} {params:?}: no answer after {took:?}: {e}"
            ))
        })?;
        if took > DEADLINE {
            return Err(TestCaseError::fail(format!(
                "{method} {params:?} took {took:?} (deadline {DEADLINE:?})"
            )));
        }
        if r["jsonrpc"] != "2.0" || r["id"] != 1 {
            return Err(TestCaseError::fail(format!(
                "{method}: malformed answer {r}"
            )));
        }
        match (r.get("result"), r.get("error")) {
            (Some(v), None) => Ok(Ok(v.clone())),
            (None, Some(e)) => match (e["code"].as_i64(), e["message"].as_str()) {
                (Some(c), Some(m)) => Ok(Err((
                    c,
                    match e.get("data") {
                        Some(d) => format!("{m} ({d})"),
                        None => m.to_string(),
                    },
                ))),
                _ => Err(TestCaseError::fail(format!(
                    "{method}: malformed error {r}"
                ))),
            },
            _ => Err(TestCaseError::fail(format!(
                "{method}: malformed answer {r}"
            ))),
        }
    }

    /// A call that must succeed.
    fn ok(&self, method: &'static str, params: Option<Value>) -> Result<Value, TestCaseError> {
        self.call(method, params.clone())?
            .map_err(|(c, m)| TestCaseError::fail(format!("{method} {params:?} failed: {c} {m}")))
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An NBD client holding an export open.
struct NbdClient {
    export: String,
    bdev: String,
    _conn: UnixStream,
}

/// Open `export` (fixed newstyle, NBD_OPT_GO) and read its first 4 KiB: `Ok(Err(reason))`
/// when the server refuses the export.
fn nbd_open(sock: &Path, export: &str) -> std::io::Result<Result<UnixStream, String>> {
    let mut c = UnixStream::connect(sock)?;
    c.set_read_timeout(Some(DEADLINE))?;
    c.set_write_timeout(Some(DEADLINE))?;
    let mut hello = [0u8; 18];
    c.read_exact(&mut hello)?;
    if &hello[..8] != b"NBDMAGIC" {
        return Err(std::io::Error::other("not an NBD server"));
    }
    c.write_all(&3u32.to_be_bytes())?; // FIXED_NEWSTYLE | NO_ZEROES
    let mut opt = b"IHAVEOPT".to_vec();
    opt.extend_from_slice(&7u32.to_be_bytes()); // NBD_OPT_GO
    opt.extend_from_slice(&((4 + export.len() + 2) as u32).to_be_bytes());
    opt.extend_from_slice(&(export.len() as u32).to_be_bytes());
    opt.extend_from_slice(export.as_bytes());
    opt.extend_from_slice(&0u16.to_be_bytes());
    c.write_all(&opt)?;
    loop {
        let mut h = [0u8; 20];
        c.read_exact(&mut h)?;
        let ty = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut data = vec![0u8; len as usize];
        c.read_exact(&mut data)?;
        if ty & 0x8000_0000 != 0 {
            return Ok(Err(format!(
                "reply {ty:#x}: {}",
                String::from_utf8_lossy(&data)
            )));
        }
        if ty == 1 {
            break; // NBD_REP_ACK
        }
    }
    // READ 4 KiB at 0: answered once the export's I/O thread has its channel.
    let mut r = 0x2560_9513u32.to_be_bytes().to_vec();
    r.extend_from_slice(&[0, 0, 0, 0]);
    r.extend_from_slice(&42u64.to_be_bytes());
    r.extend_from_slice(&0u64.to_be_bytes());
    r.extend_from_slice(&4096u32.to_be_bytes());
    c.write_all(&r)?;
    let mut h = [0u8; 16];
    c.read_exact(&mut h)?;
    let err = u32::from_be_bytes(h[4..8].try_into().unwrap());
    if err != 0 {
        return Ok(Err(format!("READ failed with NBD error {err}")));
    }
    let mut data = vec![0u8; 4096];
    c.read_exact(&mut data)?;
    Ok(Ok(c))
}

/// A controller the model says is attached.
#[derive(Debug)]
struct Ctrl {
    dev: Dev,
    socket: PathBuf,
    bdevs: Vec<String>,
}

/// What must be attached.
#[derive(Default)]
struct Model {
    ctrls: BTreeMap<String, Ctrl>,
    hotplug: Option<Value>,
    clients: Vec<NbdClient>,
    /// Bdevs whose export an NBD client used (their controller may take
    /// [`RELEASE_GRACE`] to release them after the client left).
    used: BTreeSet<String>,
}

impl Model {
    fn bdevs(&self) -> BTreeMap<String, String> {
        self.ctrls
            .iter()
            .flat_map(|(c, x)| x.bdevs.iter().map(move |b| (b.clone(), c.clone())))
            .collect()
    }

    /// Names held: controllers and their bdevs.
    fn held(&self) -> BTreeSet<String> {
        let mut s: BTreeSet<String> = self.ctrls.keys().cloned().collect();
        s.extend(self.bdevs().into_keys());
        s
    }

    fn busy(&self, socket: &Path) -> bool {
        self.ctrls.values().any(|c| c.socket == socket)
    }
}

/// The message of a case's failure (without proptest's "Case failed: " prefix).
fn why(e: TestCaseError) -> String {
    match e {
        TestCaseError::Fail(r) | TestCaseError::Reject(r) => r.message().to_string(),
    }
}

macro_rules! check {
    ($cond:expr, $($fmt:tt)*) => {
        if !$cond {
            return Err(TestCaseError::fail(format!($($fmt)*)));
        }
    };
}

/// The bdev names `name` has when attached as `dev` to the in-tree targets.
fn bdev_names(name: &str, dev: Dev) -> Vec<String> {
    match dev {
        Dev::Blk => vec![name.to_string()],
        Dev::Scsi => vec![format!("{name}t0"), format!("{name}t0l1")],
    }
}

/// The controllers (name -> (socket, dev_type)) and hot-plug call of a `bdev`
/// subsystem's config array.
#[allow(clippy::type_complexity)]
fn config_controllers(
    config: &Value,
) -> Result<(BTreeMap<String, (String, String)>, Option<Value>), TestCaseError> {
    let calls = config
        .as_array()
        .ok_or_else(|| TestCaseError::fail(format!("config is not an array: {config}")))?;
    let mut ctrls = BTreeMap::new();
    let mut hotplug = None;
    for c in calls {
        match c["method"].as_str() {
            Some("bdev_virtio_attach_controller") => {
                let p = &c["params"];
                let name = p["name"].as_str().unwrap_or_default().to_string();
                let v = (
                    p["traddr"].as_str().unwrap_or_default().to_string(),
                    p["dev_type"].as_str().unwrap_or_default().to_string(),
                );
                check!(
                    ctrls.insert(name.clone(), v).is_none(),
                    "controller {name} twice in the config: {config}"
                );
            }
            Some("bdev_virtio_blk_set_hotplug") => hotplug = Some(c["params"].clone()),
            _ => return Err(TestCaseError::fail(format!("unexpected config call {c}"))),
        }
    }
    Ok((ctrls, hotplug))
}

/// The invariants, after every step.
fn check_state(srv: &Serve, m: &Model) -> Result<(), TestCaseError> {
    // bdev_get_bdevs: unique names, the model's, each of its controller.
    let bdevs = srv.ok("bdev_get_bdevs", None)?;
    let mut seen = BTreeMap::new();
    for b in bdevs.as_array().into_iter().flatten() {
        let name = b["name"].as_str().unwrap_or_default().to_string();
        let ds = &b["driver_specific"];
        let ctrl = ds["virtio_blk"]["controller"]
            .as_str()
            .or(ds["virtio_scsi"]["controller"].as_str())
            .unwrap_or_default()
            .to_string();
        check!(
            seen.insert(name.clone(), ctrl).is_none(),
            "bdev name {name} twice in bdev_get_bdevs: {bdevs}"
        );
    }
    check!(
        seen == m.bdevs(),
        "bdev_get_bdevs has (bdev -> controller) {seen:?}, expected {:?}",
        m.bdevs()
    );
    // save_config and framework_get_config: the model's controllers.
    let want: BTreeMap<String, (String, String)> = m
        .ctrls
        .iter()
        .map(|(n, c)| {
            (
                n.clone(),
                (c.socket.display().to_string(), c.dev.name().to_string()),
            )
        })
        .collect();
    let saved = srv.ok("save_config", None)?;
    let (ctrls, hotplug) = config_controllers(&saved["subsystems"][0]["config"])?;
    check!(
        ctrls == want,
        "save_config has controllers {ctrls:?}, expected {want:?}"
    );
    check!(
        hotplug == m.hotplug,
        "save_config has hot-plug {hotplug:?}, expected {:?}",
        m.hotplug
    );
    // bdev_get_bdevs agrees: every bdev's controller is in the saved config.
    for (b, c) in &seen {
        check!(
            ctrls.contains_key(c),
            "bdev {b} of controller {c}, which save_config does not have"
        );
    }
    // The SCSI controllers.
    let devs = srv.ok("bdev_virtio_scsi_get_devices", None)?;
    let mut scsi = BTreeSet::new();
    for d in devs.as_array().into_iter().flatten() {
        check!(d.get("failed").is_none(), "failed controller: {d}");
        scsi.insert(d["name"].as_str().unwrap_or_default().to_string());
    }
    let want_scsi: BTreeSet<String> = m
        .ctrls
        .iter()
        .filter(|(_, c)| c.dev == Dev::Scsi)
        .map(|(n, _)| n.clone())
        .collect();
    check!(
        scsi == want_scsi,
        "bdev_virtio_scsi_get_devices lists {scsi:?}, expected {want_scsi:?}"
    );
    // nbd_get_disks: no export name twice.
    let disks = nbd_disks(srv)?;
    check!(
        disks.len() == disks.iter().map(|(e, _)| e).collect::<BTreeSet<_>>().len(),
        "an export twice in nbd_get_disks: {disks:?}"
    );
    Ok(())
}

/// nbd_get_disks as (export, bdev) pairs.
fn nbd_disks(srv: &Serve) -> Result<Vec<(String, String)>, TestCaseError> {
    let v = srv.ok("nbd_get_disks", None)?;
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .map(|d| {
            (
                d["nbd_device"].as_str().unwrap_or_default().to_string(),
                d["bdev_name"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect())
}

/// Detach `name`, which has no NBD client: it must succeed, at once or (when a client
/// used one of its bdevs) within [`RELEASE_GRACE`].
fn detach_free(srv: &Serve, m: &mut Model, name: &str) -> Result<(), TestCaseError> {
    let used = m.ctrls[name].bdevs.iter().any(|b| m.used.contains(b));
    let t0 = Instant::now();
    loop {
        match srv.call(
            "bdev_virtio_detach_controller",
            Some(json!({ "name": name })),
        )? {
            Ok(v) => {
                check!(v == json!(true), "detach {name} answered {v}");
                break;
            }
            Err((_, msg))
                if used && msg.contains("open I/O channel") && t0.elapsed() < RELEASE_GRACE =>
            {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err((code, msg)) => {
                return Err(TestCaseError::fail(format!(
                    "detach {name} (no NBD client open; {}) failed after {:?}: {code} {msg}",
                    if used {
                        "one used its bdevs before"
                    } else {
                        "none ever used its bdevs"
                    },
                    t0.elapsed()
                )))
            }
        }
    }
    let c = m.ctrls.remove(name).unwrap();
    for b in &c.bdevs {
        m.used.remove(b);
    }
    Ok(())
}

/// One step: the call, its answer checked against the model, the model updated.
fn step(srv: &Serve, t: &Targets, m: &mut Model, op: &Op) -> Result<String, TestCaseError> {
    match *op {
        Op::Attach { name, dev, to } => {
            let held = m.held();
            let name_free = !held.contains(name);
            let socket = match to {
                To::Dead => t.dead.clone(),
                To::Same | To::Other => {
                    let ty = match (dev, to) {
                        (d, To::Same) => d,
                        (Dev::Blk, _) => Dev::Scsi,
                        (Dev::Scsi, _) => Dev::Blk,
                    };
                    let all = t.sockets(ty);
                    match all.iter().find(|s| !m.busy(s)) {
                        Some(s) => s.clone(),
                        // A busy target answers only after the reply timeout; the name
                        // check comes first, so a taken name may still go there.
                        None if !name_free => all[0].clone(),
                        None => return Ok("skipped: every target of that type is busy".into()),
                    }
                }
            };
            let params = json!({"name": name, "trtype": "user",
                "traddr": socket.display().to_string(), "dev_type": dev.name(),
                "vq_count": 1, "vq_size": 64});
            let r = srv.call("bdev_virtio_attach_controller", Some(params))?;
            let names = bdev_names(name, dev);
            let clash = names.iter().any(|b| b != name && held.contains(b));
            match r {
                Err((code, msg)) if !name_free || (to == To::Same && clash) => {
                    check!(
                        code == -17,
                        "attach {name} whose name or a bdev name is taken: want -17 (EEXIST), got {code} {msg}"
                    );
                    Ok(format!("refused: {msg}"))
                }
                Err((code, msg)) if to != To::Same => {
                    check!(
                        code != -17,
                        "attach {name} (name free) to a wrong or dead socket said EEXIST: {msg}"
                    );
                    Ok(format!("failed as it must: {code} {msg}"))
                }
                Err((code, msg)) => Err(TestCaseError::fail(format!(
                    "attach {name} ({dev:?}) to a free target failed: {code} {msg}"
                ))),
                Ok(v) if name_free && to == To::Same && !clash => {
                    let mut got: Vec<String> = v
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|b| b.as_str().unwrap_or_default().to_string())
                        .collect();
                    got.sort();
                    check!(got == names, "attach {name} gave bdevs {got:?}, want {names:?}");
                    m.ctrls.insert(
                        name.to_string(),
                        Ctrl {
                            dev,
                            socket,
                            bdevs: names,
                        },
                    );
                    Ok(format!("attached {v}"))
                }
                Ok(v) => Err(TestCaseError::fail(format!(
                    "attach {name} ({dev:?}, {to:?}) succeeded with {v} but must fail (held names {held:?})"
                ))),
            }
        }
        Op::Detach(name) => {
            let Some(c) = m.ctrls.get(name) else {
                let r = srv.call(
                    "bdev_virtio_detach_controller",
                    Some(json!({ "name": name })),
                )?;
                check!(
                    matches!(&r, Err((-19, _))),
                    "detach of {name}, which is not attached: want -19 (ENODEV), got {r:?}"
                );
                return Ok("not attached: ENODEV".into());
            };
            let open: Vec<&str> = m
                .clients
                .iter()
                .filter(|x| c.bdevs.contains(&x.bdev))
                .map(|x| x.export.as_str())
                .collect();
            if open.is_empty() {
                detach_free(srv, m, name)?;
                return Ok("detached".into());
            }
            let r = srv.call(
                "bdev_virtio_detach_controller",
                Some(json!({ "name": name })),
            )?;
            match r {
                Err((_, msg)) if msg.contains("open I/O channel") => {
                    Ok(format!("refused while NBD clients of {open:?} are open: {msg}"))
                }
                r => Err(TestCaseError::fail(format!(
                    "detach of {name} while NBD clients of {open:?} are open: want an error about open I/O channels, got {r:?}"
                ))),
            }
        }
        Op::GetBdevs(name) => {
            let r = srv.call("bdev_get_bdevs", name.map(|n| json!({ "name": n })))?;
            match name {
                None => Ok("listed".into()),
                Some(n) if m.bdevs().contains_key(n) => {
                    let v =
                        r.map_err(|e| TestCaseError::fail(format!("bdev_get_bdevs {n}: {e:?}")))?;
                    check!(
                        v.as_array().map(|a| a.len()) == Some(1) && v[0]["name"] == n,
                        "bdev_get_bdevs {n} answered {v}"
                    );
                    Ok("found".into())
                }
                Some(n) => {
                    check!(
                        matches!(&r, Err((-19, _))),
                        "bdev_get_bdevs of {n}, which does not exist: want -19, got {r:?}"
                    );
                    Ok("ENODEV".into())
                }
            }
        }
        Op::ScsiGetDevices => {
            srv.ok("bdev_virtio_scsi_get_devices", None)?;
            Ok("listed".into())
        }
        Op::FrameworkGetConfig => {
            let v = srv.ok("framework_get_config", Some(json!({"name": "bdev"})))?;
            let saved = srv.ok("save_config", None)?;
            check!(
                config_controllers(&v)? == config_controllers(&saved["subsystems"][0]["config"])?,
                "framework_get_config {v} and save_config {saved} disagree"
            );
            Ok("agrees with save_config".into())
        }
        Op::NbdStart { bdev, export } => {
            let before = nbd_disks(srv)?;
            let bdev = &*bdev.resolve(&m.bdevs().into_keys().collect::<Vec<_>>());
            let mut p = json!({ "bdev_name": bdev });
            if let Some(e) = export {
                p["nbd_device"] = e.into();
            }
            let r = srv.call("nbd_start_disk", Some(p))?;
            let exists = m.bdevs().contains_key(bdev);
            let e = export.unwrap_or(bdev);
            let other = before.iter().any(|(x, b)| x == e && b != bdev);
            match r {
                Ok(v) => {
                    check!(
                        exists,
                        "nbd_start_disk of {bdev}, which does not exist, answered {v}"
                    );
                    check!(!other, "nbd_start_disk {e} -> {bdev} succeeded while {e} served another bdev: {before:?}");
                    check!(v == json!(e), "nbd_start_disk answered {v}, want {e}");
                    let after = nbd_disks(srv)?;
                    check!(
                        after.contains(&(e.to_string(), bdev.to_string())),
                        "nbd_get_disks after starting {e} -> {bdev}: {after:?}"
                    );
                    Ok(format!("exported as {e}"))
                }
                Err((code, msg)) => {
                    check!(
                        !exists || other,
                        "nbd_start_disk {e} -> {bdev} (bdev exists, export free) failed: {code} {msg}"
                    );
                    Ok(format!("refused: {msg}"))
                }
            }
        }
        Op::NbdStop(export) => {
            let before = nbd_disks(srv)?;
            let export =
                &*export.resolve(&before.iter().map(|(e, _)| e.clone()).collect::<Vec<_>>());
            let listed = before.iter().any(|(e, _)| e == export);
            let r = srv.call("nbd_stop_disk", Some(json!({ "nbd_device": export })))?;
            match r {
                Ok(_) => {
                    check!(
                        listed,
                        "nbd_stop_disk of {export}, not in {before:?}, succeeded"
                    );
                    let after = nbd_disks(srv)?;
                    check!(
                        !after.iter().any(|(e, _)| e == export),
                        "{export} still in nbd_get_disks after nbd_stop_disk: {after:?}"
                    );
                    // Its clients are disconnected (their bdevs' controllers may be
                    // detached once the server closed them).
                    m.clients.retain(|c| c.export != export);
                    Ok("stopped".into())
                }
                Err((code, msg)) => {
                    check!(
                        !listed,
                        "nbd_stop_disk of {export}, listed in {before:?}, failed: {code} {msg}"
                    );
                    Ok(format!("refused: {msg}"))
                }
            }
        }
        Op::NbdGetDisks => Ok(format!("{:?}", nbd_disks(srv)?)),
        Op::NbdOpen(export) => {
            let disks = nbd_disks(srv)?;
            let export =
                &*export.resolve(&disks.iter().map(|(e, _)| e.clone()).collect::<Vec<_>>());
            let bdev = disks
                .iter()
                .find(|(e, _)| e == export)
                .map(|(_, b)| b.clone());
            let should = bdev.as_ref().is_some_and(|b| m.bdevs().contains_key(b));
            let t0 = Instant::now();
            let r = nbd_open(&srv.nbd, export).map_err(|e| {
                TestCaseError::fail(format!(
                    "NBD client of {export}: no answer after {:?}: {e}",
                    t0.elapsed()
                ))
            })?;
            check!(
                t0.elapsed() < DEADLINE,
                "NBD open of {export} took {:?}",
                t0.elapsed()
            );
            match (r, bdev) {
                (Ok(conn), Some(bdev)) if should => {
                    m.used.insert(bdev.clone());
                    m.clients.push(NbdClient {
                        export: export.to_string(),
                        bdev: bdev.clone(),
                        _conn: conn,
                    });
                    Ok(format!("open on {bdev}"))
                }
                (Ok(_), _) => Err(TestCaseError::fail(format!(
                    "NBD client opened {export}, which must be refused (nbd_get_disks: {disks:?})"
                ))),
                (Err(why), _) => {
                    check!(
                        !should,
                        "NBD client of {export} (listed in {disks:?}) refused: {why}"
                    );
                    Ok(format!("refused: {why}"))
                }
            }
        }
        Op::NbdCloseAll => {
            let n = m.clients.len();
            m.clients.clear();
            Ok(format!("{n} closed"))
        }
        Op::Hotplug { enable, period_us } => {
            let mut p = json!({ "enable": enable });
            if let Some(us) = period_us {
                p["period_us"] = us.into();
            }
            srv.ok("bdev_virtio_blk_set_hotplug", Some(p.clone()))?;
            m.hotplug = Some(p);
            Ok("set".into())
        }
    }
}

/// Leave the server empty whatever an earlier (failed) case left: no controller, no
/// export; a server that cannot be emptied is replaced by a new one (so that a failure
/// does not fail every case after it, and shrinking still finds the failing steps).
/// Returns the hot-plug setting (which cannot be unset).
fn reset(srv: &std::cell::RefCell<Serve>) -> Result<Option<Value>, TestCaseError> {
    if let Ok(h) = try_reset(&srv.borrow()) {
        return Ok(h);
    }
    let stats = srv.borrow().stats.clone();
    stats.restarts.set(stats.restarts.get() + 1);
    *srv.borrow_mut() = Serve::start(stats);
    try_reset(&srv.borrow())
}

fn try_reset(srv: &Serve) -> Result<Option<Value>, TestCaseError> {
    for (e, _) in nbd_disks(srv)? {
        let _ = srv.call("nbd_stop_disk", Some(json!({ "nbd_device": e })))?;
    }
    let saved = srv.ok("save_config", None)?;
    let (ctrls, hotplug) = config_controllers(&saved["subsystems"][0]["config"])?;
    for name in ctrls.keys() {
        let t0 = Instant::now();
        while srv
            .call(
                "bdev_virtio_detach_controller",
                Some(json!({ "name": name })),
            )?
            .is_err()
            && t0.elapsed() < RELEASE_GRACE
        {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    check!(
        srv.ok("bdev_get_bdevs", None)? == json!([]) && nbd_disks(srv)?.is_empty(),
        "not empty after the reset"
    );
    Ok(hotplug)
}

/// One case: reset, the steps (each followed by the invariants), then every client
/// closed and every controller detached, leaving the registry empty.
fn run_case(srv: &std::cell::RefCell<Serve>, t: &Targets, ops: &[Op]) -> Result<(), TestCaseError> {
    let mut m = Model {
        hotplug: reset(srv)?,
        ..Default::default()
    };
    let srv = &*srv.borrow();
    check_state(srv, &m)?;
    let mut log = Vec::new();
    let r = (|| {
        for (i, op) in ops.iter().enumerate() {
            let what = step(srv, t, &mut m, op)
                .map_err(|e| TestCaseError::fail(format!("step {i} {op:?}: {}", why(e))))?;
            log.push(format!("{i}: {op:?} -> {what}"));
            check_state(srv, &m)
                .map_err(|e| TestCaseError::fail(format!("after step {i} {op:?}: {}", why(e))))?;
        }
        // The end: every user closes, every controller detaches, nothing is left.
        m.clients.clear();
        let names: Vec<String> = m.ctrls.keys().cloned().collect();
        for n in names {
            detach_free(srv, &mut m, &n)
                .map_err(|e| TestCaseError::fail(format!("at the end: {}", why(e))))?;
        }
        check_state(srv, &m).map_err(|e| TestCaseError::fail(format!("at the end: {}", why(e))))?;
        check!(
            srv.ok("bdev_get_bdevs", None)? == json!([]),
            "bdevs left at the end"
        );
        if std::env::var_os("VIREO_PROPTEST_VERBOSE").is_some() {
            eprintln!("case:\n  {}", log.join("\n  "));
        }
        Ok(())
    })();
    r.map_err(|e| {
        let steps = if log.is_empty() {
            String::new()
        } else {
            format!("\nsteps that passed:\n  {}", log.join("\n  "))
        };
        TestCaseError::fail(format!("{}{steps}", why(e)))
    })
}

#[test]
fn control_plane_properties() {
    let t0 = Instant::now();
    let targets = Targets::start();
    let stats = std::rc::Rc::new(Stats::default());
    let srv = std::cell::RefCell::new(Serve::start(stats.clone()));
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(CASES);
    let config = Config {
        cases,
        failure_persistence: None,
        // A failure is shrunk for at most this long (each try runs a whole sequence).
        max_shrink_time: 60_000,
        max_shrink_iters: 500,
        ..Config::default()
    };
    let mut runner =
        TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &SEED));
    let strategy = prop::collection::vec(op(), 1..=MAX_STEPS);
    // The first failure, before shrinking.
    let first = std::cell::RefCell::new(None);
    let r = runner.run(&strategy, |ops| {
        let r = run_case(&srv, &targets, &ops);
        if let Err(e) = &r {
            first.borrow_mut().get_or_insert((why(e.clone()), ops));
        }
        r
    });
    let (slow, method) = stats.slowest.get();
    eprintln!(
        "rpc_properties: {cases} cases, {} calls (slowest: {method}, {slow:?}), {} server restarts, {:?} in all",
        stats.calls.get(),
        stats.restarts.get(),
        t0.elapsed()
    );
    let steps = |ops: &[Op]| -> String {
        ops.iter()
            .enumerate()
            .map(|(i, o)| format!("  {i}: {o:?}\n"))
            .collect()
    };
    match r {
        Ok(()) => {}
        Err(TestError::Fail(reason, ops)) => {
            let (why0, ops0) = first.into_inner().unwrap_or_default();
            panic!(
                "property failed: {}\nminimal failing sequence ({} steps):\n{}\nfirst failure: {why0}\nits sequence:\n{}\nvireo serve's log:\n{}",
                reason.message(),
                ops.len(),
                steps(&ops),
                steps(&ops0),
                srv.borrow().log()
            )
        }
        Err(e) => panic!("{e}"),
    }
}
