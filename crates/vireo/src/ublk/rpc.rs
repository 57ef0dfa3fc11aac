//! SPDK's ublk RPCs: `ublk_create_target` (`cpumask`, `disable_user_copy`),
//! `ublk_destroy_target`, `ublk_start_disk` (`bdev_name`, `ublk_id`, `num_queues`,
//! `queue_depth`), `ublk_recover_disk` (`bdev_name`, `ublk_id`), `ublk_stop_disk`
//! (`ublk_id`), `ublk_get_disks` (`ublk_id`), with SPDK's answers; and `save_config`,
//! `framework_get_config` and `framework_get_subsystems` with the "ublk" subsystem.

use std::sync::Arc;

use serde_json::{json, Map, Value};
use vireo_bdev::Registry;

use super::{UblkError, UblkServer, DEFAULT_NUM_QUEUES, DEFAULT_QUEUE_DEPTH};
use crate::rpc::{no_such_bdev, opt_str, params_obj, req_str, Methods, RpcError};

fn err(e: UblkError) -> RpcError {
    match e {
        UblkError::NoSuchBdev(b) => no_such_bdev(&b),
        UblkError::Invalid(m) => RpcError::params(m),
        e => RpcError::new(e.errno() as i64, e.to_string()),
    }
}

fn opt_u32(method: &str, p: &Map<String, Value>, key: &str) -> Result<Option<u32>, RpcError> {
    match p.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| {
                RpcError::params(format!(
                    "{method}: \"{key}\" must be a whole number below 2^32, got {v}"
                ))
            }),
    }
}

fn req_u32(method: &str, p: &Map<String, Value>, key: &str) -> Result<u32, RpcError> {
    opt_u32(method, p, key)?
        .ok_or_else(|| RpcError::params(format!("{method}: \"{key}\" is required")))
}

fn opt_u16(method: &str, p: &Map<String, Value>, key: &str) -> Result<Option<u16>, RpcError> {
    opt_u32(method, p, key)?
        .map(|n| {
            u16::try_from(n).map_err(|_| {
                RpcError::params(format!("{method}: \"{key}\" must be below 65536, got {n}"))
            })
        })
        .transpose()
}

/// Register the ublk methods, and the config methods with the ublk subsystem in them.
pub fn register(m: &mut Methods, reg: Arc<Registry>, server: Arc<UblkServer>) {
    let s = server.clone();
    m.add("ublk_create_target", move |method, params| {
        let p = params_obj(method, params, &["cpumask", "disable_user_copy"])?;
        let cpumask = opt_str(method, &p, "cpumask")?;
        match p.get("disable_user_copy") {
            None | Some(Value::Null) | Some(Value::Bool(_)) => {}
            Some(v) => {
                return Err(RpcError::params(format!(
                    "{method}: \"disable_user_copy\" must be true or false, got {v}"
                )))
            }
        }
        s.create_target(cpumask).map_err(err)?;
        Ok(Value::Bool(true))
    });
    let s = server.clone();
    m.add("ublk_destroy_target", move |method, params| {
        params_obj(method, params, &[])?;
        s.destroy_target().map_err(err)?;
        Ok(Value::Bool(true))
    });
    let s = server.clone();
    m.add("ublk_start_disk", move |method, params| {
        let p = params_obj(
            method,
            params,
            &["bdev_name", "ublk_id", "num_queues", "queue_depth"],
        )?;
        let bdev = req_str(method, &p, "bdev_name")?;
        let id = req_u32(method, &p, "ublk_id")?;
        let nq = opt_u16(method, &p, "num_queues")?.unwrap_or(DEFAULT_NUM_QUEUES);
        let qd = opt_u16(method, &p, "queue_depth")?.unwrap_or(DEFAULT_QUEUE_DEPTH);
        let t = s.target().map_err(err)?;
        t.start_disk(&bdev, id, nq, qd)
            .map(Value::from)
            .map_err(err)
    });
    let s = server.clone();
    m.add("ublk_recover_disk", move |method, params| {
        let p = params_obj(method, params, &["bdev_name", "ublk_id"])?;
        let bdev = req_str(method, &p, "bdev_name")?;
        let id = req_u32(method, &p, "ublk_id")?;
        let t = s.target().map_err(err)?;
        t.recover_disk(&bdev, id).map(Value::from).map_err(err)
    });
    let s = server.clone();
    m.add("ublk_stop_disk", move |method, params| {
        let p = params_obj(method, params, &["ublk_id"])?;
        let id = req_u32(method, &p, "ublk_id")?;
        let t = s.target().map_err(err)?;
        t.stop_disk(id).map_err(err)?;
        Ok(Value::Bool(true))
    });
    let s = server.clone();
    m.add("ublk_get_disks", move |method, params| {
        let p = params_obj(method, params, &["ublk_id"])?;
        // As SPDK: 0 or none lists every device.
        let only = opt_u32(method, &p, "ublk_id")?.filter(|&id| id != 0);
        let disks = s.target_opt().map(|t| t.list()).unwrap_or_default();
        if let Some(id) = only {
            if !disks.iter().any(|d| d.id == id) {
                return Err(err(UblkError::NoSuchDisk(id)));
            }
        }
        Ok(Value::Array(
            disks
                .into_iter()
                .filter(|d| only.is_none_or(|id| id == d.id))
                .map(|d| {
                    json!({
                        "ublk_device": format!("/dev/ublkb{}", d.id),
                        "id": d.id,
                        "queue_depth": d.queue_depth,
                        "num_queues": d.num_queues,
                        "bdev_name": d.bdev_name,
                    })
                })
                .collect(),
        ))
    });

    let (r, s) = (reg.clone(), server.clone());
    m.add("save_config", move |method, params| {
        params_obj(method, params, &[])?;
        Ok(full_config(&r, &s))
    });
    let (r, s) = (reg, server);
    m.add("framework_get_config", move |method, params| {
        let p = params_obj(method, params, &["name"])?;
        let name = req_str(method, &p, "name")?;
        full_config(&r, &s)["subsystems"]
            .as_array()
            .and_then(|v| v.iter().find(|v| v["subsystem"] == name.as_str()))
            .map(|v| v["config"].clone())
            .ok_or_else(|| {
                RpcError::params(format!(
                    "{method}: no subsystem named {name:?} (vireo has \"bdev\" and \"ublk\")"
                ))
            })
    });
    m.add("framework_get_subsystems", move |method, params| {
        params_obj(method, params, &[])?;
        Ok(json!([
            {"subsystem": "bdev", "depends_on": []},
            {"subsystem": "ublk", "depends_on": ["bdev"]}
        ]))
    });
}

/// The ublk subsystem's calls: the target, then each device (as SPDK writes them).
pub fn ublk_config(server: &UblkServer) -> Vec<Value> {
    let Some(t) = server.target_opt() else {
        return Vec::new();
    };
    let mut p = json!({});
    if let Some(c) = t.cpumask() {
        p["cpumask"] = c.into();
    }
    let mut v = vec![json!({"method": "ublk_create_target", "params": p})];
    for d in t.list() {
        v.push(json!({"method": "ublk_start_disk", "params": {
            "bdev_name": d.bdev_name,
            "ublk_id": d.id,
            "num_queues": d.num_queues,
            "queue_depth": d.queue_depth,
        }}));
    }
    v
}

/// Apply the "ublk" subsystem of a JSON configuration (`vireo serve -c`, as written by
/// `save_config`) through the methods: `ublk_create_target`, then `ublk_start_disk`s.
pub fn apply_config(m: &Methods, doc: &Value) -> Result<usize, String> {
    let Some(subs) = doc["subsystems"].as_array() else {
        return Ok(0);
    };
    let mut n = 0;
    for s in subs.iter().filter(|s| s["subsystem"] == "ublk") {
        for (j, c) in s["config"].as_array().into_iter().flatten().enumerate() {
            let method = c["method"].as_str().unwrap_or("");
            if !matches!(method, "ublk_create_target" | "ublk_start_disk") {
                return Err(format!(
                    "ublk config[{j}]: method {method:?} is not one a configuration holds (ublk_create_target, ublk_start_disk)"
                ));
            }
            if let Some(k) = c
                .as_object()
                .and_then(|o| o.keys().find(|k| *k != "method" && *k != "params"))
            {
                return Err(format!("ublk config[{j}]: unknown key {k:?}"));
            }
            m.call(method, &c["params"])
                .map_err(|e| format!("ublk config[{j}] ({method}): {}", e.message))?;
            n += 1;
        }
    }
    Ok(n)
}

fn full_config(reg: &Registry, server: &UblkServer) -> Value {
    let mut cfg = crate::config::save_config(reg);
    if let Some(s) = cfg["subsystems"].as_array_mut() {
        s.push(json!({"subsystem": "ublk", "config": ublk_config(server)}));
    }
    cfg
}

#[cfg(test)]
mod tests {
    use super::*;

    fn methods() -> Methods {
        let reg = Arc::new(Registry::new(
            vireo_virtio::DmaMemory::new(Default::default()).unwrap(),
        ));
        let mut m = Methods::new();
        crate::rpc::bdev::register(&mut m, reg.clone());
        register(&mut m, reg.clone(), UblkServer::new(reg));
        m
    }

    /// Without a target, the disk methods say to create one; get_disks lists none;
    /// bad params are refused by name.
    #[test]
    fn without_a_target() {
        let m = methods();
        assert_eq!(m.call("ublk_get_disks", &Value::Null), Ok(json!([])));
        let e = m
            .call("ublk_start_disk", &json!({"bdev_name": "X", "ublk_id": 1}))
            .unwrap_err();
        assert!(e.message.contains("ublk_create_target"), "{e:?}");
        let e = m
            .call("ublk_start_disk", &json!({"bdev_name": "X", "ublk_id": -1}))
            .unwrap_err();
        assert_eq!(e.code, crate::rpc::INVALID_PARAMS, "{e:?}");
        let e = m
            .call("ublk_stop_disk", &json!({"ublk_id": 1, "x": 2}))
            .unwrap_err();
        assert!(e.message.contains("\"x\""), "{e:?}");
        let e = m.call("ublk_destroy_target", &Value::Null).unwrap_err();
        assert!(e.message.contains("ublk_create_target"), "{e:?}");
        let cfg = m.call("save_config", &Value::Null).unwrap();
        assert_eq!(
            cfg["subsystems"][1],
            json!({"subsystem": "ublk", "config": []})
        );
    }

    /// On a machine without ublk_drv (the CI host), ublk_create_target fails with a
    /// message naming the module to load; with it, it succeeds.
    #[test]
    fn create_target_names_what_is_missing() {
        let m = methods();
        // A CPU this process may run on (under taskset too).
        let mask = format!("{:#x}", 1u128 << crate::cpus::allowed_cpus().unwrap()[0]);
        match m.call("ublk_create_target", &json!({"cpumask": mask})) {
            Ok(v) => {
                assert_eq!(v, json!(true));
                let cfg = m.call("framework_get_config", &json!({"name": "ublk"}));
                assert_eq!(
                    cfg,
                    Ok(json!([{"method": "ublk_create_target", "params": {"cpumask": mask}}]))
                );
                m.call("ublk_destroy_target", &Value::Null).unwrap();
            }
            Err(e) => {
                let ok = e.message.contains("modprobe ublk_drv")
                    || e.message.contains("run vireo as root")
                    || e.message.contains("upgrade");
                assert!(ok, "{e:?}");
                eprintln!("ublk_create_target here: {}", e.message);
            }
        }
    }

    /// `cpumask` must name CPUs this process may run on (its queues are pinned to them):
    /// anything else is refused with the set it may use, before the driver is opened.
    #[test]
    fn create_target_refuses_a_cpumask_outside_the_allowed_cpus() {
        let m = methods();
        for bad in ["0x0", "0x10000000000000000000000000000000", "[3-1]", "x"] {
            let e = m
                .call("ublk_create_target", &json!({"cpumask": bad}))
                .unwrap_err();
            assert!(e.message.contains("cpumask"), "{bad}: {e:?}");
        }
        let e = m
            .call("ublk_create_target", &json!({"cpumask": "[127]"}))
            .unwrap_err();
        assert!(e.message.contains("may run on"), "{e:?}");
        // Nothing was created.
        assert!(m.call("ublk_destroy_target", &Value::Null).is_err());
    }

    /// A configuration's ublk subsystem holds only target and device calls; an empty
    /// one does nothing.
    #[test]
    fn apply_config_takes_only_ublk_calls() {
        let m = methods();
        let doc = json!({"subsystems":[{"subsystem":"bdev","config":[]},{"subsystem":"ublk","config":[]}]});
        assert_eq!(apply_config(&m, &doc), Ok(0));
        let doc =
            json!({"subsystems":[{"subsystem":"ublk","config":[{"method":"bdev_get_bdevs"}]}]});
        let e = apply_config(&m, &doc).unwrap_err();
        assert!(e.contains("bdev_get_bdevs"), "{e}");
        let doc = json!({"subsystems":[{"subsystem":"ublk","config":[
            {"method":"ublk_start_disk","params":{"bdev_name":"X","ublk_id":0}}]}]});
        let e = apply_config(&m, &doc).unwrap_err();
        assert!(e.contains("ublk_create_target"), "{e}");
        // The bdev layer's parser leaves the subsystem to vireo serve.
        assert!(crate::config::parse_config(&doc).unwrap().is_empty());
    }
}
