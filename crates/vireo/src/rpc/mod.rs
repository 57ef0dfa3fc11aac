//! The JSON-RPC 2.0 server core of `vireo serve` (SPDK-compatible, on a unix socket)
//! and the `vireo rpc` client ([`client`]).
//!
//! A request is one JSON object; requests may be newline-delimited or sent back to
//! back. Each response is one JSON object followed by a newline. A client that sends
//! bytes that are not JSON gets a parse error (-32700) and its connection is closed;
//! the server carries on.
//!
//! This module owns the framing, the limits and the dispatch through a [`Methods`]
//! table; it knows no method beyond `rpc_get_methods` and `spdk_get_version`. Each
//! subsystem registers its own handlers, as SPDK's do: [`bdev`] the bdev and
//! framework methods, `nbd::rpc` the NBD ones; `serve` builds the table.

pub mod bdev;
pub mod client;

use std::collections::BTreeMap;
use std::io::{BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Map, Value};
use vireo_bdev::{BdevError, ErrorKind};

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
/// -EBUSY: in use (a controller with open I/O channels).
pub const EBUSY: i64 = -(libc::EBUSY as i64);

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
    /// An error with `code` and `message`.
    pub fn new(code: i64, message: impl Into<String>) -> RpcError {
        RpcError {
            code,
            message: message.into(),
            data: None,
        }
    }

    /// Bad params (-32602).
    pub fn params(message: impl Into<String>) -> RpcError {
        RpcError::new(INVALID_PARAMS, message)
    }

    /// The error object of a response.
    pub fn to_json(&self) -> Value {
        let mut e = json!({"code": self.code, "message": self.message});
        if let Some(d) = &self.data {
            e["data"] = d.clone();
        }
        e
    }
}

impl From<BdevError> for RpcError {
    fn from(e: BdevError) -> RpcError {
        let code = match (&e, e.kind()) {
            (BdevError::Config(_), _) => INVALID_PARAMS,
            (_, ErrorKind::NotFound) => ENODEV,
            (_, ErrorKind::AlreadyExists) => EEXIST,
            (_, ErrorKind::Busy) => EBUSY,
            _ => INTERNAL_ERROR,
        };
        RpcError::new(code, e.to_string())
    }
}

/// -ENODEV with SPDK's message, for a bdev that does not exist: every method's answer
/// to an unknown bdev.
pub fn no_such_bdev(name: &str) -> RpcError {
    RpcError {
        code: ENODEV,
        message: "No such device".into(),
        data: Some(Value::String(format!("no bdev named {name}"))),
    }
}

/// What a method answers: its result, or an error object.
pub type RpcResult = std::result::Result<Value, RpcError>;

/// The `params` of `method` as an object (absent or null: empty), refusing keys not in
/// `allowed`.
pub fn params_obj<'a>(
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

/// The optional string `key` of `p`.
pub fn opt_str(
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

/// The string `key` of `p`, which must be there.
pub fn req_str(
    method: &str,
    p: &Map<String, Value>,
    key: &str,
) -> std::result::Result<String, RpcError> {
    opt_str(method, p, key)?
        .ok_or_else(|| RpcError::params(format!("{method}: \"{key}\" is required")))
}

/// A method's handler: called with the method's name and its params (`null` when the
/// request has none).
pub type Handler = Box<dyn Fn(&str, &Value) -> RpcResult + Send + Sync>;

/// The method every server answers itself: the names in the table.
const GET_METHODS: &str = "rpc_get_methods";

/// The methods a server answers, by name.
pub struct Methods {
    table: BTreeMap<&'static str, Handler>,
}

impl Default for Methods {
    fn default() -> Self {
        Methods::new()
    }
}

impl Methods {
    /// A table with the server's own methods: `rpc_get_methods` and
    /// `spdk_get_version`.
    pub fn new() -> Methods {
        let mut m = Methods {
            table: BTreeMap::new(),
        };
        // SPDK's tools ask this first; the shape is SPDK's, the version vireo's.
        m.add("spdk_get_version", |method, params| {
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
        });
        m
    }

    /// Answer `name` with `handler` (a later registration of the same name replaces
    /// the earlier one).
    pub fn add(
        &mut self,
        name: &'static str,
        handler: impl Fn(&str, &Value) -> RpcResult + Send + Sync + 'static,
    ) {
        self.table.insert(name, Box::new(handler));
    }

    /// Every method name, sorted, as `rpc_get_methods` lists them.
    pub fn names(&self) -> Vec<&'static str> {
        let mut v: Vec<&'static str> = self.table.keys().copied().collect();
        v.push(GET_METHODS);
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Answer one call.
    pub fn call(&self, method: &str, params: &Value) -> RpcResult {
        if method == GET_METHODS {
            params_obj(method, params, &["current", "include_aliases"])?;
            return Ok(json!(self.names()));
        }
        match self.table.get(method) {
            Some(h) => h(method, params),
            None => Err(RpcError::new(
                METHOD_NOT_FOUND,
                format!("Method not found: {method}"),
            )),
        }
    }
}

/// The response to one request object, or None for a notification (no `id`).
pub fn handle_request(methods: &Methods, req: &Value) -> Option<Value> {
    let reply = |id: &Value, r: RpcResult| match r {
        Ok(v) => json!({"jsonrpc": "2.0", "id": id, "result": v}),
        Err(e) => json!({"jsonrpc": "2.0", "id": id, "error": e.to_json()}),
    };
    // An invalid request is answered with its id when the id itself is readable, so a
    // client with several requests out can tell which one failed.
    let readable_id = req
        .get("id")
        .filter(|v| matches!(v, Value::Null | Value::String(_) | Value::Number(_)))
        .cloned()
        .unwrap_or(Value::Null);
    let invalid = |msg: &str| {
        Some(reply(
            &readable_id,
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
        methods.call(method, params)
    };
    if let Err(e) = &r {
        tracing::info!(method, code = e.code, "rpc error: {}", e.message);
    }
    id.map(|id| reply(&id, r))
}

/// Largest request (or batch) a client may send.
pub const MAX_REQUEST_BYTES: u64 = 1 << 20;
/// Requests in one batch.
pub const MAX_BATCH: usize = 128;
/// Clients served at once; more are turned away.
pub const MAX_CLIENTS: usize = 64;
/// A client that sends nothing for this long is dropped.
pub const CLIENT_IDLE: Duration = Duration::from_secs(60);

/// Counts the bytes of the request being read; refuses to read past the limit.
struct Limited<R> {
    inner: R,
    used: std::rc::Rc<std::cell::Cell<u64>>,
    /// When the request being read began: it must be whole within [`CLIENT_IDLE`] (a
    /// client that sends a byte now and then cannot hold a client slot for ever).
    began: Option<std::time::Instant>,
}

impl<R: std::io::Read> std::io::Read for Limited<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let used = self.used.get();
        if used >= MAX_REQUEST_BYTES {
            return Err(std::io::Error::other("request too large"));
        }
        if used == 0 {
            self.began = None;
        }
        if self.began.is_some_and(|t| t.elapsed() > CLIENT_IDLE) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "request not whole in time",
            ));
        }
        let room = (MAX_REQUEST_BYTES - used).min(buf.len() as u64) as usize;
        let n = self.inner.read(&mut buf[..room])?;
        if n > 0 && self.began.is_none() {
            self.began = Some(std::time::Instant::now());
        }
        self.used.set(used + n as u64);
        Ok(n)
    }
}

/// Serve one client until it hangs up, sends something that is not JSON, sends a
/// request over [`MAX_REQUEST_BYTES`], or stays silent or leaves a reply unread for
/// [`CLIENT_IDLE`].
fn serve_client(methods: &Methods, stream: UnixStream) {
    let mut out = match stream.try_clone() {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("rpc: cannot clone the client socket: {e}");
            return;
        }
    };
    let _ = stream.set_read_timeout(Some(CLIENT_IDLE));
    // A client that stops reading its replies is dropped too, instead of holding a
    // client slot for ever.
    let _ = out.set_write_timeout(Some(CLIENT_IDLE));
    serve_stream(methods, stream, &mut out);
}

/// The framing of one client connection: answer the requests read from `input` on
/// `out`, one response (object, or array for a batch) and a newline each, until
/// `input` ends or fails, a request is not JSON (a parse error is sent, then no more),
/// a request is over [`MAX_REQUEST_BYTES`] (an invalid-request error, then no more), or
/// a write fails. Notifications get nothing. What [`serve`] runs for each client; the
/// RPC fuzz target (`fuzz/fuzz_targets/rpc_request.rs`) runs it on arbitrary bytes.
pub fn serve_stream(methods: &Methods, input: impl std::io::Read, out: &mut impl Write) {
    let used = std::rc::Rc::new(std::cell::Cell::new(0u64));
    let reader = BufReader::new(Limited {
        inner: input,
        used: used.clone(),
        began: None,
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
            Ok(Value::Array(batch)) if batch.len() > MAX_BATCH => {
                // Each element could make a reply far larger than itself.
                Some(json!({"jsonrpc": "2.0", "id": null,
                    "error": RpcError::new(INVALID_REQUEST, format!(
                        "Invalid request: a batch of {} requests (at most {MAX_BATCH})",
                        batch.len())).to_json()}))
            }
            Ok(Value::Array(batch)) if !batch.is_empty() => {
                let r: Vec<Value> = batch
                    .iter()
                    .filter_map(|req| handle_request(methods, req))
                    .collect();
                (!r.is_empty()).then_some(Value::Array(r))
            }
            Ok(v @ Value::Array(_)) => handle_request(methods, &v),
            Ok(v) => handle_request(methods, &v),
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

/// Serve JSON-RPC on `listener` (non-blocking) until `stop()` says so: a thread per
/// client, at most [`MAX_CLIENTS`] at once.
pub fn serve(listener: &UnixListener, methods: Arc<Methods>, stop: fn() -> bool) {
    let clients = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    while !stop() {
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
                    // Never blocks the accept loop on a client that does not read.
                    let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
                    let _ = stream.write_all(format!("{msg}\n").as_bytes());
                    continue;
                }
                clients.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
                let methods = methods.clone();
                let count = clients.clone();
                let spawned = std::thread::Builder::new()
                    .name("vireo-rpc-client".into())
                    .spawn(move || {
                        serve_client(&methods, stream);
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
}
