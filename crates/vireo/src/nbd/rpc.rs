//! SPDK's NBD RPCs, adapted: `nbd_device` is an export name, not /dev/nbdX. Without
//! an NBD listener (`vireo serve` without `--nbd`) the methods are still there:
//! nbd_get_disks lists nothing, the others say how to start one.

use std::sync::Arc;

use serde_json::{json, Value};

use super::NbdServer;
use crate::rpc::{opt_str, params_obj, req_str, Methods, RpcError, RpcResult, INTERNAL_ERROR};

/// Register nbd_start_disk, nbd_stop_disk and nbd_get_disks for `server`.
pub fn register(m: &mut Methods, server: Option<Arc<NbdServer>>) {
    let s = server.clone();
    m.add("nbd_start_disk", move |method, params| {
        start_disk(s.as_deref(), method, params)
    });
    let s = server.clone();
    m.add("nbd_stop_disk", move |method, params| {
        stop_disk(s.as_deref(), method, params)
    });
    m.add("nbd_get_disks", move |method, params| {
        get_disks(server.as_deref(), method, params)
    });
}

fn listening(server: Option<&NbdServer>) -> Result<&NbdServer, RpcError> {
    server.ok_or_else(|| {
        RpcError::new(
            INTERNAL_ERROR,
            "no NBD listener: start vireo serve with --nbd unix:PATH or --nbd tcp:HOST:PORT",
        )
    })
}

fn start_disk(server: Option<&NbdServer>, method: &str, params: &Value) -> RpcResult {
    let p = params_obj(method, params, &["bdev_name", "nbd_device"])?;
    let bdev = req_str(method, &p, "bdev_name")?;
    let export = opt_str(method, &p, "nbd_device")?;
    listening(server)?
        .start_disk(&bdev, export.as_deref())
        .map(Value::String)
        .map_err(|e| RpcError::new(INTERNAL_ERROR, format!("{e:#}")))
}

fn stop_disk(server: Option<&NbdServer>, method: &str, params: &Value) -> RpcResult {
    let p = params_obj(method, params, &["nbd_device"])?;
    let export = req_str(method, &p, "nbd_device")?;
    listening(server)?
        .stop_disk(&export)
        .map(|_| Value::Bool(true))
        .map_err(|e| RpcError::new(INTERNAL_ERROR, format!("{e:#}")))
}

fn get_disks(server: Option<&NbdServer>, method: &str, params: &Value) -> RpcResult {
    let p = params_obj(method, params, &["nbd_device"])?;
    let only = opt_str(method, &p, "nbd_device")?;
    let exports = server.map(|n| n.exports()).unwrap_or_default();
    Ok(Value::Array(
        exports
            .into_iter()
            .filter(|(e, _)| only.as_ref().is_none_or(|o| o == e))
            .map(|(e, b)| json!({"nbd_device": e, "bdev_name": b}))
            .collect(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rpc::INVALID_PARAMS;

    #[test]
    fn without_a_listener_the_methods_say_how_to_start_one() {
        let mut m = Methods::new();
        register(&mut m, None);
        assert_eq!(m.call("nbd_get_disks", &Value::Null), Ok(json!([])));
        let e = m
            .call("nbd_start_disk", &json!({"bdev_name": "X"}))
            .unwrap_err();
        assert_eq!(e.code, INTERNAL_ERROR);
        assert!(e.message.contains("--nbd unix:PATH"), "{}", e.message);
        let e = m.call("nbd_stop_disk", &json!({})).unwrap_err();
        assert_eq!(e.code, INVALID_PARAMS);
    }
}
