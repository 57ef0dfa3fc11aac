//! `vireo serve` and `vireo rpc` against the in-tree vhost-user targets.

use std::collections::BTreeMap;
use std::io::{BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vireo_target::{
    spawn_blk_target, spawn_scsi_target, Backing, BlkTargetConfig, LunConfig, ScsiTargetConfig,
};

const BIN: &str = env!("CARGO_BIN_EXE_vireo");

/// A running `vireo serve`; killed on drop so a failing test leaves nothing behind.
struct Server {
    child: Option<Child>,
    sock: PathBuf,
    log: PathBuf,
}

impl Server {
    fn start(dir: &Path, config: Option<&Path>) -> Server {
        let sock = dir.join("rpc.sock");
        let log = dir.join("serve.log");
        let mut cmd = Command::new(BIN);
        cmd.arg("serve").arg("-r").arg(&sock);
        if let Some(c) = config {
            cmd.arg("-c").arg(c);
        }
        let f = std::fs::File::create(&log).unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .unwrap();
        let mut s = Server {
            child: Some(child),
            sock,
            log,
        };
        let t0 = Instant::now();
        while UnixStream::connect(&s.sock).is_err() {
            if let Some(st) = s.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("vireo serve exited with {st}: {}", s.log_text());
            }
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "vireo serve did not listen: {}",
                s.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        s
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// One request on a fresh connection; the whole response object.
    fn call(&self, method: &str, params: Option<Value>) -> Value {
        let mut req = json!({"jsonrpc":"2.0","id":7,"method":method});
        if let Some(p) = params {
            req["params"] = p;
        }
        raw(&self.sock, req.to_string().as_bytes(), 1).remove(0)
    }

    fn ok(&self, method: &str, params: Option<Value>) -> Value {
        let r = self.call(method, params);
        assert!(r.get("error").is_none(), "{method}: {r}");
        assert_eq!(r["id"], 7);
        assert_eq!(r["jsonrpc"], "2.0");
        r["result"].clone()
    }

    fn err(&self, method: &str, params: Option<Value>) -> (i64, String) {
        let r = self.call(method, params);
        let e = &r["error"];
        assert!(e.is_object(), "{method} should fail: {r}");
        (
            e["code"].as_i64().unwrap(),
            e["message"].as_str().unwrap().to_string(),
        )
    }

    fn cli(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .arg("rpc")
            .arg("-r")
            .arg(&self.sock)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// SIGTERM and wait; the exit status.
    fn stop(mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().unwrap();
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let t0 = Instant::now();
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                return st;
            }
            if t0.elapsed() > Duration::from_secs(20) {
                let _ = c.kill();
                let _ = c.wait();
                panic!("vireo serve ignored SIGTERM: {}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Send `bytes` on one connection and read `n` response objects.
fn raw(sock: &Path, bytes: &[u8], n: usize) -> Vec<Value> {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(bytes).unwrap();
    serde_json::Deserializer::from_reader(BufReader::new(&s))
        .into_iter::<Value>()
        .take(n)
        .map(|v| v.unwrap())
        .collect()
}

fn ram_lun(mib: u64) -> LunConfig {
    LunConfig {
        backend: Backing::Ram {
            size_bytes: mib << 20,
        },
        ..Default::default()
    }
}

fn attach_params(name: &str, sock: &Path, dev_type: &str) -> Value {
    json!({"name": name, "trtype": "user", "traddr": sock.to_str().unwrap(),
           "dev_type": dev_type, "vq_count": 1, "vq_size": 128})
}

#[test]
fn attach_query_save_config_and_detach() {
    let dir = tempfile::tempdir().unwrap();
    let blk_sock = dir.path().join("blk.sock");
    let scsi_sock = dir.path().join("scsi.sock");
    let _blk = spawn_blk_target(
        &blk_sock,
        BlkTargetConfig {
            backend: Backing::Ram {
                size_bytes: 64 << 20,
            },
            ..Default::default()
        },
    )
    .unwrap();
    let _scsi = spawn_scsi_target(
        &scsi_sock,
        ScsiTargetConfig {
            luns: BTreeMap::from([((0, 0), ram_lun(32)), ((0, 1), ram_lun(16))]),
            ..Default::default()
        },
    )
    .unwrap();
    let srv = Server::start(dir.path(), None);
    assert_eq!(srv.ok("bdev_get_bdevs", None), json!([]));

    // Attach through the CLI client: the result is printed as JSON.
    let out = srv.cli(&[
        "bdev_virtio_attach_controller",
        &attach_params("VirtioBlk0", &blk_sock, "blk").to_string(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let names: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(names, json!(["VirtioBlk0"]));
    let mut names = srv.ok(
        "bdev_virtio_attach_controller",
        Some(attach_params("VirtioScsi0", &scsi_sock, "scsi")),
    );
    names.as_array_mut().unwrap().sort_by_key(|v| v.to_string());
    assert_eq!(names, json!(["VirtioScsi0t0", "VirtioScsi0t0l1"]));

    // A taken name.
    let (code, msg) = srv.err(
        "bdev_virtio_attach_controller",
        Some(attach_params("VirtioBlk0", &blk_sock, "blk")),
    );
    assert_eq!(code, -17, "{msg}");
    assert!(msg.contains("VirtioBlk0"), "{msg}");

    let bdevs = srv.ok("bdev_get_bdevs", None);
    assert_eq!(bdevs.as_array().unwrap().len(), 3, "{bdevs}");
    let b = srv.ok("bdev_get_bdevs", Some(json!({"name":"VirtioBlk0"})));
    let b = &b[0];
    assert_eq!(b["name"], "VirtioBlk0");
    assert_eq!(b["product_name"], "VirtioBlk Disk");
    assert_eq!(b["block_size"], 512);
    assert_eq!(b["num_blocks"], (64u64 << 20) / 512);
    assert_eq!(b["supported_io_types"]["read"], true);
    assert_eq!(b["supported_io_types"]["write"], true);
    let v = &b["driver_specific"]["virtio_blk"]["virtio"];
    assert_eq!(v["vq_count"], 1);
    assert_eq!(v["type"], "user");
    assert_eq!(v["socket"], blk_sock.to_str().unwrap());
    let s = srv.ok("bdev_get_bdevs", Some(json!({"name":"VirtioScsi0t0l1"})));
    let s = &s[0];
    assert_eq!(s["product_name"], "VirtioScsi Disk");
    assert_eq!(s["num_blocks"], (16u64 << 20) / 512);
    assert_eq!(s["driver_specific"]["virtio_scsi"]["target"], 0);
    assert_eq!(s["driver_specific"]["virtio_scsi"]["lun"], 1);

    let devs = srv.ok("bdev_virtio_scsi_get_devices", None);
    assert_eq!(devs.as_array().unwrap().len(), 1, "{devs}");
    assert_eq!(devs[0]["name"], "VirtioScsi0");
    assert_eq!(devs[0]["virtio"]["vq_count"], 1);
    assert!(devs[0]["virtio"]["vq_size"].as_u64().unwrap() >= 16);

    let st = srv.ok("bdev_get_iostat", None);
    assert_eq!(st["tick_rate"], 1_000_000_000u64);
    assert!(st["ticks"].as_u64().unwrap() > 0);
    assert_eq!(st["bdevs"].as_array().unwrap().len(), 3);
    let st = srv.ok("bdev_get_iostat", Some(json!({"name":"VirtioScsi0t0"})));
    let one = &st["bdevs"][0];
    assert_eq!(one["name"], "VirtioScsi0t0");
    for k in [
        "bytes_read",
        "num_read_ops",
        "bytes_written",
        "num_write_ops",
        "bytes_unmapped",
        "num_unmap_ops",
        "read_latency_ticks",
        "write_latency_ticks",
        "unmap_latency_ticks",
    ] {
        assert!(one[k].is_u64(), "{k} in {one}");
    }

    assert_eq!(
        srv.ok(
            "bdev_virtio_blk_set_hotplug",
            Some(json!({"enable": true, "period_us": 100000}))
        ),
        true
    );
    let cfg = srv.ok("save_config", None);
    let bdev_cfg = srv.ok("framework_get_config", Some(json!({"name":"bdev"})));
    // What SPDK's `rpc.py save_config` asks before framework_get_config.
    assert_eq!(
        srv.ok("framework_get_subsystems", None),
        json!([{"subsystem":"bdev","depends_on":[]},{"subsystem":"ublk","depends_on":["bdev"]}])
    );
    assert_eq!(
        cfg["subsystems"][1],
        json!({"subsystem":"ublk","config":[]}),
        "no ublk target, no ublk calls"
    );
    assert_eq!(cfg["subsystems"][0]["config"], bdev_cfg);
    let methods: Vec<&str> = bdev_cfg
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["method"].as_str().unwrap())
        .collect();
    assert_eq!(
        methods,
        [
            "bdev_virtio_attach_controller",
            "bdev_virtio_attach_controller",
            "bdev_virtio_blk_set_hotplug"
        ]
    );
    assert_eq!(
        bdev_cfg[2]["params"],
        json!({"enable":true,"period_us":100000})
    );

    // Detach both; the targets are free again for the saved config.
    assert_eq!(
        srv.ok(
            "bdev_virtio_detach_controller",
            Some(json!({"name":"VirtioBlk0"}))
        ),
        true
    );
    let out = srv.cli(&["bdev_virtio_detach_controller", r#"{"name":"VirtioScsi0"}"#]);
    assert!(out.status.success());
    assert_eq!(srv.ok("bdev_get_bdevs", None), json!([]));
    assert_eq!(srv.ok("bdev_virtio_scsi_get_devices", None), json!([]));
    let (code, _) = srv.err(
        "bdev_virtio_detach_controller",
        Some(json!({"name":"VirtioBlk0"})),
    );
    assert_eq!(code, -19);

    // The saved config re-attaches the same bdevs.
    let saved = dir.path().join("saved.json");
    std::fs::write(&saved, serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
    let out = Command::new(BIN)
        .args(["bdevs", "--json", "-c"])
        .arg(&saved)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let infos: Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut got: Vec<&str> = infos
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap())
        .collect();
    got.sort();
    assert_eq!(got, ["VirtioBlk0", "VirtioScsi0t0", "VirtioScsi0t0l1"]);

    // And `vireo serve -c` starts with them; SIGTERM detaches and removes the socket.
    drop(srv);
    let _ = std::fs::remove_file(dir.path().join("rpc.sock"));
    let srv = Server::start(dir.path(), Some(&saved));
    assert_eq!(srv.ok("bdev_get_bdevs", None).as_array().unwrap().len(), 3);
    let sock = srv.sock.clone();
    let st = srv.stop();
    assert!(st.success(), "{st}");
    assert!(!sock.exists(), "the socket file is removed on exit");
}

#[test]
fn bad_requests_get_errors_and_never_kill_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start(dir.path(), None);

    let (code, msg) = srv.err("bdev_frobnicate", None);
    assert_eq!(code, -32601, "{msg}");
    assert!(msg.contains("bdev_frobnicate"), "{msg}");

    let (code, msg) = srv.err("bdev_get_bdevs", Some(json!({"nmae":"x"})));
    assert_eq!(code, -32602);
    assert!(msg.contains("nmae"), "{msg}");
    let (code, msg) = srv.err(
        "bdev_virtio_attach_controller",
        Some(json!({"name":"A","trtype":"user","traddr":"/nonexistent","dev_type":"blk","vq_cuont":2})),
    );
    assert_eq!(code, -32602);
    assert!(msg.contains("vq_cuont"), "{msg}");
    let (code, msg) = srv.err("bdev_virtio_attach_controller", None);
    assert_eq!(code, -32602);
    assert!(msg.contains("name"), "{msg}");
    let (code, msg) = srv.err("bdev_virtio_blk_set_hotplug", Some(json!({"enable":"yes"})));
    assert_eq!(code, -32602);
    assert!(msg.contains("enable"), "{msg}");
    let (code, _) = srv.err("framework_get_config", Some(json!({"name":"nvmf"})));
    assert_eq!(code, -32602);
    let (code, _) = srv.err("save_config", Some(json!([1, 2])));
    assert_eq!(code, -32602);

    // A back-end that is not there: a failure, not a crash.
    let (code, msg) = srv.err(
        "bdev_virtio_attach_controller",
        Some(attach_params(
            "Gone0",
            &dir.path().join("nobody.sock"),
            "blk",
        )),
    );
    assert!(code < 0, "{code}");
    assert!(msg.contains("Gone0"), "{msg}");

    let (code, msg) = srv.err("bdev_get_bdevs", Some(json!({"name":"Nope0"})));
    assert_eq!(code, -19);
    assert_eq!(msg, "No such device");
    let (code, _) = srv.err("bdev_get_iostat", Some(json!({"name":"Nope0"})));
    assert_eq!(code, -19);

    // Not JSON-RPC: invalid request, with the id null.
    let r = raw(&srv.sock, br#"{"id":1,"method":"save_config"}"#, 1);
    assert_eq!(r[0]["error"]["code"], -32600);
    let r = raw(&srv.sock, b"[]", 1);
    assert_eq!(r[0]["error"]["code"], -32600);
    let r = raw(&srv.sock, b"42\n", 1);
    assert_eq!(r[0]["error"]["code"], -32600);
    // Garbage: parse error, then the connection is closed.
    let r = raw(&srv.sock, b"{\"jsonrpc\": nope}\n", 1);
    assert_eq!(r[0]["error"]["code"], -32700);
    assert_eq!(r[0]["id"], Value::Null);
    // Back-to-back and newline-delimited requests on one connection.
    let r = raw(
        &srv.sock,
        br#"{"jsonrpc":"2.0","id":1,"method":"rpc_get_methods"}{"jsonrpc":"2.0","id":2,"method":"bdev_get_bdevs"}
{"jsonrpc":"2.0","id":"three","method":"save_config"}
"#,
        3,
    );
    assert_eq!(r[0]["id"], 1);
    assert!(r[0]["result"]
        .as_array()
        .unwrap()
        .contains(&json!("bdev_get_iostat")));
    assert_eq!(r[1]["id"], 2);
    assert_eq!(r[1]["result"], json!([]));
    assert_eq!(r[2]["id"], "three");
    assert_eq!(
        r[2]["result"],
        json!({"subsystems":[{"subsystem":"bdev","config":[]},{"subsystem":"ublk","config":[]}]})
    );
    // A client that hangs up mid-request.
    {
        let mut s = UnixStream::connect(&srv.sock).unwrap();
        s.write_all(br#"{"jsonrpc":"2.0","id":1,"meth"#).unwrap();
    }

    // The CLI: an error response goes to stderr with a non-zero exit.
    let out = srv.cli(&["bdev_get_bdevs", r#"{"name":"Nope0"}"#]);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("No such device"), "{err}");
    let out = srv.cli(&["bdev_get_bdevs", "{not json"]);
    assert!(!out.status.success());
    let out = srv.cli(&["rpc_get_methods"]);
    assert!(out.status.success());
    let m: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(m.as_array().unwrap().contains(&json!("save_config")));

    // Still serving after all that.
    assert_eq!(srv.ok("bdev_get_bdevs", None), json!([]));
    // What SPDK's tools ask first, in SPDK's shape.
    let v = srv.ok("spdk_get_version", None);
    assert!(v["version"].as_str().unwrap().starts_with("vireo v"), "{v}");
    assert!(
        v["fields"]["major"].is_u64() && v["fields"]["suffix"].is_string(),
        "{v}"
    );

    // No server: exit 2 with a clear message.
    let out = Command::new(BIN)
        .args(["rpc", "-r"])
        .arg(dir.path().join("missing.sock"))
        .arg("bdev_get_bdevs")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("missing.sock") && err.contains("connect"),
        "{err}"
    );

    // A bad config: exit 2 naming the file and the key, nothing left listening.
    let bad = dir.path().join("bad.json");
    std::fs::write(
        &bad,
        r#"{"subsystems":[{"subsystem":"bdev","config":[{"method":"bdev_virtio_attach_controller","params":{"name":"A","trtype":"user","traddr":"/x","dev_type":"blk","vq_szie":8}}]}]}"#,
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["serve", "-c"])
        .arg(&bad)
        .arg("-r")
        .arg(dir.path().join("other.sock"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.json") && err.contains("vq_szie"), "{err}");
    assert!(!dir.path().join("other.sock").exists());

    // A second server on the same socket is refused; the first keeps serving.
    let out = Command::new(BIN)
        .args(["serve", "-r"])
        .arg(&srv.sock)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("in use"));
    assert_eq!(srv.ok("bdev_get_bdevs", None), json!([]));
}

#[test]
fn oversized_requests_and_too_many_clients_are_turned_away() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start(dir.path(), None);
    // A request that never ends: an error after 1 MiB, not an ever-growing buffer.
    let mut huge = b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"".to_vec();
    huge.extend(std::iter::repeat_n(b'x', 2 << 20));
    let mut s = UnixStream::connect(&srv.sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    // The server stops reading at the limit; the rest may not fit in the socket.
    let _ = s.write_all(&huge);
    let r: Value = serde_json::Deserializer::from_reader(BufReader::new(&s))
        .into_iter::<Value>()
        .next()
        .unwrap()
        .unwrap();
    assert_eq!(r["error"]["code"], -32600, "{r}");
    assert!(r["error"]["message"]
        .as_str()
        .unwrap()
        .contains("larger than"));
    // Idle clients beyond the cap are turned away with an error; the server still
    // answers once they leave.
    let idle: Vec<UnixStream> = (0..64)
        .map(|_| UnixStream::connect(&srv.sock).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let r = raw(
        &srv.sock,
        b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"bdev_get_bdevs\"}",
        1,
    );
    assert!(
        r[0]["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("too many clients"),
        "{r:?}"
    );
    drop(idle);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(srv.ok("bdev_get_bdevs", None), json!([]));
}

fn blk_target(sock: &Path, mib: u64) -> vireo_target::TargetHandle {
    spawn_blk_target(
        sock,
        BlkTargetConfig {
            backend: Backing::Ram {
                size_bytes: mib << 20,
            },
            ..Default::default()
        },
    )
    .unwrap()
}

fn names(v: &Value) -> Vec<String> {
    let mut n: Vec<String> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|b| match b {
            Value::String(s) => s.clone(),
            b => b["name"].as_str().unwrap().to_string(),
        })
        .collect();
    n.sort();
    n
}

/// A scsi controller whose LUN bdev would take the name of another controller's bdev
/// is refused whole, in either order; nothing of it is left behind and the name of
/// the refused controller is free again.
#[test]
fn bdev_names_are_unique_across_controllers_in_both_orders() {
    let dir = tempfile::tempdir().unwrap();
    let blk_sock = dir.path().join("blk.sock");
    let scsi_sock = dir.path().join("scsi.sock");
    let _blk = blk_target(&blk_sock, 64);
    let _scsi = spawn_scsi_target(
        &scsi_sock,
        ScsiTargetConfig {
            luns: BTreeMap::from([((0, 0), ram_lun(32)), ((0, 1), ram_lun(16))]),
            ..Default::default()
        },
    )
    .unwrap();
    let srv = Server::start(dir.path(), None);

    // blk S2t0, then scsi S2 (whose LUN 0 is S2t0).
    assert_eq!(
        srv.ok(
            "bdev_virtio_attach_controller",
            Some(attach_params("S2t0", &blk_sock, "blk"))
        ),
        json!(["S2t0"])
    );
    for _ in 0..2 {
        let (code, msg) = srv.err(
            "bdev_virtio_attach_controller",
            Some(attach_params("S2", &scsi_sock, "scsi")),
        );
        assert_eq!(code, -17, "{msg}");
        assert!(
            msg.contains("S2t0") && msg.contains("controller S2t0"),
            "names the bdev and its controller: {msg}"
        );
    }
    assert_eq!(names(&srv.ok("bdev_get_bdevs", None)), ["S2t0"]);
    assert_eq!(srv.ok("bdev_virtio_scsi_get_devices", None), json!([]));
    let b = srv.ok("bdev_get_bdevs", Some(json!({"name":"S2t0"})));
    assert_eq!(b[0]["product_name"], "VirtioBlk Disk");
    let (code, _) = srv.err("bdev_virtio_detach_controller", Some(json!({"name":"S2"})));
    assert_eq!(code, -19, "the refused controller left nothing behind");

    // Once the blk controller is gone, the scsi controller attaches (its back-end
    // was left free too).
    srv.ok(
        "bdev_virtio_detach_controller",
        Some(json!({"name":"S2t0"})),
    );
    assert_eq!(
        names(&srv.ok(
            "bdev_virtio_attach_controller",
            Some(attach_params("S2", &scsi_sock, "scsi"))
        )),
        ["S2t0", "S2t0l1"]
    );

    // scsi S2 first, then blk S2t0l1.
    let (code, msg) = srv.err(
        "bdev_virtio_attach_controller",
        Some(attach_params("S2t0l1", &blk_sock, "blk")),
    );
    assert_eq!(code, -17, "{msg}");
    assert!(
        msg.contains("S2t0l1") && msg.contains("controller S2"),
        "names the bdev and its controller: {msg}"
    );
    assert_eq!(names(&srv.ok("bdev_get_bdevs", None)), ["S2t0", "S2t0l1"]);
    let b = srv.ok("bdev_get_bdevs", Some(json!({"name":"S2t0l1"})));
    assert_eq!(b[0]["product_name"], "VirtioScsi Disk");
    // The blk back-end was not kept either.
    assert_eq!(
        srv.ok(
            "bdev_virtio_attach_controller",
            Some(attach_params("B", &blk_sock, "blk"))
        ),
        json!(["B"])
    );
}

/// A LUN hot-added later whose bdev name another controller's bdev has is not added:
/// the other bdev keeps its name, and the controller says which LUN it left out and why.
#[test]
fn a_hot_added_lun_whose_bdev_name_is_taken_is_not_added() {
    let dir = tempfile::tempdir().unwrap();
    let blk_sock = dir.path().join("blk.sock");
    let scsi_sock = dir.path().join("scsi.sock");
    let _blk = blk_target(&blk_sock, 64);
    let scsi = spawn_scsi_target(
        &scsi_sock,
        ScsiTargetConfig {
            luns: BTreeMap::from([((0, 0), ram_lun(32))]),
            ..Default::default()
        },
    )
    .unwrap();
    let srv = Server::start(dir.path(), None);
    assert_eq!(
        srv.ok(
            "bdev_virtio_attach_controller",
            Some(attach_params("H", &scsi_sock, "scsi"))
        ),
        json!(["Ht0"])
    );
    assert_eq!(
        srv.ok(
            "bdev_virtio_attach_controller",
            Some(attach_params("Ht0l1", &blk_sock, "blk"))
        ),
        json!(["Ht0l1"])
    );
    scsi.add_lun(0, 1, ram_lun(8)).unwrap();
    scsi.add_lun(0, 2, ram_lun(8)).unwrap();
    // LUN 2 is added (its name is free); LUN 1 is not.
    let t0 = Instant::now();
    let devs = loop {
        let devs = srv.ok("bdev_virtio_scsi_get_devices", None);
        let bdevs = names(&srv.ok("bdev_get_bdevs", None));
        if bdevs.len() >= 4 || devs[0].get("luns_not_added").is_some() {
            break devs;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the hot-plug events were not handled: {bdevs:?} {devs}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let t0 = Instant::now();
    while !names(&srv.ok("bdev_get_bdevs", None)).contains(&"Ht0l2".to_string()) {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "LUN 2 was not added"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        names(&srv.ok("bdev_get_bdevs", None)),
        ["Ht0", "Ht0l1", "Ht0l2"]
    );
    let b = srv.ok("bdev_get_bdevs", Some(json!({"name":"Ht0l1"})));
    assert_eq!(b[0]["product_name"], "VirtioBlk Disk");
    let left = &devs[0]["luns_not_added"];
    assert_eq!(left[0]["target"], 0, "{devs}");
    assert_eq!(left[0]["lun"], 1, "{devs}");
    assert_eq!(left[0]["bdev"], "Ht0l1", "{devs}");
    let why = left[0]["reason"].as_str().unwrap();
    assert!(why.contains("controller Ht0l1"), "{why}");
    assert!(
        srv.log_text().contains("Ht0l1"),
        "the refusal is logged: {}",
        srv.log_text()
    );
}

/// A unix socket listening with a backlog of 0 whose queue is full (nobody accepts).
fn full_listener(path: &Path) -> (std::os::unix::net::UnixListener, Vec<std::os::fd::OwnedFd>) {
    use std::os::fd::{AsRawFd, FromRawFd};
    let l = std::os::unix::net::UnixListener::bind(path).unwrap();
    // SAFETY: listen(2) on a socket this function owns; a second listen() only changes
    // the backlog.
    assert_eq!(unsafe { libc::listen(l.as_raw_fd(), 0) }, 0);
    // SAFETY: sockaddr_un is plain data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr
        .sun_path
        .iter_mut()
        .zip(path.as_os_str().as_encoded_bytes())
    {
        *d = *s as libc::c_char;
    }
    let mut queued = Vec::new();
    loop {
        // SAFETY: a new socket; the fd is owned by the OwnedFd below.
        let fd = unsafe {
            libc::socket(
                libc::AF_UNIX,
                libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
            )
        };
        assert!(fd >= 0);
        // SAFETY: fd is a fresh socket nobody else owns.
        let owned = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        // SAFETY: addr is a valid sockaddr_un and its size is passed.
        let rc = unsafe {
            libc::connect(
                fd,
                &addr as *const libc::sockaddr_un as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            assert_eq!(e.raw_os_error(), Some(libc::EAGAIN), "{e}");
            return (l, queued);
        }
        queued.push(owned);
        assert!(queued.len() < 8, "the listen queue does not fill");
    }
}

/// An attach to a back-end whose listen queue is full fails within the control-plane
/// deadline, says why, and leaves nothing behind: the name is free again.
#[test]
fn an_attach_to_a_full_listen_queue_fails_in_time_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let full = dir.path().join("full.sock");
    let (_l, _queued) = full_listener(&full);
    let blk_sock = dir.path().join("blk.sock");
    let _blk = blk_target(&blk_sock, 64);
    let srv = Server::start(dir.path(), None);
    let t0 = Instant::now();
    let first = {
        let sock = srv.sock.clone();
        let req = json!({"jsonrpc":"2.0","id":1,"method":"bdev_virtio_attach_controller",
            "params": attach_params("F", &full, "blk")});
        std::thread::spawn(move || raw(&sock, req.to_string().as_bytes(), 1).remove(0))
    };
    // While it waits, the name says it is being attached; F does not exist yet.
    std::thread::sleep(Duration::from_millis(500));
    let (code, msg) = srv.err(
        "bdev_virtio_attach_controller",
        Some(attach_params("F", &blk_sock, "blk")),
    );
    assert_eq!(code, -17, "{msg}");
    assert!(msg.contains("being attached"), "{msg}");
    let (code, _) = srv.err("bdev_get_bdevs", Some(json!({"name":"F"})));
    assert_eq!(code, -19);
    let r = first.join().unwrap();
    assert!(t0.elapsed() < Duration::from_secs(25), "{:?}", t0.elapsed());
    let code = r["error"]["code"].as_i64().unwrap();
    let msg = r["error"]["message"].as_str().unwrap().to_string();
    assert!(code < 0, "{code}");
    assert!(
        msg.contains("F")
            && msg.contains(full.to_str().unwrap())
            && msg.contains("did not accept the connection within"),
        "{msg}"
    );
    // Get and detach agree that F does not exist; the name can be used at once.
    let (code, _) = srv.err("bdev_get_bdevs", Some(json!({"name":"F"})));
    assert_eq!(code, -19);
    let (code, _) = srv.err("bdev_virtio_detach_controller", Some(json!({"name":"F"})));
    assert_eq!(code, -19);
    assert_eq!(
        srv.ok(
            "bdev_virtio_attach_controller",
            Some(attach_params("F", &blk_sock, "blk"))
        ),
        json!(["F"])
    );
    // `vireo bdevs -c` is bounded the same way.
    let conf = dir.path().join("full.json");
    std::fs::write(
        &conf,
        json!({"subsystems":[{"subsystem":"bdev","config":[{"method":"bdev_virtio_attach_controller","params":
            {"name":"F","trtype":"user","traddr":full.to_str().unwrap(),"dev_type":"blk"}}]}]})
        .to_string(),
    )
    .unwrap();
    let mut child = Command::new(BIN)
        .args(["bdevs", "-c"])
        .arg(&conf)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t0.elapsed() > Duration::from_secs(25) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("vireo bdevs -c hangs on a full listen queue");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("did not accept the connection within"),
        "{err}"
    );

    // So are `vireo rpc` to a server that is not accepting, and `vireo serve`'s probe
    // of a socket file that a live (if deaf) server has.
    let t0 = Instant::now();
    let out = Command::new(BIN)
        .args(["rpc", "-t", "1", "-r"])
        .arg(&full)
        .arg("bdev_get_bdevs")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("did not accept the connection within 1 s"),
        "{err}"
    );
    let out = Command::new(BIN)
        .args(["serve", "-r"])
        .arg(&full)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(t0.elapsed() < Duration::from_secs(20), "{:?}", t0.elapsed());
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("in use"));
}

/// A `vireo target` process that is killed on drop.
struct TargetProcess(Child);

impl Drop for TargetProcess {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGCONT) };
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Detaching the controller of a frozen target takes the control-plane deadline; other
/// controllers answer meanwhile.
#[test]
fn a_slow_detach_does_not_stall_other_controllers() {
    let dir = tempfile::tempdir().unwrap();
    let frozen_sock = dir.path().join("frozen.sock");
    let t = TargetProcess(
        Command::new(BIN)
            .args(["target", "--type", "blk", "--size", "16m", "-s"])
            .arg(&frozen_sock)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let t0 = Instant::now();
    while !frozen_sock.exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "vireo target did not listen"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let blk_sock = dir.path().join("blk.sock");
    let _blk = blk_target(&blk_sock, 64);
    let srv = Server::start(dir.path(), None);
    srv.ok(
        "bdev_virtio_attach_controller",
        Some(attach_params("Frozen", &frozen_sock, "blk")),
    );
    srv.ok(
        "bdev_virtio_attach_controller",
        Some(attach_params("Other", &blk_sock, "blk")),
    );
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(t.0.id() as i32, libc::SIGSTOP) };
    let sock = srv.sock.clone();
    let detach = std::thread::spawn(move || {
        let t0 = Instant::now();
        let r = raw(
            &sock,
            br#"{"jsonrpc":"2.0","id":1,"method":"bdev_virtio_detach_controller","params":{"name":"Frozen"}}"#,
            1,
        );
        (t0.elapsed(), r)
    });
    // The detach is under way (it waits for the frozen back-end).
    std::thread::sleep(Duration::from_millis(1000));
    assert!(!detach.is_finished(), "the frozen target's detach is slow");
    let t0 = Instant::now();
    let b = srv.ok("bdev_get_bdevs", Some(json!({"name":"Other"})));
    let took = t0.elapsed();
    assert_eq!(b[0]["name"], "Other");
    // The bug made this wait for the whole detach (~10 s).
    assert!(
        took < Duration::from_secs(3),
        "bdev_get_bdevs of another controller took {took:?} during a slow detach"
    );
    let (slow, r) = detach.join().unwrap();
    assert!(slow > Duration::from_secs(1), "{slow:?}");
    // Whether or not the frozen device answered its teardown, the controller is gone.
    assert!(
        r[0].get("result").is_some() || r[0].get("error").is_some(),
        "{r:?}"
    );
    assert_eq!(names(&srv.ok("bdev_get_bdevs", None)), ["Other"]);
    let (code, _) = srv.err(
        "bdev_virtio_detach_controller",
        Some(json!({"name":"Frozen"})),
    );
    assert_eq!(code, -19);
}

/// A vq_count beyond what a blk device offers says how many queues it offers, without
/// suggesting the other dev_type; a blk device attached as scsi (no request queues in
/// the scsi layout) still gets the dev_type suggestion.
#[test]
fn a_too_large_vq_count_says_what_the_device_offers_not_another_dev_type() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("blk.sock");
    let _t = blk_target(&sock, 8);
    let srv = Server::start(dir.path(), None);
    let mut p = attach_params("B", &sock, "blk");
    p["vq_count"] = json!(65535);
    let (_, msg) = srv.err("bdev_virtio_attach_controller", Some(p));
    assert!(
        msg.contains("vq_count=65535") && msg.contains("the device offers 1"),
        "{msg}"
    );
    assert!(!msg.contains("dev_type"), "no dev_type suggestion: {msg}");
    let (_, msg) = srv.err(
        "bdev_virtio_attach_controller",
        Some(attach_params("S", &sock, "scsi")),
    );
    assert!(msg.contains(r#"set "dev_type": "blk""#), "{msg}");
    // Still attachable as what it is.
    srv.ok(
        "bdev_virtio_attach_controller",
        Some(attach_params("B", &sock, "blk")),
    );
}

/// The warnings of a vhost-user connection name the controller they are about.
#[test]
fn vhost_user_warnings_name_their_controller() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("blk.sock");
    let t = blk_target(&sock, 8);
    let srv = Server::start(dir.path(), None);
    srv.ok(
        "bdev_virtio_attach_controller",
        Some(attach_params("Named7", &sock, "blk")),
    );
    t.stop();
    let t0 = Instant::now();
    let line = loop {
        let log = srv.log_text();
        if let Some(l) = log.lines().find(|l| l.contains("closed the connection")) {
            break l.to_string();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "no warning about the closed connection: {log}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(line.contains("Named7"), "{line}");
}

/// A back-end that serves one front-end at a time turns the next away by closing its
/// connection (qemu-storage-daemon) or by never accepting it (vhost-device-scsi, the
/// in-tree target): the error says so. An answer that is no vhost-user message is
/// still asked about.
#[test]
fn a_back_end_busy_with_another_front_end_is_named_as_such() {
    use std::os::unix::net::UnixListener;
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start(dir.path(), None);
    let attach = |name: &str, sock: &Path| {
        srv.err(
            "bdev_virtio_attach_controller",
            Some(attach_params(name, sock, "blk")),
        )
        .1
    };
    // Accepts and closes at once.
    let closes = dir.path().join("closes.sock");
    let l = UnixListener::bind(&closes).unwrap();
    let closer = std::thread::spawn(move || {
        let (c, _) = l.accept().unwrap();
        drop(c);
    });
    let msg = attach("C", &closes);
    closer.join().unwrap();
    assert!(
        msg.contains("may be serving another front-end") && msg.contains("one front-end at a time"),
        "{msg}"
    );
    assert!(!msg.contains("is this a vhost-user"), "{msg}");
    // Accepted by the kernel, never answered: the in-tree target serves one front-end
    // at a time and accepts the next when that one leaves.
    let busy = dir.path().join("busy.sock");
    let _t = blk_target(&busy, 8);
    srv.ok(
        "bdev_virtio_attach_controller",
        Some(attach_params("First", &busy, "blk")),
    );
    let msg = attach("Second", &busy);
    assert!(
        msg.contains("may be serving another front-end") && msg.contains("one front-end at a time"),
        "{msg}"
    );
    assert!(!msg.contains("is this a vhost-user"), "{msg}");
    // Answers garbage.
    let garbage = dir.path().join("garbage.sock");
    let l = UnixListener::bind(&garbage).unwrap();
    let talker = std::thread::spawn(move || {
        let (mut c, _) = l.accept().unwrap();
        let _ = c.write_all(&[0xff; 64]);
        std::thread::sleep(Duration::from_secs(2));
    });
    let msg = attach("G", &garbage);
    talker.join().unwrap();
    assert!(
        msg.contains("is this a vhost-user back-end socket?"),
        "{msg}"
    );
}

/// `packed_ring` through the RPC: `off` attaches with split rings and is written back
/// by `save_config`; `on` refuses a device without packed rings (the in-tree target
/// has split rings only) and says why.
#[test]
fn packed_ring_is_an_attach_param_that_save_config_keeps() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.sock"), dir.path().join("b.sock"));
    let _ta = blk_target(&a, 16);
    let _tb = blk_target(&b, 16);
    let srv = Server::start(dir.path(), None);
    let mut p = attach_params("Off", &a, "blk");
    p["packed_ring"] = json!("off");
    assert_eq!(
        srv.ok("bdev_virtio_attach_controller", Some(p)),
        json!(["Off"])
    );
    let got = srv.ok("bdev_get_bdevs", Some(json!({"name":"Off"})));
    assert_eq!(
        got[0]["driver_specific"]["virtio_blk"]["virtio"]["packed_ring"],
        false
    );
    let mut p = attach_params("On", &b, "blk");
    p["packed_ring"] = json!("on");
    let (_, msg) = srv.err("bdev_virtio_attach_controller", Some(p));
    assert!(
        msg.contains("packed_ring") && msg.contains("VIRTIO_F_RING_PACKED"),
        "{msg}"
    );
    let mut p = attach_params("Bad", &b, "blk");
    p["packed_ring"] = json!("sometimes");
    let (code, msg) = srv.err("bdev_virtio_attach_controller", Some(p));
    assert_eq!(code, -32602, "{msg}");
    assert!(msg.contains("packed_ring"), "{msg}");
    let cfg = srv.ok("framework_get_config", Some(json!({"name":"bdev"})));
    let attach = cfg
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["params"]["name"] == "Off")
        .unwrap_or_else(|| panic!("{cfg}"));
    assert_eq!(attach["params"]["packed_ring"], "off");
}
