//! SPDK's JSON configuration format, for the methods vireo implements:
//! `{"subsystems":[{"subsystem":"bdev","config":[{"method":..., "params":{...}}]}]}`.
//! The library takes typed [`AttachParams`] / [`ConfigCall`]s; this module reads and
//! writes them as SPDK does.

use std::path::Path;

use serde_json::{json, Map, Value};
use vireo_bdev::config::{
    name_problem, timeout_from_secs, DEFAULT_VQ_COUNT, DEFAULT_VQ_SIZE, TIMEOUT_RANGE,
};
use vireo_bdev::{AttachParams, BdevError, ConfigCall, DevType, PackedRing, Registry, TrType};

fn cfg_err(msg: String) -> BdevError {
    BdevError::Config(msg)
}

fn get_str(p: &Map<String, Value>, key: &str, ctx: &str) -> Result<Option<String>, BdevError> {
    match p.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(v) => Err(cfg_err(format!(
            "{ctx}: \"{key}\" must be a string, got {v}"
        ))),
    }
}

/// An integer param in `min..=65535`.
fn get_u16(
    p: &Map<String, Value>,
    key: &str,
    min: u16,
    ctx: &str,
) -> Result<Option<u16>, BdevError> {
    match p.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_u64()
            .filter(|&v| v >= min as u64 && v <= u16::MAX as u64)
            .map(|v| Some(v as u16))
            .ok_or_else(|| {
                cfg_err(format!(
                    "{ctx}: \"{key}\" must be an integer {min}..=65535, got {n}"
                ))
            }),
        Some(v) => Err(cfg_err(format!(
            "{ctx}: \"{key}\" must be a number, got {v}"
        ))),
    }
}

fn check_keys(p: &Map<String, Value>, allowed: &[&str], ctx: &str) -> Result<(), BdevError> {
    for k in p.keys() {
        if !allowed.contains(&k.as_str()) {
            return Err(cfg_err(format!(
                "{ctx}: unknown parameter \"{k}\" (allowed: {})",
                allowed.join(", ")
            )));
        }
    }
    Ok(())
}

/// The `trtype` values, for messages.
const TRTYPES: &str = "\"user\", \"pci\", \"vfio-user\", \"vdpa\" or \"vhost-kernel\"";

/// Parse and validate the `params` object of `bdev_virtio_attach_controller`.
pub fn attach_from_json(v: &Value) -> Result<AttachParams, BdevError> {
    let ctx = "bdev_virtio_attach_controller";
    let p = v
        .as_object()
        .ok_or_else(|| cfg_err(format!("{ctx}: \"params\" must be an object")))?;
    check_keys(
        p,
        &[
            "name",
            "trtype",
            "traddr",
            "dev_type",
            "vq_count",
            "vq_size",
            "io_timeout",
            "reconnect_timeout",
            "packed_ring",
            "wwpn",
        ],
        ctx,
    )?;
    let name =
        get_str(p, "name", ctx)?.ok_or_else(|| cfg_err(format!("{ctx}: \"name\" is required")))?;
    if let Some(why) = name_problem(&name) {
        return Err(cfg_err(format!(
            "{ctx}: \"name\" {name:?} {why}: a name is non-empty, without whitespace or control characters"
        )));
    }
    let trtype = match get_str(p, "trtype", ctx)?
        .ok_or_else(|| cfg_err(format!("{ctx}: \"trtype\" is required ({TRTYPES})")))?
        .to_ascii_lowercase()
        .as_str()
    {
        "user" => TrType::User,
        "pci" => TrType::Pci,
        "vdpa" => TrType::Vdpa,
        "vhost-kernel" => TrType::VhostKernel,
        "vfio-user" => TrType::VfioUser,
        other => {
            return Err(cfg_err(format!(
                "{ctx}: \"trtype\" must be one of {TRTYPES}, got {other:?}"
            )))
        }
    };
    let traddr = get_str(p, "traddr", ctx)?
        .ok_or_else(|| cfg_err(format!("{ctx}: \"traddr\" is required")))?;
    let dev_type = match get_str(p, "dev_type", ctx)?
        .ok_or_else(|| cfg_err(format!("{ctx}: \"dev_type\" is required (scsi or blk)")))?
        .to_ascii_lowercase()
        .as_str()
    {
        "scsi" => DevType::Scsi,
        "blk" => DevType::Blk,
        other => {
            return Err(cfg_err(format!(
                "{ctx}: \"dev_type\" must be \"scsi\" or \"blk\", got {other:?}"
            )))
        }
    };
    let vq_count = get_u16(p, "vq_count", 1, ctx)?.unwrap_or(DEFAULT_VQ_COUNT);
    if vq_count == 0 {
        return Err(cfg_err(format!("{ctx}: \"vq_count\" must be at least 1")));
    }
    let vq_size = get_u16(p, "vq_size", 4, ctx)?.unwrap_or(DEFAULT_VQ_SIZE);
    if !vq_size.is_power_of_two() || vq_size < 4 {
        return Err(cfg_err(format!(
            "{ctx}: \"vq_size\" must be a power of two of at least 4, got {vq_size}"
        )));
    }
    let seconds = |key: &str| -> Result<Option<std::time::Duration>, BdevError> {
        match p.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => timeout_from_secs(key, n.as_f64().unwrap_or(f64::NAN))
                .map_err(|e| cfg_err(format!("{ctx}: {e}"))),
            Some(v) => Err(cfg_err(format!(
                "{ctx}: \"{key}\" must be a number of seconds ({TIMEOUT_RANGE}), got {v}"
            ))),
        }
    };
    let io_timeout = seconds("io_timeout")?;
    let reconnect_timeout = seconds("reconnect_timeout")?;
    if reconnect_timeout.is_some() && !matches!(trtype, TrType::User | TrType::VfioUser) {
        return Err(cfg_err(format!(
            "{ctx}: \"reconnect_timeout\" applies to vhost-user and vfio-user controllers (trtype \"user\", \"vfio-user\"); a {} device does not go away and come back",
            trtype.as_str()
        )));
    }
    let wwpn = get_str(p, "wwpn", ctx)?;
    let packed_ring = match get_str(p, "packed_ring", ctx)? {
        None => PackedRing::Auto,
        Some(v) => PackedRing::parse(&v.to_ascii_lowercase()).ok_or_else(|| {
            cfg_err(format!(
                "{ctx}: \"packed_ring\" must be \"auto\", \"on\" or \"off\", got {v:?}"
            ))
        })?,
    };
    let a = AttachParams {
        name,
        trtype,
        traddr,
        dev_type,
        vq_count,
        vq_size,
        io_timeout,
        reconnect_timeout,
        packed_ring,
        wwpn,
    };
    // What is left of the rules every way in shares (traddr, for one).
    a.validate().map_err(|e| cfg_err(format!("{ctx}: {e}")))?;
    Ok(a)
}

/// The `params` object, as SPDK writes it.
pub fn attach_to_json(p: &AttachParams) -> Value {
    serde_json::to_value(p).unwrap_or(Value::Null)
}

/// Parse a configuration document.
pub fn parse_config(doc: &Value) -> Result<Vec<ConfigCall>, BdevError> {
    let top = doc
        .as_object()
        .ok_or_else(|| cfg_err("the configuration must be a JSON object".into()))?;
    check_keys(top, &["subsystems"], "configuration")?;
    let subs = match top.get("subsystems") {
        Some(Value::Array(a)) => a,
        Some(_) => return Err(cfg_err("\"subsystems\" must be an array".into())),
        None => {
            return Err(cfg_err(
                "the configuration has no \"subsystems\" array".into(),
            ))
        }
    };
    let mut calls = Vec::new();
    for (i, s) in subs.iter().enumerate() {
        let s = s
            .as_object()
            .ok_or_else(|| cfg_err(format!("subsystems[{i}] must be an object")))?;
        check_keys(s, &["subsystem", "config"], &format!("subsystems[{i}]"))?;
        let name = get_str(s, "subsystem", &format!("subsystems[{i}]"))?
            .ok_or_else(|| cfg_err(format!("subsystems[{i}] has no \"subsystem\" name")))?;
        let config = match s.get("config") {
            None | Some(Value::Null) => continue,
            Some(Value::Array(a)) => a,
            Some(_) => {
                return Err(cfg_err(format!(
                    "subsystem {name}: \"config\" must be an array"
                )))
            }
        };
        // `vireo serve` applies the ublk subsystem's calls itself, once the bdevs are
        // there (crate::ublk::rpc::apply_config); nothing else has kernel devices.
        if name == "ublk" {
            continue;
        }
        if name != "bdev" {
            if config.is_empty() {
                continue;
            }
            return Err(cfg_err(format!(
                "unknown subsystem \"{name}\" with configuration (vireo configures only \"bdev\", and \"ublk\" in vireo serve)"
            )));
        }
        for (j, c) in config.iter().enumerate() {
            let ctx = format!("bdev config[{j}]");
            let c = c
                .as_object()
                .ok_or_else(|| cfg_err(format!("{ctx} must be an object")))?;
            check_keys(c, &["method", "params"], &ctx)?;
            let method = get_str(c, "method", &ctx)?
                .ok_or_else(|| cfg_err(format!("{ctx} has no \"method\"")))?;
            let empty = Value::Object(Map::new());
            let params = c.get("params").unwrap_or(&empty);
            match method.as_str() {
                "bdev_virtio_attach_controller" => {
                    calls.push(ConfigCall::Attach(attach_from_json(params)?))
                }
                "bdev_virtio_blk_set_hotplug" => {
                    let p = params.as_object().ok_or_else(|| {
                        cfg_err(format!("{method}: \"params\" must be an object"))
                    })?;
                    check_keys(p, &["enable", "period_us"], &method)?;
                    let enable = match p.get("enable") {
                        Some(Value::Bool(b)) => *b,
                        _ => {
                            return Err(cfg_err(format!(
                                "{method}: \"enable\" (a boolean) is required"
                            )))
                        }
                    };
                    let period_us = match p.get("period_us") {
                        None | Some(Value::Null) => None,
                        Some(v) => Some(v.as_u64().ok_or_else(|| {
                            cfg_err(format!("{method}: \"period_us\" must be an integer"))
                        })?),
                    };
                    calls.push(ConfigCall::BlkHotplug { enable, period_us });
                }
                // SPDK writes these into every saved configuration; attach is
                // synchronous in vireo, so there is nothing to wait for.
                "bdev_wait_for_examine" => {}
                other => {
                    return Err(cfg_err(format!(
                        "{ctx}: unknown method \"{other}\" (supported: bdev_virtio_attach_controller, bdev_virtio_blk_set_hotplug, bdev_wait_for_examine)"
                    )))
                }
            }
        }
    }
    let attaches: Vec<AttachParams> = calls
        .iter()
        .filter_map(|c| match c {
            ConfigCall::Attach(a) => Some(a.clone()),
            _ => None,
        })
        .collect();
    if let Some(c) = find_conflict(&attaches) {
        return Err(cfg_err(c.message));
    }
    Ok(calls)
}

/// What two controllers of one configuration share that they must not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConflictKind {
    /// Their name.
    Name,
    /// Their socket or PCI function(s).
    Address,
}

/// Two controllers of one configuration that cannot both be attached.
#[derive(Debug)]
pub struct Conflict {
    /// Index of the first one.
    pub first: usize,
    /// Index of the later one, the one refused.
    pub later: usize,
    /// What they share.
    pub what: ConflictKind,
    /// What is wrong, naming both.
    pub message: String,
}

/// The rules a configuration's controllers follow together, in either format: names
/// are unique, and one controller per vhost-user socket (a back-end serves one
/// front-end at a time) or PCI function (`traddr` "*": every function of the
/// `dev_type`). The first pair that breaks them.
pub fn find_conflict(attaches: &[AttachParams]) -> Option<Conflict> {
    for (later, b) in attaches.iter().enumerate() {
        for (first, a) in attaches[..later].iter().enumerate() {
            let conflict = |what, message| {
                Some(Conflict {
                    first,
                    later,
                    what,
                    message,
                })
            };
            if a.name == b.name {
                return conflict(
                    ConflictKind::Name,
                    format!("controller name {:?} is used twice", b.name),
                );
            }
            // Every open of /dev/vhost-scsi is a device of its own: the WWPN is the place.
            let same_place = a.trtype == b.trtype
                && (a.traddr == b.traddr || b.trtype == TrType::VhostKernel)
                && (a.traddr != "*" || a.dev_type == b.dev_type)
                && a.wwpn == b.wwpn;
            if same_place {
                let place = match (b.trtype, b.traddr.as_str()) {
                    (TrType::User, t) => format!(
                        "the vhost-user socket {t:?} (a back-end serves one front-end at a time)"
                    ),
                    (TrType::Pci, "*") => format!(
                        "every virtio-{} PCI function (traddr \"*\")",
                        match b.dev_type {
                            DevType::Blk => "blk",
                            DevType::Scsi => "scsi",
                        }
                    ),
                    (TrType::Pci, t) => format!("the PCI function {t}"),
                    (TrType::Vdpa, t) => {
                        format!("the vhost-vdpa device {t:?} (it serves one user at a time)")
                    }
                    (TrType::VhostKernel, t) => format!(
                        "the LIO vhost target {} through {t:?} (a target serves one user at a time)",
                        b.wwpn.as_deref().unwrap_or_default()
                    ),
                    (TrType::VfioUser, t) => {
                        format!("the vfio-user socket {t:?} (a server serves one client at a time)")
                    }
                };
                return conflict(
                    ConflictKind::Address,
                    format!(
                        "controllers {:?} and {:?} both attach {place}",
                        a.name, b.name
                    ),
                );
            }
        }
    }
    None
}

/// Read and parse a configuration file; errors name the file.
pub fn load_config(path: &Path) -> Result<Vec<ConfigCall>, BdevError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| cfg_err(format!("cannot read config file {}: {e}", path.display())))?;
    let doc: Value = serde_json::from_str(&text)
        .map_err(|e| cfg_err(format!("config file {}: invalid JSON: {e}", path.display())))?;
    parse_config(&doc).map_err(|e| cfg_err(format!("config file {}: {e}", path.display())))
}

/// The configuration that recreates `reg`'s current state (SPDK `save_config` shape).
pub fn save_config(reg: &Registry) -> Value {
    let mut config: Vec<Value> = reg
        .controllers()
        .into_iter()
        .map(|(p, _)| {
            json!({
                "method": "bdev_virtio_attach_controller",
                "params": attach_to_json(&p),
            })
        })
        .collect();
    if let Some((enable, period)) = reg.hotplug() {
        let mut p = json!({ "enable": enable });
        if let Some(us) = period {
            p["period_us"] = us.into();
        }
        config.push(json!({"method":"bdev_virtio_blk_set_hotplug","params":p}));
    }
    json!({"subsystems":[{"subsystem":"bdev","config":config}]})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attach(params: Value) -> Value {
        json!({"subsystems":[{"subsystem":"bdev","config":[
            {"method":"bdev_virtio_attach_controller","params":params}]}]})
    }

    #[test]
    fn spdk_example_parses_with_defaults() {
        let doc = attach(
            json!({"name":"VirtioBlk0","trtype":"user","traddr":"/tmp/vhost.0","dev_type":"blk"}),
        );
        let calls = parse_config(&doc).unwrap();
        assert_eq!(
            calls,
            vec![ConfigCall::Attach(AttachParams {
                wwpn: None,
                name: "VirtioBlk0".into(),
                trtype: TrType::User,
                traddr: "/tmp/vhost.0".into(),
                dev_type: DevType::Blk,
                vq_count: 1,
                vq_size: 128,
                io_timeout: None,
                reconnect_timeout: None,
                packed_ring: Default::default(),
            })]
        );
    }

    #[test]
    fn vfio_user_parses_and_saves_with_spdks_spelling() {
        let doc = attach(
            json!({"name":"F","trtype":"vfio-user","traddr":"/run/vfu.blk","dev_type":"blk","reconnect_timeout":10}),
        );
        let calls = parse_config(&doc).unwrap();
        let ConfigCall::Attach(p) = &calls[0] else {
            panic!("{calls:?}")
        };
        assert_eq!(p.trtype, TrType::VfioUser);
        assert_eq!(attach_to_json(p)["trtype"], "vfio-user");
        let back = parse_config(&attach(attach_to_json(p))).unwrap();
        assert_eq!(back, calls);
        let e = parse_config(&attach(
            json!({"name":"F","trtype":"vfio_user","traddr":"/s","dev_type":"blk"}),
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("\"vfio-user\""), "{e}");
    }

    #[test]
    fn spdk_saved_config_extras_are_accepted() {
        let doc = json!({"subsystems":[
            {"subsystem":"accel","config":[]},
            {"subsystem":"bdev","config":[
                {"method":"bdev_virtio_attach_controller","params":{"name":"S","trtype":"User","traddr":"/s","dev_type":"SCSI","vq_count":2,"vq_size":128}},
                {"method":"bdev_virtio_blk_set_hotplug","params":{"enable":false,"period_us":1000}},
                {"method":"bdev_wait_for_examine"}]}]});
        let calls = parse_config(&doc).unwrap();
        assert_eq!(calls.len(), 2);
    }

    #[test]
    fn errors_name_the_offending_key() {
        let cases = [
            (
                json!({"name":"A","trtype":"user","traddr":"/s","dev_type":"blk","vq_cuont":2}),
                "vq_cuont",
            ),
            (
                json!({"trtype":"user","traddr":"/s","dev_type":"blk"}),
                "\"name\" is required",
            ),
            (
                json!({"name":"A","trtype":"tcp","traddr":"/s","dev_type":"blk"}),
                "trtype",
            ),
            (
                json!({"name":"A","trtype":"user","traddr":"/s","dev_type":"nvme"}),
                "dev_type",
            ),
            (
                json!({"name":"A","trtype":"user","traddr":"/s","dev_type":"blk","vq_size":100}),
                "vq_size",
            ),
            (
                json!({"name":"A","trtype":"user","traddr":"/s","dev_type":"blk","vq_count":0}),
                "vq_count",
            ),
            (
                json!({"name":"A","trtype":"user","traddr":"/s","dev_type":"blk","vq_count":"2"}),
                "vq_count",
            ),
            (
                json!({"name":"A","trtype":"user","traddr":5,"dev_type":"blk"}),
                "traddr",
            ),
        ];
        for (p, needle) in cases {
            let e = parse_config(&attach(p)).unwrap_err().to_string();
            assert!(e.contains(needle), "{e} should mention {needle}");
        }
        let e = parse_config(&json!({"subsystems":[{"subsystem":"bdev","config":[{"method":"bdev_malloc_create","params":{}}]}]}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("bdev_malloc_create"), "{e}");
        let e =
            parse_config(&json!({"subsystems":[{"subsystem":"nvmf","config":[{"method":"x"}]}]}))
                .unwrap_err()
                .to_string();
        assert!(e.contains("nvmf"), "{e}");
        let e = parse_config(&json!({"subsystem":[]}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("subsystem"), "{e}");
    }

    #[test]
    fn kernel_vhost_trtypes_parse_and_are_written_back() {
        let k = json!({"name":"K","trtype":"vhost-kernel","traddr":"/dev/vhost-scsi","wwpn":"naa.5001405000000001","dev_type":"scsi"});
        let v = json!({"name":"V","trtype":"vdpa","traddr":"/dev/vhost-vdpa-0","dev_type":"blk"});
        for (p, trtype, wwpn) in [
            (&k, TrType::VhostKernel, Some("naa.5001405000000001")),
            (&v, TrType::Vdpa, None),
        ] {
            let a = attach_from_json(p).unwrap();
            assert_eq!((a.trtype, a.wwpn.as_deref()), (trtype, wwpn));
            // save_config writes them as read.
            let w = serde_json::to_value(&a).unwrap();
            for key in ["trtype", "traddr", "wwpn"] {
                assert_eq!(w.get(key), p.get(key), "{key}");
            }
        }
        let cases = [
            (
                json!({"name":"K","trtype":"vhost-kernel","traddr":"/dev/vhost-scsi","dev_type":"scsi"}),
                "needs \"wwpn\"",
            ),
            (
                json!({"name":"K","trtype":"vhost-kernel","traddr":"/dev/vhost-scsi","wwpn":"naa.1","dev_type":"blk"}),
                "\"dev_type\" must be \"scsi\"",
            ),
            (
                json!({"name":"K","trtype":"user","traddr":"/s","wwpn":"naa.1","dev_type":"scsi"}),
                "\"wwpn\" applies to trtype \"vhost-kernel\" only",
            ),
            (
                json!({"name":"V","trtype":"vdpa","traddr":"/dev/vhost-vdpa-0","dev_type":"blk","reconnect_timeout":5}),
                "reconnect_timeout",
            ),
        ];
        for (p, needle) in cases {
            let e = attach_from_json(&p).unwrap_err().to_string();
            assert!(e.contains(needle), "{e} should mention {needle}");
        }
        // Two controllers on one WWPN conflict; on two WWPNs they do not.
        let mut k2 = k.clone();
        k2["name"] = "K2".into();
        let a = [
            attach_from_json(&k).unwrap(),
            attach_from_json(&k2).unwrap(),
        ];
        assert!(find_conflict(&a).is_some());
        k2["wwpn"] = "naa.5001405000000002".into();
        let a = [
            attach_from_json(&k).unwrap(),
            attach_from_json(&k2).unwrap(),
        ];
        assert!(find_conflict(&a).is_none());
    }

    #[test]
    fn duplicate_names_are_refused() {
        let p = json!({"name":"A","trtype":"user","traddr":"/s","dev_type":"blk"});
        let doc = json!({"subsystems":[{"subsystem":"bdev","config":[
            {"method":"bdev_virtio_attach_controller","params":p},
            {"method":"bdev_virtio_attach_controller","params":p}]}]});
        assert!(parse_config(&doc)
            .unwrap_err()
            .to_string()
            .contains("twice"));
    }

    #[test]
    fn two_controllers_on_one_socket_or_pci_function_are_refused() {
        let a = json!({"name":"A","trtype":"user","traddr":"/s","dev_type":"blk"});
        let b = json!({"name":"B","trtype":"user","traddr":"/s","dev_type":"scsi"});
        let doc = json!({"subsystems":[{"subsystem":"bdev","config":[
            {"method":"bdev_virtio_attach_controller","params":a},
            {"method":"bdev_virtio_attach_controller","params":b}]}]});
        let e = parse_config(&doc).unwrap_err().to_string();
        assert!(
            e.contains("\"/s\"") && e.contains("A") && e.contains("B"),
            "{e}"
        );
        // Every blk and every scsi PCI function: two sets, no overlap.
        let pci = |n: &str, t: &str| {
            json!({"method":"bdev_virtio_attach_controller",
            "params":{"name":n,"trtype":"pci","traddr":"*","dev_type":t}})
        };
        let doc =
            json!({"subsystems":[{"subsystem":"bdev","config":[pci("P","blk"), pci("Q","scsi")]}]});
        assert_eq!(parse_config(&doc).unwrap().len(), 2);
        let doc =
            json!({"subsystems":[{"subsystem":"bdev","config":[pci("P","blk"), pci("Q","blk")]}]});
        assert!(parse_config(&doc).is_err());
    }

    #[test]
    fn file_errors_name_the_file() {
        let dir = std::env::temp_dir().join(format!("vireo-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("bad.json");
        std::fs::write(&f, "{ not json").unwrap();
        let e = load_config(&f).unwrap_err().to_string();
        assert!(e.contains("bad.json") && e.contains("invalid JSON"), "{e}");
        let e = load_config(&dir.join("missing.json"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing.json"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn io_timeout_is_seconds_and_zero_means_none() {
        let base = json!({"name":"A","trtype":"user","traddr":"/s","dev_type":"blk"});
        let mut p = base.clone();
        p["io_timeout"] = json!(2.5);
        let a = attach_from_json(&p).unwrap();
        assert_eq!(a.io_timeout, Some(std::time::Duration::from_millis(2500)));
        assert_eq!(attach_to_json(&a)["io_timeout"], json!(2.5));
        p["io_timeout"] = json!(0);
        assert_eq!(attach_from_json(&p).unwrap().io_timeout, None);
        assert!(attach_to_json(&attach_from_json(&base).unwrap())
            .get("io_timeout")
            .is_none());
        for bad in [json!(-1), json!("5"), json!(true)] {
            p["io_timeout"] = bad;
            let e = attach_from_json(&p).unwrap_err().to_string();
            assert!(e.contains("io_timeout"), "{e}");
        }
    }

    #[test]
    fn packed_ring_is_auto_on_or_off_and_written_back_unless_auto() {
        let base = json!({"name":"A","trtype":"pci","traddr":"*","dev_type":"scsi"});
        let a = attach_from_json(&base).unwrap();
        assert_eq!(a.packed_ring, PackedRing::Auto);
        assert!(
            attach_to_json(&a).get("packed_ring").is_none(),
            "auto is the default: not written, so SPDK reads the file unchanged"
        );
        for (v, want) in [
            ("auto", PackedRing::Auto),
            ("on", PackedRing::On),
            ("OFF", PackedRing::Off),
        ] {
            let mut p = base.clone();
            p["packed_ring"] = json!(v);
            let a = attach_from_json(&p).unwrap();
            assert_eq!(a.packed_ring, want);
            assert_eq!(attach_from_json(&attach_to_json(&a)).unwrap(), a);
        }
        let mut p = base.clone();
        p["packed_ring"] = json!("on");
        assert_eq!(
            attach_to_json(&attach_from_json(&p).unwrap())["packed_ring"],
            "on"
        );
        for bad in [json!("yes"), json!(true), json!(1)] {
            p["packed_ring"] = bad;
            let e = attach_from_json(&p).unwrap_err().to_string();
            assert!(e.contains("packed_ring"), "{e}");
        }
    }

    #[test]
    fn reconnect_timeout_is_seconds_for_vhost_user_only() {
        let base = json!({"name":"A","trtype":"user","traddr":"/s","dev_type":"scsi"});
        let mut p = base.clone();
        p["reconnect_timeout"] = json!(30);
        let a = attach_from_json(&p).unwrap();
        assert_eq!(
            a.reconnect_timeout,
            Some(std::time::Duration::from_secs(30))
        );
        assert_eq!(attach_to_json(&a)["reconnect_timeout"], json!(30.0));
        assert_eq!(attach_from_json(&attach_to_json(&a)).unwrap(), a);
        p["reconnect_timeout"] = json!(0);
        assert_eq!(attach_from_json(&p).unwrap().reconnect_timeout, None);
        for bad in [json!(-1), json!("5"), json!(1e12)] {
            p["reconnect_timeout"] = bad;
            let e = attach_from_json(&p).unwrap_err().to_string();
            assert!(e.contains("reconnect_timeout"), "{e}");
        }
        let mut pci = json!({"name":"P","trtype":"pci","traddr":"0000:00:04.0","dev_type":"blk"});
        pci["reconnect_timeout"] = json!(5);
        let e = attach_from_json(&pci).unwrap_err().to_string();
        assert!(e.contains("vhost-user"), "{e}");
    }

    /// A timeout's meaning survives `config convert` and `save_config`: what is
    /// accepted is written back as the same duration; what cannot be (below a
    /// millisecond, negative, beyond a day) is refused naming the key and the range.
    #[test]
    fn timeouts_keep_their_meaning_through_a_round_trip() {
        let base = json!({"name":"A","trtype":"user","traddr":"/s","dev_type":"blk"});
        for key in ["io_timeout", "reconnect_timeout"] {
            for bad in [
                json!(1e-12),
                json!(0.0009),
                json!(-0.5),
                json!(86400.5),
                json!(1e300),
            ] {
                let mut p = base.clone();
                p[key] = bad.clone();
                let e = attach_from_json(&p)
                    .map(|a| format!("{a:?}"))
                    .unwrap_err()
                    .to_string();
                assert!(
                    e.contains(key) && e.contains("0.001") && e.contains("86400"),
                    "{key} {bad}: {e}"
                );
            }
            for good in [0.001, 0.0015, 0.1 + 0.2, 1.0, 2.5, 30.000001, 86400.0] {
                let mut p = base.clone();
                p[key] = json!(good);
                let a = attach_from_json(&p).unwrap();
                let written = attach_to_json(&a);
                let secs = written[key].as_f64().unwrap();
                assert!((secs - good).abs() < 1e-6, "{key} {good} written as {secs}");
                assert_eq!(attach_from_json(&written).unwrap(), a, "{key} {good}");
            }
        }
    }

    /// The registry takes the same rules from a program as the loaders from a file:
    /// parameters no file could give are refused before anything connects.
    #[test]
    fn the_registry_refuses_what_no_config_file_could_say() {
        let reg = Registry::new(vireo_virtio::DmaMemory::new(Default::default()).unwrap());
        let ok = attach_from_json(
            &json!({"name":"A","trtype":"user","traddr":"/nonexistent/vireo.sock","dev_type":"blk"}),
        )
        .unwrap();
        let mut cases = Vec::new();
        let mut p = ok.clone();
        p.io_timeout = Some(std::time::Duration::from_nanos(1));
        cases.push((p, "io_timeout"));
        let mut p = ok.clone();
        p.reconnect_timeout = Some(std::time::Duration::from_secs(1 << 40));
        cases.push((p, "reconnect_timeout"));
        let mut p = ok.clone();
        p.name = "A\u{1}B".into();
        cases.push((p, "name"));
        let mut p = ok.clone();
        p.name = String::new();
        cases.push((p, "name"));
        for (p, key) in cases {
            let e = reg.attach(&p).map(|b| b.len()).unwrap_err();
            assert_eq!(e.kind(), vireo_bdev::ErrorKind::InvalidInput, "{key}: {e}");
            assert!(e.to_string().contains(key), "{key}: {e}");
        }
    }
}
