//! The bdev and framework methods of `vireo serve`: attach and detach controllers,
//! list bdevs and their I/O statistics, hot-plug, and the configuration in SPDK's
//! shape.

use std::sync::Arc;

use serde_json::{json, Map, Value};
use vireo_bdev::{AttachParams, Bdev, ConfigCall, Registry};

use super::{no_such_bdev, opt_str, params_obj, req_str, Methods, RpcError, RpcResult};

/// Register the methods on `reg` in `m`.
pub fn register(m: &mut Methods, reg: Arc<Registry>) {
    let add = |m: &mut Methods, name: &'static str, f: fn(&Registry, &str, &Value) -> RpcResult| {
        let reg = reg.clone();
        m.add(name, move |method, params| f(&reg, method, params));
    };
    add(
        m,
        "bdev_virtio_attach_controller",
        bdev_virtio_attach_controller,
    );
    add(
        m,
        "bdev_virtio_detach_controller",
        bdev_virtio_detach_controller,
    );
    add(
        m,
        "bdev_virtio_scsi_get_devices",
        bdev_virtio_scsi_get_devices,
    );
    add(
        m,
        "bdev_virtio_blk_set_hotplug",
        bdev_virtio_blk_set_hotplug,
    );
    add(m, "bdev_get_bdevs", bdev_get_bdevs);
    add(m, "bdev_get_iostat", bdev_get_iostat);
    add(m, "framework_get_config", framework_get_config);
    add(m, "framework_get_subsystems", framework_get_subsystems);
    add(m, "save_config", save_config);
}

fn bdev_virtio_attach_controller(reg: &Registry, _method: &str, params: &Value) -> RpcResult {
    let empty = Value::Object(Map::new());
    let p = if params.is_null() { &empty } else { params };
    let a = crate::config::attach_from_json(p).map_err(|e| RpcError::params(e.to_string()))?;
    let bdevs = reg.attach(&a)?;
    Ok(json!(bdevs.iter().map(|b| b.name()).collect::<Vec<_>>()))
}

fn bdev_virtio_detach_controller(reg: &Registry, method: &str, params: &Value) -> RpcResult {
    let p = params_obj(method, params, &["name"])?;
    let name = req_str(method, &p, "name")?;
    reg.detach(&name)?;
    Ok(Value::Bool(true))
}

fn bdev_virtio_scsi_get_devices(reg: &Registry, method: &str, params: &Value) -> RpcResult {
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
                // LUNs found after attach whose bdev name another controller has.
                let left = reg
                    .with_controller(&a.name, |c| c.luns_not_added())
                    .unwrap_or_default();
                if !left.is_empty() {
                    d["luns_not_added"] = left
                        .iter()
                        .map(|n| {
                            json!({"target": n.target, "lun": n.lun, "bdev": n.bdev, "reason": n.reason})
                        })
                        .collect();
                }
                d
            })
            .collect(),
    ))
}

fn bdev_virtio_blk_set_hotplug(reg: &Registry, method: &str, params: &Value) -> RpcResult {
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

fn bdev_get_bdevs(reg: &Registry, method: &str, params: &Value) -> RpcResult {
    let p = params_obj(method, params, &["name", "timeout"])?;
    let bdevs = select(reg, opt_str(method, &p, "name")?)?;
    Ok(Value::Array(
        bdevs.iter().map(|b| bdev_json(reg, b)).collect(),
    ))
}

fn bdev_get_iostat(reg: &Registry, method: &str, params: &Value) -> RpcResult {
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

fn framework_get_config(reg: &Registry, method: &str, params: &Value) -> RpcResult {
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

/// SPDK's `rpc.py save_config` builds the document from these two calls.
fn framework_get_subsystems(_reg: &Registry, method: &str, params: &Value) -> RpcResult {
    params_obj(method, params, &[])?;
    Ok(json!([{"subsystem": "bdev", "depends_on": []}]))
}

fn save_config(reg: &Registry, method: &str, params: &Value) -> RpcResult {
    params_obj(method, params, &[])?;
    Ok(crate::config::save_config(reg))
}

fn select(reg: &Registry, name: Option<String>) -> std::result::Result<Vec<Arc<Bdev>>, RpcError> {
    match name {
        None => Ok(reg.bdevs()),
        Some(n) => reg
            .bdev(&n)
            .map(|b| vec![b])
            .ok_or_else(|| no_such_bdev(&n)),
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
    let (vq_count, vq_size, packed) = reg
        .with_controller(&a.name, |c| {
            c.bdevs()
                .first()
                .map(|b| {
                    let i = b.info();
                    (i.num_queues, i.queue_size, Some(i.packed_ring))
                })
                .unwrap_or((a.vq_count, a.vq_size, None))
        })
        .unwrap_or((a.vq_count, a.vq_size, None));
    let mut v = json!({"vq_count": vq_count, "vq_size": vq_size});
    // Whether the queues are packed rings (not in SPDK's object, which has split
    // rings only); absent before the controller has a bdev.
    if let Some(p) = packed {
        v["packed_ring"] = p.into();
    }
    match a.trtype {
        vireo_bdev::TrType::User => {
            v["type"] = "user".into();
            v["socket"] = a.traddr.clone().into();
        }
        vireo_bdev::TrType::Pci => {
            v["type"] = "pci".into();
            v["pci_address"] = a.traddr.clone().into();
        }
        t @ (vireo_bdev::TrType::Vdpa | vireo_bdev::TrType::VhostKernel) => {
            v["type"] = t.as_str().into();
            v["path"] = a.traddr.clone().into();
            if let Some(w) = &a.wwpn {
                v["wwpn"] = w.clone().into();
            }
        }
        vireo_bdev::TrType::VfioUser => {
            v["type"] = "vfio-user".into();
            v["socket"] = a.traddr.clone().into();
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
        None => {
            json!({"vq_count": i.num_queues, "vq_size": i.queue_size, "packed_ring": i.packed_ring})
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rpc::{handle_request, INVALID_PARAMS, INVALID_REQUEST, METHOD_NOT_FOUND};

    /// The server's own methods and these.
    fn reg() -> Methods {
        let mut m = Methods::new();
        let reg = Registry::new(vireo_virtio::DmaMemory::new(Default::default()).unwrap());
        register(&mut m, Arc::new(reg));
        m
    }

    fn call(r: &Methods, req: Value) -> Value {
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
        assert_eq!(
            v["id"], 3,
            "an invalid request with a readable id gets it back"
        );
        let v = call(&r, json!({"jsonrpc":"2.0","id":7,"method":"x","foo":1}));
        assert_eq!(
            (v["error"]["code"].clone(), v["id"].clone()),
            (json!(INVALID_REQUEST), json!(7))
        );
        let v = call(&r, json!({"jsonrpc":"2.0","id":[1],"method":"x"}));
        assert_eq!(
            v["id"],
            Value::Null,
            "an id of the wrong type is not echoed"
        );
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

    /// A batch past MAX_BATCH gets one error, not a reply per element (a 1 MiB batch
    /// of zeros made about 800 MB of replies).
    #[test]
    fn a_huge_batch_gets_one_small_error() {
        let r = reg();
        let batch = format!("[{}0]\n", "0,".repeat(200_000));
        let mut out = Vec::new();
        crate::rpc::serve_stream(&r, batch.as_bytes(), &mut out);
        assert!(out.len() < 4096, "{} bytes of replies", out.len());
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["error"]["code"], INVALID_REQUEST);
        assert!(v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("at most 128"));
        // A batch within the limit is answered element by element.
        let mut out = Vec::new();
        crate::rpc::serve_stream(&r, b"[0,0]\n".as_slice(), &mut out);
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v.as_array().map(Vec::len), Some(2));
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
        assert_eq!(
            v["result"],
            json!([
                "bdev_get_bdevs",
                "bdev_get_iostat",
                "bdev_virtio_attach_controller",
                "bdev_virtio_blk_set_hotplug",
                "bdev_virtio_detach_controller",
                "bdev_virtio_scsi_get_devices",
                "framework_get_config",
                "framework_get_subsystems",
                "rpc_get_methods",
                "save_config",
                "spdk_get_version"
            ])
        );
    }
}
