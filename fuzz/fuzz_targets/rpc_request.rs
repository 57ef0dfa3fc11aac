//! `vireo serve`'s JSON-RPC request handling, in-process: the input is what a client
//! sends on one connection, run through `rpc::serve_stream` (framing, parse errors,
//! batches, dispatch) to every method `vireo serve` answers (the bdev, framework and NBD
//! ones), on a registry with no device and an NBD server with no listener. An attach
//! only ever connects to a path inside an empty directory (an absolute path, `..`, or a
//! PCI address is answered without touching the machine).
//!
//! Oracle: no panic; what is written is UTF-8 lines of one JSON value each, matching
//! the requests in order (read with the same JSON stream reader):
//! - a request object that is valid (only `jsonrpc` "2.0", a string `method`, `params`
//!   and an `id` that is a string, a number or null) gets exactly one response with its
//!   id, unless it has no `id` (a notification: nothing); its error code is
//!   METHOD_NOT_FOUND exactly when the method is not in `rpc_get_methods`, otherwise
//!   INVALID_PARAMS, INTERNAL_ERROR or a negative errno;
//! - anything else (not an object, unknown members, no method, a bad id, an empty
//!   batch) gets INVALID_REQUEST with a null id;
//! - a non-empty batch gets one array of the responses of its members that get one,
//!   in order, or nothing when none does;
//! - input that is not JSON (or ends mid-value) gets PARSE_ERROR with a null id, and
//!   nothing after it.
//!
//! Every response is well-formed JSON-RPC 2.0: `jsonrpc` "2.0", `id`, and exactly one
//! of `result` and `error` (an object with an integer `code` and a string `message`).
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use serde_json::{json, Value};
use vireo::nbd::NbdServer;
use vireo::rpc::{
    self, Methods, RpcError, INTERNAL_ERROR, INVALID_PARAMS, INVALID_REQUEST, METHOD_NOT_FOUND,
    PARSE_ERROR,
};
use vireo_bdev::{Registry, TrType};
use vireo_virtio::{DmaConfig, DmaMemory};

/// The method table of `vireo serve` (as serve.rs builds it), and an empty directory
/// for the attaches' sockets.
fn methods() -> &'static (Methods, Vec<&'static str>) {
    static M: OnceLock<(Methods, Vec<&'static str>)> = OnceLock::new();
    M.get_or_init(|| {
        let dir: &'static std::path::Path = Box::leak(
            std::env::temp_dir()
                .join(format!("vireo-fuzz-rpc-{}", std::process::id()))
                .into_boxed_path(),
        );
        std::fs::create_dir_all(dir).expect("temp dir");
        let mem = DmaMemory::new(DmaConfig {
            initial_region_size: 2 << 20,
            ..DmaConfig::default()
        })
        .expect("DMA memory");
        let reg = Arc::new(Registry::new(mem));
        let nbd = NbdServer::new(reg.clone(), true, true);
        let table = |reg: &Arc<Registry>, nbd: &Arc<NbdServer>| {
            let mut m = Methods::new();
            rpc::bdev::register(&mut m, reg.clone());
            vireo::nbd::rpc::register(&mut m, Some(nbd.clone()));
            m
        };
        let real = table(&reg, &nbd);
        let mut m = table(&reg, &nbd);
        // The attach, fenced: the params are checked as the real method does; a
        // vhost-user socket path is looked up inside the empty directory only.
        m.add("bdev_virtio_attach_controller", move |method, params| {
            let empty = json!({});
            let p = if params.is_null() { &empty } else { params };
            let a =
                vireo::config::attach_from_json(p).map_err(|e| RpcError::params(e.to_string()))?;
            if a.trtype != TrType::User || a.traddr.starts_with('/') || a.traddr.contains("..") {
                return Err(RpcError::new(INTERNAL_ERROR, "fuzz: not attached"));
            }
            let mut p = p.clone();
            p["traddr"] = dir.join(&a.traddr).display().to_string().into();
            real.call(method, &p)
        });
        let names = m.names();
        (m, names)
    })
}

/// Whether `req` is a valid request object: Some(id) (None: a notification).
fn valid(req: &Value) -> Option<Option<&Value>> {
    let obj = req.as_object()?;
    if !obj
        .keys()
        .all(|k| ["jsonrpc", "method", "params", "id"].contains(&k.as_str()))
    {
        return None;
    }
    if obj.get("jsonrpc") != Some(&json!("2.0")) || !obj.get("method")?.is_string() {
        return None;
    }
    match obj.get("id") {
        None => Some(None),
        Some(v @ (Value::Null | Value::String(_) | Value::Number(_))) => Some(Some(v)),
        Some(_) => None,
    }
}

/// Whether the response's `got` is the request's `sent` id. Known (reported): an id
/// that is a number but not a 64-bit integer is carried as an f64, and the server's
/// stream reader (serde_json without `float_roundtrip`) may round it 1 ULP away from
/// the correctly rounded value (`"id":` 140 ones comes back as 1.1111111111111112e139,
/// not 1.1111111111111111e139): such ids are compared within 2 ULP.
fn same_id(sent: &Value, got: &Value) -> bool {
    if sent == got {
        return true;
    }
    match (sent, got.as_f64()) {
        (Value::Number(n), Some(b)) if n.is_f64() => {
            let a = n.as_f64().unwrap_or(f64::NAN);
            (a - b).abs() <= a.abs() * 4.5e-16
        }
        _ => false,
    }
}

/// Whether `req` (a single request or a member of a batch) gets a response: everything
/// but a valid notification.
fn answers(req: &Value) -> bool {
    !matches!(valid(req), Some(None))
}

/// Check that `resp` is a well-formed response to `req`.
fn check_response(req: &Value, resp: &Value, names: &[&str]) {
    let r = resp
        .as_object()
        .unwrap_or_else(|| panic!("response {resp} is not an object"));
    assert_eq!(r.get("jsonrpc"), Some(&json!("2.0")), "{resp}");
    for k in r.keys() {
        assert!(
            ["jsonrpc", "id", "result", "error"].contains(&k.as_str()),
            "member {k} in {resp}"
        );
    }
    let id = r.get("id").unwrap_or_else(|| panic!("no id in {resp}"));
    let code = match (r.get("result"), r.get("error")) {
        (Some(_), None) => None,
        (None, Some(e)) => {
            let e = e.as_object().unwrap_or_else(|| panic!("error of {resp}"));
            assert!(e["message"].is_string(), "{resp}");
            for k in e.keys() {
                assert!(["code", "message", "data"].contains(&k.as_str()), "{resp}");
            }
            Some(
                e["code"]
                    .as_i64()
                    .unwrap_or_else(|| panic!("code of {resp}")),
            )
        }
        _ => panic!("not exactly one of result and error: {resp}"),
    };
    match valid(req) {
        Some(Some(want)) => {
            assert!(same_id(want, id), "the id of {req} in {resp}");
            let method = req["method"].as_str().unwrap();
            if let Some(c) = code {
                assert_eq!(
                    c == METHOD_NOT_FOUND,
                    !names.contains(&method),
                    "method {method:?}: {resp}"
                );
                assert!(
                    c == METHOD_NOT_FOUND
                        || c == INVALID_PARAMS
                        || c == INTERNAL_ERROR
                        || (-200..0).contains(&c),
                    "undefined error code in {resp} to {req}"
                );
            }
        }
        Some(None) => panic!("a notification {req} got {resp}"),
        None => {
            assert_eq!(id, &Value::Null, "{resp} to the invalid request {req}");
            assert_eq!(code, Some(INVALID_REQUEST), "{resp} to {req}");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let (m, names) = methods();
    let mut out = Vec::new();
    rpc::serve_stream(m, data, &mut out);
    let text = std::str::from_utf8(&out).expect("responses are UTF-8");
    assert!(text.is_empty() || text.ends_with('\n'), "{text:?}");
    let mut lines = text.lines().map(|l| {
        serde_json::from_str::<Value>(l)
            .unwrap_or_else(|e| panic!("a response line is not one JSON value ({e}): {l}"))
    });
    for item in serde_json::Deserializer::from_slice(data).into_iter::<Value>() {
        match item {
            Ok(Value::Array(batch)) if !batch.is_empty() => {
                let answered: Vec<&Value> = batch.iter().filter(|r| answers(r)).collect();
                if answered.is_empty() {
                    continue;
                }
                let resp = lines.next().expect("no response to a batch");
                let resp = resp
                    .as_array()
                    .unwrap_or_else(|| panic!("batch answered by {resp}"));
                assert_eq!(resp.len(), answered.len(), "{resp:?} to {batch:?}");
                for (q, r) in answered.iter().zip(resp) {
                    check_response(q, r, names);
                }
            }
            Ok(req) => {
                if answers(&req) {
                    let resp = lines
                        .next()
                        .unwrap_or_else(|| panic!("no response to {req}"));
                    check_response(&req, &resp, names);
                }
            }
            Err(_) => {
                let resp = lines.next().expect("no parse error");
                assert_eq!(resp["error"]["code"], PARSE_ERROR, "{resp}");
                assert_eq!(resp["id"], Value::Null, "{resp}");
                break;
            }
        }
    }
    if let Some(extra) = lines.next() {
        panic!("a response to nothing: {extra}");
    }
});
