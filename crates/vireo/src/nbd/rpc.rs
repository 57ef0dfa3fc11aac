//! SPDK's NBD RPCs, adapted: `nbd_device` is an export name, not /dev/nbdX. Without
//! an NBD listener (`vireo serve` without `--nbd`) the methods are still there:
//! nbd_get_disks lists nothing, the others say how to start one.

use std::sync::Arc;

use serde_json::{json, Value};

use super::{ExportError, NbdServer};
use crate::rpc::{
    no_such_bdev, opt_str, params_obj, req_str, Methods, RpcError, RpcResult, EEXIST, ENODEV,
    INTERNAL_ERROR,
};

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
    server.ok_or_else(|| export_error(ExportError::NotListening))
}

/// The code of each kind: an unknown bdev or export -ENODEV (the answer of every
/// method to an unknown bdev), a name in use -EEXIST, a bad name invalid params.
fn export_error(e: ExportError) -> RpcError {
    match e {
        ExportError::NoSuchBdev(b) => no_such_bdev(&b),
        ExportError::NoSuchExport(_) => RpcError::new(ENODEV, e.to_string()),
        ExportError::ExportTaken { .. } => RpcError::new(EEXIST, e.to_string()),
        ExportError::BadExportName(_) => RpcError::params(e.to_string()),
        ExportError::NotListening => RpcError::new(INTERNAL_ERROR, e.to_string()),
    }
}

fn start_disk(server: Option<&NbdServer>, method: &str, params: &Value) -> RpcResult {
    let p = params_obj(method, params, &["bdev_name", "nbd_device"])?;
    let bdev = req_str(method, &p, "bdev_name")?;
    let export = opt_str(method, &p, "nbd_device")?;
    listening(server)?
        .start_disk(&bdev, export.as_deref())
        .map(Value::String)
        .map_err(export_error)
}

fn stop_disk(server: Option<&NbdServer>, method: &str, params: &Value) -> RpcResult {
    let p = params_obj(method, params, &["nbd_device"])?;
    let export = req_str(method, &p, "nbd_device")?;
    listening(server)?
        .stop_disk(&export)
        .map(|_| Value::Bool(true))
        .map_err(export_error)
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

    /// An unknown bdev or export is -ENODEV (-19), like every other "no such bdev"; a
    /// bad export name is invalid params.
    #[test]
    fn unknown_bdevs_and_exports_answer_enodev() {
        let reg = Arc::new(vireo_bdev::Registry::new(
            vireo_virtio::DmaMemory::new(Default::default()).unwrap(),
        ));
        let mut m = Methods::new();
        register(&mut m, Some(NbdServer::new(reg, true, true)));
        let e = m
            .call("nbd_start_disk", &json!({"bdev_name": "nope"}))
            .unwrap_err();
        assert_eq!(e.code, ENODEV, "{e:?}");
        assert!(e.to_json().to_string().contains("nope"), "{e:?}");
        let e = m
            .call("nbd_stop_disk", &json!({"nbd_device": "nope"}))
            .unwrap_err();
        assert_eq!(e.code, ENODEV, "{e:?}");
        let e = m
            .call(
                "nbd_start_disk",
                &json!({"bdev_name": "nope", "nbd_device": ""}),
            )
            .unwrap_err();
        assert_eq!(e.code, INVALID_PARAMS, "{e:?}");
    }
}
