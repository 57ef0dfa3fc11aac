//! `vireo serve` and `vireo rpc`: SPDK-compatible JSON-RPC 2.0 on a unix socket.
//!
//! A request is one JSON object; requests may be newline-delimited or sent back to
//! back. Each response is one JSON object followed by a newline. A client that sends
//! bytes that are not JSON gets a parse error (-32700) and its connection is closed;
//! the server carries on.

use std::io::{BufReader, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::{json, Map, Value};
use vireo_bdev::{AttachParams, Bdev, BdevError, ConfigCall, Registry};

/// JSON-RPC 2.0 error codes (and the negative errno values SPDK uses).
pub const PARSE_ERROR: i64 = -32700;
/// The request is not a valid JSON-RPC 2.0 request object.
pub const INVALID_REQUEST: i64 = -32600;
/// No such method.
pub const METHOD_NOT_FOUND: i64 = -32601;
/// Bad params.
pub const INVALID_PARAMS: i64 = -32602;
/// Anything else.
pub const INTERNAL_ERROR: i64 = -32603;
/// -ENODEV, as SPDK answers for an unknown bdev.
pub const ENODEV: i64 = -(libc::ENODEV as i64);
/// -EEXIST: the name is taken.
pub const EEXIST: i64 = -(libc::EEXIST as i64);

/// The methods the server answers, as `rpc_get_methods` lists them.
pub const METHODS: &[&str] = &[
    "bdev_get_bdevs",
    "bdev_get_iostat",
    "bdev_virtio_attach_controller",
    "bdev_virtio_blk_set_hotplug",
    "bdev_virtio_detach_controller",
    "bdev_virtio_scsi_get_devices",
    "framework_get_config",
    "framework_get_subsystems",
    "nbd_get_disks",
    "nbd_start_disk",
    "nbd_stop_disk",
    "rpc_get_methods",
    "save_config",
    "spdk_get_version",
];

/// A JSON-RPC error object.
#[derive(Debug, Clone, PartialEq)]
pub struct RpcError {
    /// Error code.
    pub code: i64,
    /// Message.
    pub message: String,
    /// Details.
    pub data: Option<Value>,
}

impl RpcError {
    fn new(code: i64, message: impl Into<String>) -> RpcError {
        RpcError {
            code,
            message: message.into(),
            data: None,
        }
    }

    fn params(message: impl Into<String>) -> RpcError {
        RpcError::new(INVALID_PARAMS, message)
    }

    fn no_such_bdev(name: &str) -> RpcError {
        RpcError {
            code: ENODEV,
            message: "No such device".into(),
            data: Some(Value::String(format!("no bdev named {name}"))),
        }
    }

    fn to_json(&self) -> Value {
        let mut e = json!({"code": self.code, "message": self.message});
        if let Some(d) = &self.data {
            e["data"] = d.clone();
        }
        e
    }
}

impl From<BdevError> for RpcError {
    fn from(e: BdevError) -> RpcError {
        let code = match &e {
            BdevError::Config(_) => INVALID_PARAMS,
            BdevError::NotFound(_) => ENODEV,
            BdevError::NameTaken(_) => EEXIST,
            _ => INTERNAL_ERROR,
        };
        RpcError::new(code, e.to_string())
    }
}

type RpcResult = std::result::Result<Value, RpcError>;

/// The `params` of `method` as an object (absent or null: empty), refusing keys not in
/// `allowed`.
fn params_obj<'a>(
    method: &str,
    params: &'a Value,
    allowed: &[&str],
) -> std::result::Result<std::borrow::Cow<'a, Map<String, Value>>, RpcError> {
    let p = match params {
        Value::Null => return Ok(std::borrow::Cow::Owned(Map::new())),
        Value::Object(m) => m,
        _ => {
            return Err(RpcError::params(format!(
                "{method}: \"params\" must be an object"
            )))
        }
    };
    for k in p.keys() {
        if !allowed.contains(&k.as_str()) {
            return Err(RpcError::params(if allowed.is_empty() {
                format!("{method}: unknown parameter \"{k}\" ({method} takes no parameters)")
            } else {
                format!(
                    "{method}: unknown parameter \"{k}\" (allowed: {})",
                    allowed.join(", ")
                )
            }));
        }
    }
    Ok(std::borrow::Cow::Borrowed(p))
}

fn opt_str(
    method: &str,
    p: &Map<String, Value>,
    key: &str,
) -> std::result::Result<Option<String>, RpcError> {
    match p.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(v) => Err(RpcError::params(format!(
            "{method}: \"{key}\" must be a string, got {v}"
        ))),
    }
}

fn req_str(
    method: &str,
    p: &Map<String, Value>,
    key: &str,
) -> std::result::Result<String, RpcError> {
    opt_str(method, p, key)?
        .ok_or_else(|| RpcError::params(format!("{method}: \"{key}\" is required")))
}

/// The NBD server of `vireo serve --nbd`, when there is one.
pub(crate) static NBD: std::sync::OnceLock<Arc<crate::nbd::NbdServer>> = std::sync::OnceLock::new();

fn nbd_server() -> std::result::Result<&'static Arc<crate::nbd::NbdServer>, RpcError> {
    NBD.get().ok_or_else(|| {
        RpcError::new(
            INTERNAL_ERROR,
            "no NBD listener: start vireo serve with --nbd unix:PATH or --nbd tcp:HOST:PORT",
        )
    })
}

/// Answer one call.
pub fn dispatch(reg: &Registry, method: &str, params: &Value) -> RpcResult {
    match method {
        "rpc_get_methods" => {
            params_obj(method, params, &["current", "include_aliases"])?;
            Ok(json!(METHODS))
        }
        // SPDK's tools ask this first; the shape is SPDK's, the version vireo's.
        "spdk_get_version" => {
            params_obj(method, params, &[])?;
            let v = env!("CARGO_PKG_VERSION");
            let mut parts = v.split(['.', '-']);
            let mut num = || {
                parts
                    .next()
                    .and_then(|p| p.parse::<u64>().ok())
                    .unwrap_or(0)
            };
            let (major, minor, patch) = (num(), num(), num());
            Ok(json!({
                "version": format!("vireo v{v}"),
                "fields": {"major": major, "minor": minor, "patch": patch, "suffix": ""}
            }))
        }
        "bdev_virtio_attach_controller" => {
            let empty = Value::Object(Map::new());
            let p = if params.is_null() { &empty } else { params };
            let a =
                crate::config::attach_from_json(p).map_err(|e| RpcError::params(e.to_string()))?;
            let bdevs = reg.attach(&a)?;
            Ok(json!(bdevs.iter().map(|b| b.name()).collect::<Vec<_>>()))
        }
        "bdev_virtio_detach_controller" => {
            let p = params_obj(method, params, &["name"])?;
            let name = req_str(method, &p, "name")?;
            reg.detach(&name)?;
            Ok(Value::Bool(true))
        }
        "bdev_virtio_scsi_get_devices" => {
            params_obj(method, params, &[])?;
            Ok(Value::Array(
                reg.controllers()
                    .into_iter()
                    .filter(|(a, _)| a.dev_type == vireo_bdev::DevType::Scsi)
                    .map(|(a, failure)| {
                        let mut d = json!({"name": a.name, "virtio": virtio_json(reg, &a)});
                        if let Some(f) = failure {
                            d["failed"] = Value::String(f);
                        }
                        d
                    })
                    .collect(),
            ))
        }
        "bdev_virtio_blk_set_hotplug" => {
            let p = params_obj(method, params, &["enable", "period_us"])?;
            let enable = match p.get("enable") {
                Some(Value::Bool(b)) => *b,
                _ => {
                    return Err(RpcError::params(format!(
                        "{method}: \"enable\" (a boolean) is required"
                    )))
                }
            };
            let period_us = match p.get("period_us") {
                None | Some(Value::Null) => None,
                Some(v) => Some(v.as_u64().ok_or_else(|| {
                    RpcError::params(format!(
                        "{method}: \"period_us\" must be a non-negative integer, got {v}"
                    ))
                })?),
            };
            reg.apply(&[ConfigCall::BlkHotplug { enable, period_us }])?;
            Ok(Value::Bool(true))
        }
        "bdev_get_bdevs" => {
            let p = params_obj(method, params, &["name", "timeout"])?;
            let bdevs = select(reg, opt_str(method, &p, "name")?)?;
            Ok(Value::Array(
                bdevs.iter().map(|b| bdev_json(reg, b)).collect(),
            ))
        }
        "bdev_get_iostat" => {
            let p = params_obj(method, params, &["name", "per_channel"])?;
            if let Some(v) = p.get("per_channel") {
                if v != &Value::Bool(false) && !v.is_null() {
                    return Err(RpcError::params(format!(
                        "{method}: \"per_channel\" is not supported"
                    )));
                }
            }
            let bdevs = select(reg, opt_str(method, &p, "name")?)?;
            Ok(json!({
                "tick_rate": 1_000_000_000u64,
                "ticks": monotonic_ns(),
                "bdevs": bdevs.iter().map(|b| iostat_json(b)).collect::<Vec<_>>(),
            }))
        }
        "framework_get_config" => {
            let p = params_obj(method, params, &["name"])?;
            let name = req_str(method, &p, "name")?;
            let cfg = crate::config::save_config(reg);
            cfg["subsystems"]
                .as_array()
                .and_then(|s| s.iter().find(|s| s["subsystem"] == name.as_str()))
                .map(|s| s["config"].clone())
                .ok_or_else(|| {
                    RpcError::params(format!(
                        "{method}: no subsystem named {name:?} (vireo has \"bdev\")"
                    ))
                })
        }
        // SPDK's `rpc.py save_config` builds the document from these two calls.
        "framework_get_subsystems" => {
            params_obj(method, params, &[])?;
            Ok(json!([{"subsystem": "bdev", "depends_on": []}]))
        }
        "save_config" => {
            params_obj(method, params, &[])?;
            Ok(crate::config::save_config(reg))
        }
        // SPDK's NBD RPCs, adapted: `nbd_device` is an export name, not /dev/nbdX.
        "nbd_start_disk" => {
            let p = params_obj(method, params, &["bdev_name", "nbd_device"])?;
            let bdev = req_str(method, &p, "bdev_name")?;
            let export = opt_str(method, &p, "nbd_device")?;
            nbd_server()?
                .start_disk(&bdev, export.as_deref())
                .map(Value::String)
                .map_err(|e| RpcError::new(INTERNAL_ERROR, format!("{e:#}")))
        }
        "nbd_stop_disk" => {
            let p = params_obj(method, params, &["nbd_device"])?;
            let export = req_str(method, &p, "nbd_device")?;
            nbd_server()?
                .stop_disk(&export)
                .map(|_| Value::Bool(true))
                .map_err(|e| RpcError::new(INTERNAL_ERROR, format!("{e:#}")))
        }
        "nbd_get_disks" => {
            let p = params_obj(method, params, &["nbd_device"])?;
            let only = opt_str(method, &p, "nbd_device")?;
            let exports = NBD.get().map(|n| n.exports()).unwrap_or_default();
            Ok(Value::Array(
                exports
                    .into_iter()
                    .filter(|(e, _)| only.as_ref().is_none_or(|o| o == e))
                    .map(|(e, b)| json!({"nbd_device": e, "bdev_name": b}))
                    .collect(),
            ))
        }
        other => Err(RpcError::new(
            METHOD_NOT_FOUND,
            format!("Method not found: {other}"),
        )),
    }
}

fn select(reg: &Registry, name: Option<String>) -> std::result::Result<Vec<Arc<Bdev>>, RpcError> {
    match name {
        None => Ok(reg.bdevs()),
        Some(n) => reg
            .bdev(&n)
            .map(|b| vec![b])
            .ok_or_else(|| RpcError::no_such_bdev(&n)),
    }
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec to a valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// SPDK's `virtio` object of a controller: queues and transport.
fn virtio_json(reg: &Registry, a: &AttachParams) -> Value {
    // The queue size in use may be smaller than asked (a back-end that refused it).
    let (vq_count, vq_size) = reg
        .with_controller(&a.name, |c| {
            c.bdevs()
                .first()
                .map(|b| {
                    let i = b.info();
                    (i.num_queues, i.queue_size)
                })
                .unwrap_or((a.vq_count, a.vq_size))
        })
        .unwrap_or((a.vq_count, a.vq_size));
    let mut v = json!({"vq_count": vq_count, "vq_size": vq_size});
    match a.trtype {
        vireo_bdev::TrType::User => {
            v["type"] = "user".into();
            v["socket"] = a.traddr.clone().into();
        }
        vireo_bdev::TrType::Pci => {
            v["type"] = "pci".into();
            v["pci_address"] = a.traddr.clone().into();
        }
    }
    v
}

fn bdev_json(reg: &Registry, b: &Bdev) -> Value {
    let i = b.info();
    let params = reg
        .controllers()
        .into_iter()
        .find(|(a, _)| a.name == i.controller);
    let mut virtio = match &params {
        Some((a, _)) => virtio_json(reg, a),
        None => json!({"vq_count": i.num_queues, "vq_size": i.queue_size}),
    };
    if let Some((_, Some(f))) = &params {
        virtio["failed"] = f.clone().into();
    }
    let (product, driver_specific) = match i.scsi {
        Some(addr) => {
            let mut d = json!({
                "controller": i.controller,
                "target": addr.target,
                "lun": addr.lun,
                "virtio": virtio,
            });
            for (k, v) in [
                ("vendor", &i.vendor),
                ("product", &i.product),
                ("serial", &i.serial),
                ("device_id", &i.device_id),
            ] {
                if let Some(v) = v {
                    d[k] = v.clone().into();
                }
            }
            ("VirtioScsi Disk", json!({ "virtio_scsi": d }))
        }
        None => {
            let mut d = json!({"controller": i.controller, "virtio": virtio});
            if let Some(s) = &i.serial {
                d["serial"] = s.clone().into();
            }
            ("VirtioBlk Disk", json!({ "virtio_blk": d }))
        }
    };
    let l = i.limits;
    json!({
        "name": i.name,
        "aliases": [],
        "product_name": product,
        "block_size": i.block_size,
        "num_blocks": i.num_blocks,
        "physical_block_size": l.physical_block_size,
        "optimal_io_boundary": l.optimal_io_blocks,
        "md_size": 0,
        "claimed": false,
        "zoned": false,
        "read_only": i.read_only,
        "supported_io_types": {
            "read": i.ops.read,
            "write": i.ops.write && !i.read_only,
            "unmap": i.ops.unmap,
            "write_zeroes": i.ops.write_zeroes,
            "flush": i.ops.flush,
            "reset": i.ops.reset,
            "compare": false,
            "compare_and_write": false,
            "abort": false,
            "nvme_admin": false,
            "nvme_io": false,
        },
        "driver_specific": driver_specific,
    })
}

fn iostat_json(b: &Bdev) -> Value {
    let s = b.iostat();
    json!({
        "name": b.name(),
        "bytes_read": s.bytes_read,
        "num_read_ops": s.num_read_ops,
        "bytes_written": s.bytes_written,
        "num_write_ops": s.num_write_ops,
        "bytes_unmapped": s.bytes_unmapped,
        "num_unmap_ops": s.num_unmap_ops,
        "read_latency_ticks": s.read_latency_ns,
        "write_latency_ticks": s.write_latency_ns,
        "unmap_latency_ticks": s.unmap_latency_ns,
        "bytes_write_zeroes": s.bytes_write_zeroes,
        "num_write_zeroes_ops": s.num_write_zeroes_ops,
        "num_flush_ops": s.num_flush_ops,
        "io_errors": s.io_errors,
    })
}

/// The response to one request object, or None for a notification (no `id`).
pub fn handle_request(reg: &Registry, req: &Value) -> Option<Value> {
    let reply = |id: &Value, r: RpcResult| match r {
        Ok(v) => json!({"jsonrpc": "2.0", "id": id, "result": v}),
        Err(e) => json!({"jsonrpc": "2.0", "id": id, "error": e.to_json()}),
    };
    let invalid = |msg: &str| {
        Some(reply(
            &Value::Null,
            Err(RpcError::new(
                INVALID_REQUEST,
                format!("Invalid request: {msg}"),
            )),
        ))
    };
    let Some(obj) = req.as_object() else {
        return invalid("a request must be a JSON object");
    };
    let id = match obj.get("id") {
        None => None,
        Some(v @ (Value::Null | Value::String(_) | Value::Number(_))) => Some(v.clone()),
        Some(_) => return invalid("\"id\" must be a string, a number or null"),
    };
    for k in obj.keys() {
        if !["jsonrpc", "method", "params", "id"].contains(&k.as_str()) {
            return invalid(&format!("unknown member \"{k}\""));
        }
    }
    if obj.get("jsonrpc") != Some(&Value::String("2.0".into())) {
        return invalid("\"jsonrpc\" must be \"2.0\"");
    }
    let Some(method) = obj.get("method").and_then(Value::as_str) else {
        return invalid("\"method\" must be a string");
    };
    let params = obj.get("params").unwrap_or(&Value::Null);
    let r = if params.is_array() {
        Err(RpcError::params(format!(
            "{method}: \"params\" must be an object"
        )))
    } else {
        dispatch(reg, method, params)
    };
    if let Err(e) = &r {
        tracing::info!(method, code = e.code, "rpc error: {}", e.message);
    }
    id.map(|id| reply(&id, r))
}

/// Largest request (or batch) a client may send.
pub const MAX_REQUEST_BYTES: u64 = 1 << 20;
/// Clients served at once; more are turned away.
pub const MAX_CLIENTS: usize = 64;
/// A client that sends nothing for this long is dropped.
pub const CLIENT_IDLE: Duration = Duration::from_secs(60);

/// Counts the bytes of the request being read; refuses to read past the limit.
struct Limited<R> {
    inner: R,
    used: std::rc::Rc<std::cell::Cell<u64>>,
}

impl<R: std::io::Read> std::io::Read for Limited<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let used = self.used.get();
        if used >= MAX_REQUEST_BYTES {
            return Err(std::io::Error::other("request too large"));
        }
        let room = (MAX_REQUEST_BYTES - used).min(buf.len() as u64) as usize;
        let n = self.inner.read(&mut buf[..room])?;
        self.used.set(used + n as u64);
        Ok(n)
    }
}

/// Serve one client until it hangs up, sends something that is not JSON, sends a
/// request over [`MAX_REQUEST_BYTES`] or stays silent for [`CLIENT_IDLE`].
fn serve_client(reg: &Registry, stream: UnixStream) {
    let mut out = match stream.try_clone() {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("rpc: cannot clone the client socket: {e}");
            return;
        }
    };
    let _ = stream.set_read_timeout(Some(CLIENT_IDLE));
    let used = std::rc::Rc::new(std::cell::Cell::new(0u64));
    let reader = BufReader::new(Limited {
        inner: stream,
        used: used.clone(),
    });
    let mut send = |v: &Value| -> bool {
        let mut s = v.to_string();
        s.push('\n');
        out.write_all(s.as_bytes())
            .and_then(|_| out.flush())
            .is_ok()
    };
    for item in serde_json::Deserializer::from_reader(reader).into_iter::<Value>() {
        if item.is_ok() {
            // The next request starts counting from zero (bytes read ahead of it are
            // counted to it, which only makes the limit slightly stricter).
            used.set(0);
        }
        if let Err(e) = &item {
            if e.is_io() && used.get() >= MAX_REQUEST_BYTES {
                let _ = send(&json!({"jsonrpc": "2.0", "id": null,
                    "error": RpcError::new(INVALID_REQUEST, format!(
                        "Invalid request: larger than {MAX_REQUEST_BYTES} bytes")).to_json()}));
                return;
            }
        }
        let resp = match item {
            Ok(Value::Array(batch)) if !batch.is_empty() => {
                let r: Vec<Value> = batch
                    .iter()
                    .filter_map(|req| handle_request(reg, req))
                    .collect();
                (!r.is_empty()).then_some(Value::Array(r))
            }
            Ok(v @ Value::Array(_)) => handle_request(reg, &v),
            Ok(v) => handle_request(reg, &v),
            Err(e) if e.is_io() => return,
            Err(e) => {
                let _ = send(&json!({"jsonrpc": "2.0", "id": null,
                    "error": RpcError::new(PARSE_ERROR, format!("Parse error: {e}")).to_json()}));
                return;
            }
        };
        if let Some(r) = resp {
            if !send(&r) {
                return;
            }
        }
    }
}

/// Bind `path`, replacing a stale socket file but never a live server or another file.
pub(crate) fn bind(path: &Path) -> Result<UnixListener> {
    if let Ok(m) = std::fs::symlink_metadata(path) {
        if !m.file_type().is_socket() {
            bail!(
                "{} exists and is not a socket; refusing to replace it",
                path.display()
            );
        }
        if UnixStream::connect(path).is_ok() {
            bail!("{} is in use by a running server", path.display());
        }
        std::fs::remove_file(path)
            .with_context(|| format!("cannot remove stale socket {}", path.display()))?;
    }
    let l =
        UnixListener::bind(path).with_context(|| format!("cannot listen on {}", path.display()))?;
    // Whoever connects controls every controller: the owner only, whatever the umask.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot make {} private (mode 0600)", path.display()))?;
    Ok(l)
}

/// Removes the socket file on drop.
pub(crate) struct SocketFile(pub(crate) PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// `vireo serve`: attach `config`'s controllers, then serve JSON-RPC on `socket` until
/// SIGINT or SIGTERM.
pub fn cmd_serve(
    reg: Registry,
    config: Option<PathBuf>,
    socket: PathBuf,
    nbd: Option<crate::nbd::Listen>,
) -> Result<()> {
    let reg = Arc::new(reg);
    if let Some(c) = &config {
        let calls = crate::ini::load(c)?;
        reg.apply(&calls)?;
    }
    crate::signals::install();
    let mut nbd_thread = None;
    if let Some(listen) = nbd {
        let server = crate::nbd::NbdServer::new(reg.clone(), true, true);
        let _ = NBD.set(server.clone());
        // Bind now, so a bad address fails the command instead of a thread.
        let (tx, rx) = std::sync::mpsc::channel();
        nbd_thread = Some(
            std::thread::Builder::new()
                .name("vireo-nbd".into())
                .spawn(move || {
                    crate::nbd::serve(server, listen, crate::signals::stop_requested, tx)
                })
                .context("cannot start the NBD server thread")?,
        );
        match rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(anyhow::anyhow!(e)),
            Err(_) => {
                if let Some(Err(e)) = nbd_thread.take().map(|t| t.join().unwrap_or(Ok(()))) {
                    return Err(e);
                }
            }
        }
    }
    let listener = bind(&socket)?;
    let _guard = SocketFile(socket.clone());
    listener
        .set_nonblocking(true)
        .context("cannot make the RPC socket non-blocking")?;
    eprintln!(
        "vireo: serving JSON-RPC on {} ({} bdevs)",
        socket.display(),
        reg.bdevs().len()
    );
    let clients = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    while !crate::signals::stop_requested() {
        match listener.accept() {
            Ok((mut stream, _)) => {
                if let Err(e) = stream.set_nonblocking(false) {
                    tracing::warn!("rpc: {e}");
                    continue;
                }
                if clients.load(std::sync::atomic::Ordering::Acquire) >= MAX_CLIENTS {
                    let msg = json!({"jsonrpc": "2.0", "id": null, "error": RpcError::new(
                        INTERNAL_ERROR,
                        format!("too many clients (at most {MAX_CLIENTS} at once); try again later"),
                    ).to_json()});
                    let _ = stream.write_all(format!("{msg}\n").as_bytes());
                    continue;
                }
                clients.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
                let reg = reg.clone();
                let count = clients.clone();
                let spawned = std::thread::Builder::new()
                    .name("vireo-rpc-client".into())
                    .spawn(move || {
                        serve_client(&reg, stream);
                        count.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
                    });
                if let Err(e) = spawned {
                    clients.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
                    tracing::warn!("rpc: cannot start a client thread: {e}");
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::warn!("rpc: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    eprintln!("vireo: shutting down");
    if let Some(t) = nbd_thread {
        let _ = t.join();
        // NBD I/O threads close their channels within their 200 ms receive timeout.
        std::thread::sleep(Duration::from_millis(300));
    }
    for (a, _) in reg.controllers() {
        if let Err(e) = reg.detach(&a.name) {
            tracing::warn!(controller = %a.name, "detach at shutdown failed: {e}");
        }
    }
    Ok(())
}

/// `vireo rpc`: send one request, print the result. Ok(false) on an error response.
pub fn cmd_rpc(
    socket: &Path,
    method: &str,
    params: Option<&str>,
    timeout: std::time::Duration,
) -> Result<bool> {
    let params: Option<Value> = match params {
        Some(p) => Some(
            serde_json::from_str(p)
                .with_context(|| format!("PARAMS_JSON is not valid JSON: {p}"))?,
        ),
        None => None,
    };
    let mut stream = UnixStream::connect(socket).with_context(|| {
        format!(
            "cannot connect to the RPC socket {} (is `vireo serve` running?)",
            socket.display()
        )
    })?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|_| stream.set_write_timeout(Some(timeout)))
        .context("cannot set the socket timeout")?;
    let mut req = json!({"jsonrpc": "2.0", "method": method, "id": 1});
    if let Some(p) = params {
        req["params"] = p;
    }
    stream
        .write_all(req.to_string().as_bytes())
        .and_then(|_| stream.write_all(b"\n"))
        .with_context(|| format!("cannot send the request to {}", socket.display()))?;
    let resp: Value = serde_json::Deserializer::from_reader(BufReader::new(&stream))
        .into_iter::<Value>()
        .next()
        .context("the server closed the connection without answering")?
        .with_context(|| {
            format!(
                "no answer from {} within {} s (raise --timeout if the server is busy)",
                socket.display(),
                timeout.as_secs_f64()
            )
        })?;
    if let Some(e) = resp.get("error") {
        let code = e.get("code").and_then(Value::as_i64).unwrap_or(0);
        let msg = e.get("message").and_then(Value::as_str).unwrap_or("");
        eprintln!("vireo: {method}: error {code}: {msg}");
        if let Some(d) = e.get("data") {
            match d {
                Value::String(s) => eprintln!("vireo: {s}"),
                d => eprintln!("vireo: {d}"),
            }
        }
        return Ok(false);
    }
    match resp.get("result") {
        Some(r) => {
            println!("{}", serde_json::to_string_pretty(r)?);
            Ok(true)
        }
        None => bail!("the response has neither \"result\" nor \"error\": {resp}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg() -> Registry {
        Registry::new(vireo_virtio::DmaMemory::new(Default::default()).unwrap())
    }

    fn call(r: &Registry, req: Value) -> Value {
        handle_request(r, &req).unwrap()
    }

    #[test]
    fn errors_have_json_rpc_codes() {
        let r = reg();
        let v = call(&r, json!({"jsonrpc":"2.0","id":1,"method":"nope"}));
        assert_eq!(v["error"]["code"], METHOD_NOT_FOUND);
        assert_eq!(v["id"], 1);
        let v = call(
            &r,
            json!({"jsonrpc":"2.0","id":"x","method":"bdev_get_bdevs","params":{"nmae":"a"}}),
        );
        assert_eq!(v["error"]["code"], INVALID_PARAMS);
        assert!(v["error"]["message"].as_str().unwrap().contains("nmae"));
        let v = call(
            &r,
            json!({"jsonrpc":"2.0","id":2,"method":"bdev_get_bdevs","params":{"name":"a"}}),
        );
        assert_eq!(v["error"]["code"], -19);
        assert_eq!(v["error"]["message"], "No such device");
        let v = call(&r, json!({"id":3,"method":"save_config"}));
        assert_eq!(v["error"]["code"], INVALID_REQUEST);
        let v = call(&r, json!([1]));
        assert_eq!(v["error"]["code"], INVALID_REQUEST);
        let v = call(
            &r,
            json!({"jsonrpc":"2.0","id":4,"method":"bdev_virtio_attach_controller","params":{"name":"A","trtype":"user","traddr":"/x","dev_type":"blk","bogus":1}}),
        );
        assert_eq!(v["error"]["code"], INVALID_PARAMS);
        assert!(v["error"]["message"].as_str().unwrap().contains("bogus"));
        let v = call(
            &r,
            json!({"jsonrpc":"2.0","id":5,"method":"bdev_virtio_detach_controller","params":{"name":"A"}}),
        );
        assert_eq!(v["error"]["code"], -19);
        assert!(handle_request(&r, &json!({"jsonrpc":"2.0","method":"save_config"})).is_none());
    }

    #[test]
    fn hotplug_shows_in_saved_config() {
        let r = reg();
        let v = call(
            &r,
            json!({"jsonrpc":"2.0","id":1,"method":"bdev_virtio_blk_set_hotplug","params":{"enable":true,"period_us":5000}}),
        );
        assert_eq!(v["result"], true);
        let v = call(
            &r,
            json!({"jsonrpc":"2.0","id":1,"method":"framework_get_config","params":{"name":"bdev"}}),
        );
        assert_eq!(
            v["result"],
            json!([{"method":"bdev_virtio_blk_set_hotplug","params":{"enable":true,"period_us":5000}}])
        );
        let v = call(
            &r,
            json!({"jsonrpc":"2.0","id":1,"method":"rpc_get_methods"}),
        );
        assert_eq!(v["result"].as_array().unwrap().len(), METHODS.len());
    }
}
