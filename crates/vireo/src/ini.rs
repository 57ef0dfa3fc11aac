//! The INI configuration of SPDK's first virtio bdev module (the seed's format), read
//! beside the JSON one:
//!
//! ```ini
//! [Virtio]
//!   Dev User /tmp/vhost.0     # a vhost-user virtio-scsi controller
//!   Dev Pci                   # every virtio-scsi PCI function
//!
//! [VirtioUser0]               # one vhost-user controller per section
//!   Path /tmp/vhost.1
//!   Queues 2                  # request queues (vq_count)
//!   Type Blk                  # SCSI (default) or Blk
//!   Name VirtioBlk0           # default VirtioScsiN / VirtioBlkN
//!
//! [VirtioPci]
//!   Enable Yes                # every virtio-scsi PCI function
//! ```
//!
//! `Dev Pci` and `[VirtioPci] Enable Yes` become an attach with `trtype` "pci" and
//! `traddr` "*" (every function).

use std::path::Path;
use std::sync::Arc;

use std::collections::HashMap;

use anyhow::{bail, Context, Result};
use vireo_bdev::config::{name_problem, DEFAULT_VQ_SIZE};
use vireo_bdev::{AttachParams, Bdev, ConfigCall, DevType, Registry, TrType};

/// Whether `text` is INI rather than JSON (JSON configs are objects).
pub fn is_ini(text: &str) -> bool {
    text.trim_start_matches('\u{feff}')
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with(';'))
        .is_some_and(|l| l.starts_with('['))
}

/// One controller of the file and where it was said: the line that names it (its
/// `Name`, else its section or `Dev` line) and the line that gives its address.
struct Entry {
    params: AttachParams,
    name_line: usize,
    addr_line: usize,
    /// Named by a `Name` line (not by default).
    named: bool,
}

fn scsi(name: String, traddr: String, trtype: TrType, line: usize) -> Entry {
    Entry {
        params: AttachParams {
            wwpn: None,
            name,
            trtype,
            traddr,
            dev_type: DevType::Scsi,
            vq_count: 1,
            vq_size: DEFAULT_VQ_SIZE,
            io_timeout: None,
            reconnect_timeout: None,
            packed_ring: Default::default(),
        },
        name_line: line,
        addr_line: line,
        named: false,
    }
}

/// One `[VirtioUserN]` section being read.
struct UserSection {
    line: usize,
    index: String,
    path: Option<(String, usize)>,
    queues: u16,
    dev_type: DevType,
    name: Option<(String, usize)>,
}

impl UserSection {
    fn finish(self, file: &str) -> Result<Entry> {
        let Some((path, path_line)) = self.path else {
            bail!(
                "{file}:{}: [VirtioUser{}] has no Path (the vhost-user socket)",
                self.line,
                self.index
            );
        };
        let kind = if self.dev_type == DevType::Blk {
            "Blk"
        } else {
            "Scsi"
        };
        let named = self.name.is_some();
        let (name, name_line) = self
            .name
            .unwrap_or_else(|| (format!("Virtio{kind}{}", self.index), self.line));
        Ok(Entry {
            params: AttachParams {
                wwpn: None,
                name,
                trtype: TrType::User,
                traddr: path,
                dev_type: self.dev_type,
                vq_count: self.queues,
                vq_size: DEFAULT_VQ_SIZE,
                io_timeout: None,
                reconnect_timeout: None,
                packed_ring: Default::default(),
            },
            name_line,
            addr_line: path_line,
            named,
        })
    }
}

/// Parse INI `text` (from `file`, for messages) into attach calls. The controllers
/// follow the JSON loader's rules (names, addresses, uniqueness: what one format
/// accepts the other does), and every error says `file:line`.
pub fn parse(text: &str, file: &str) -> Result<Vec<ConfigCall>> {
    enum Section {
        None,
        Virtio,
        Pci,
        User(UserSection),
    }
    let mut out: Vec<Entry> = Vec::new();
    let mut section = Section::None;
    let mut scsi_n = 0usize;
    // Section headers seen, and the keys of the current section: SPDK reads the first
    // of either and ignores the rest, so a repeat is refused rather than guessed at.
    let mut sections: HashMap<String, usize> = HashMap::new();
    let mut keys: HashMap<String, usize> = HashMap::new();
    let close = |s: Section, out: &mut Vec<Entry>| -> Result<()> {
        if let Section::User(u) = s {
            out.push(u.finish(file)?);
        }
        Ok(())
    };
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    for (i, raw) in text.lines().enumerate() {
        let n = i + 1;
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() || line.starts_with(';') {
            continue;
        }
        if let Some(head) = line.strip_prefix('[') {
            let Some(name) = head.strip_suffix(']') else {
                bail!("{file}:{n}: section header {line:?} lacks its closing ']'");
            };
            let old = std::mem::replace(&mut section, Section::None);
            close(old, &mut out)?;
            let name = name.trim();
            if let Some(first) = sections.insert(name.to_string(), n) {
                bail!(
                    "{file}:{n}: section [{name}] appears twice (first at line {first}); give its settings once"
                );
            }
            keys.clear();
            section = match name {
                "Virtio" => Section::Virtio,
                "VirtioPci" => Section::Pci,
                s if s.starts_with("VirtioUser") => {
                    let index = &s["VirtioUser".len()..];
                    if index.is_empty() || !index.bytes().all(|b| b.is_ascii_digit()) {
                        bail!("{file}:{n}: section [{s}] must be VirtioUser followed by a number");
                    }
                    Section::User(UserSection {
                        line: n,
                        index: index.to_string(),
                        path: None,
                        queues: 1,
                        dev_type: DevType::Scsi,
                        name: None,
                    })
                }
                other => bail!(
                    "{file}:{n}: unknown section [{other}] (known: [Virtio], [VirtioUserN], [VirtioPci])"
                ),
            };
            continue;
        }
        let mut words = line.split_whitespace();
        let key = words.next().unwrap_or("");
        let rest: Vec<&str> = words.collect();
        let one = |what: &str| -> Result<&str> {
            match rest.as_slice() {
                [v] => Ok(v),
                _ => bail!(
                    "{file}:{n}: {key} takes one value ({what}), got {:?}",
                    rest.join(" ")
                ),
            }
        };
        // [Virtio] lists one controller a Dev line; other keys are said once.
        if matches!(section, Section::Pci | Section::User(_)) {
            if let Some(first) = keys.insert(key.to_string(), n) {
                bail!("{file}:{n}: {key} is given twice in this section (first at line {first})");
            }
        }
        match &mut section {
            Section::None => bail!("{file}:{n}: {key:?} outside a section"),
            Section::Virtio => match (key, rest.as_slice()) {
                ("Dev", ["User", path]) => {
                    out.push(scsi(
                        format!("VirtioScsi{scsi_n}"),
                        path.to_string(),
                        TrType::User,
                        n,
                    ));
                    scsi_n += 1;
                }
                ("Dev", ["Pci"]) => {
                    out.push(scsi(
                        format!("VirtioScsi{scsi_n}"),
                        "*".into(),
                        TrType::Pci,
                        n,
                    ));
                    scsi_n += 1;
                }
                _ => bail!(
                    "{file}:{n}: [Virtio] takes \"Dev User PATH\" or \"Dev Pci\", got {line:?}"
                ),
            },
            Section::Pci => match key {
                "Enable" => match one("Yes or No")?.to_ascii_lowercase().as_str() {
                    "yes" | "true" | "1" => {
                        out.push(scsi(
                            format!("VirtioScsi{scsi_n}"),
                            "*".into(),
                            TrType::Pci,
                            n,
                        ));
                        scsi_n += 1;
                    }
                    "no" | "false" | "0" => {}
                    v => bail!("{file}:{n}: Enable must be Yes or No, got {v:?}"),
                },
                _ => bail!("{file}:{n}: [VirtioPci] takes Enable, got {key:?}"),
            },
            Section::User(u) => match key {
                "Path" => u.path = Some((one("the socket path")?.to_string(), n)),
                "Queues" => {
                    let v = one("a number")?;
                    u.queues = v.parse().ok().filter(|&q: &u16| q >= 1).with_context(|| {
                        format!("{file}:{n}: Queues must be 1..=65535, got {v:?}")
                    })?;
                }
                "Type" => {
                    u.dev_type = match one("SCSI or Blk")?.to_ascii_lowercase().as_str() {
                        "scsi" => DevType::Scsi,
                        "blk" => DevType::Blk,
                        v => bail!("{file}:{n}: Type must be SCSI or Blk, got {v:?}"),
                    }
                }
                "Name" => {
                    let v = one("the controller name")?;
                    if let Some(why) = name_problem(v) {
                        bail!(
                            "{file}:{n}: controller name {v:?} {why}: a name is non-empty, without whitespace or control characters"
                        );
                    }
                    u.name = Some((v.to_string(), n));
                }
                other => bail!(
                    "{file}:{n}: [VirtioUser{}] takes Path, Queues, Type and Name, got {other:?}",
                    u.index
                ),
            },
        }
    }
    close(section, &mut out)?;
    // The rules of the JSON loader, said with the line.
    for e in &out {
        e.params
            .validate()
            .map_err(|err| anyhow::anyhow!("{file}:{}: {err}", e.addr_line))?;
    }
    let params: Vec<AttachParams> = out.iter().map(|e| e.params.clone()).collect();
    if let Some(c) = crate::config::find_conflict(&params) {
        let (line, first) = match c.what {
            crate::config::ConflictKind::Name => (out[c.later].name_line, out[c.first].name_line),
            crate::config::ConflictKind::Address => {
                (out[c.later].addr_line, out[c.first].addr_line)
            }
        };
        let hint = if c.what == crate::config::ConflictKind::Name
            && !(out[c.first].named && out[c.later].named)
        {
            "; [Virtio] Dev lines are named VirtioScsi0, 1, ... in order, and a [VirtioUserN] section without a Name VirtioScsiN or VirtioBlkN: give the section a Name"
        } else {
            ""
        };
        bail!("{file}:{line}: {} (first at line {first}){hint}", c.message);
    }
    Ok(out
        .into_iter()
        .map(|e| ConfigCall::Attach(e.params))
        .collect())
}

/// Read `path`, INI or JSON.
pub fn load(path: &Path) -> Result<Vec<ConfigCall>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    if is_ini(&text) {
        return parse(&text, &path.display().to_string());
    }
    Ok(crate::config::load_config(path)?)
}

/// Attach the controllers of the config file `path` (INI or JSON) to `reg`.
pub fn attach_config(reg: &Registry, path: &Path) -> Result<Vec<Arc<Bdev>>> {
    let calls = load(path)?;
    Ok(reg.apply(&calls)?)
}

/// The SPDK JSON document equivalent to `calls`.
pub fn to_json(calls: &[ConfigCall]) -> serde_json::Value {
    let config: Vec<serde_json::Value> = calls
        .iter()
        .map(|c| match c {
            ConfigCall::Attach(p) => serde_json::json!({
                "method": "bdev_virtio_attach_controller",
                "params": crate::config::attach_to_json(p),
            }),
            ConfigCall::BlkHotplug { enable, period_us } => {
                let mut params = serde_json::json!({"enable": enable});
                if let Some(p) = period_us {
                    params["period_us"] = serde_json::json!(p);
                }
                serde_json::json!({
                    "method": "bdev_virtio_blk_set_hotplug",
                    "params": params,
                })
            }
        })
        .collect();
    serde_json::json!({"subsystems": [{"subsystem": "bdev", "config": config}]})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attach(calls: &[ConfigCall]) -> Vec<AttachParams> {
        calls
            .iter()
            .map(|c| match c {
                ConfigCall::Attach(p) => p.clone(),
                other => panic!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn the_seeds_snippets_parse() {
        let a = attach(&parse("[Virtio]\nDev User /tmp/vhost.0\n", "s.ini").unwrap());
        assert_eq!(a.len(), 1);
        assert_eq!(
            (
                a[0].name.as_str(),
                a[0].trtype,
                a[0].traddr.as_str(),
                a[0].dev_type
            ),
            ("VirtioScsi0", TrType::User, "/tmp/vhost.0", DevType::Scsi)
        );
        let a = attach(&parse("[Virtio]\n  Dev Pci\n", "s.ini").unwrap());
        assert_eq!((a[0].trtype, a[0].traddr.as_str()), (TrType::Pci, "*"));
        let text = "# two\n[VirtioUser0]\n Path /tmp/a\n Queues 2\n Type Blk\n Name B0\n\n[VirtioUser1]\n Path /tmp/b\n[VirtioPci]\n Enable No\n";
        let a = attach(&parse(text, "s.ini").unwrap());
        assert_eq!(a.len(), 2);
        assert_eq!(
            (a[0].name.as_str(), a[0].vq_count, a[0].dev_type),
            ("B0", 2, DevType::Blk)
        );
        assert_eq!(
            (a[1].name.as_str(), a[1].dev_type),
            ("VirtioScsi1", DevType::Scsi)
        );
        assert!(is_ini(text) && !is_ini("{\"subsystems\":[]}"));
    }

    #[test]
    fn bad_ini_gets_line_numbers() {
        for (text, want) in [
            ("[Virtio]\nDev Usr /x\n", "s.ini:2:"),
            ("[Nope]\n", "s.ini:1: unknown section [Nope]"),
            ("Dev User /x\n", "s.ini:1: \"Dev\" outside a section"),
            (
                "[VirtioUser0]\nQueues 0\nPath /x\n",
                "s.ini:2: Queues must be 1..=65535",
            ),
            (
                "[VirtioUser3]\nQueues 2\n",
                "s.ini:1: [VirtioUser3] has no Path",
            ),
            ("[VirtioUser0\n", "s.ini:1: section header"),
        ] {
            let e = parse(text, "s.ini").unwrap_err().to_string();
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }

    #[test]
    fn json_equivalent_round_trips() {
        let calls = parse("[VirtioUser0]\nPath /tmp/a\nType Blk\n", "s.ini").unwrap();
        let doc = to_json(&calls);
        assert_eq!(crate::config::parse_config(&doc).unwrap(), calls);
    }

    /// INIs at the edges of what the reader takes. Each is either refused with file and
    /// line, or converts to JSON that the JSON loader takes back unchanged.
    const TRICKY: &[&str] = &[
        "[VirtioUser0]\nPath /a\nName A\n[VirtioUser1]\nPath /b\nName A\n",
        "[Virtio]\nDev User /a\n[VirtioUser0]\nPath /b\n",
        "[VirtioUser0]\nPath /a\n[VirtioUser0]\nPath /b\n",
        "[VirtioUser0]\nPath /a\nName A\n[VirtioUser0]\nPath /b\nName B\n",
        "[VirtioUser0]\nPath /a\nName A\x01B\n",
        "[VirtioUser0]\nPath /a\nName \x7f\n",
        "[VirtioUser0]\nPath /a\nName A\u{85}B\n",
        "[VirtioUser0]\nPath /a\nName A\u{a0}B\n",
        "[VirtioUser0]\nPath /a\nName A#B\n",
        "[VirtioUser0]\nPath /a\nName A\nName B\n",
        "[VirtioUser0]\nPath /a\nQueues 65535\nType blk\n",
        "[VirtioUser0]\nPath /a\nQueues 65536\n",
        "[VirtioUser99999999999999999999]\nPath /a\n",
        "[VirtioUser0]\nPath /a\nName VirtioScsi1\n[VirtioUser1]\nPath /b\n",
        "[VirtioUser0]\nPath /a\nType Blk\n[VirtioUser1]\nPath /b\nName VirtioBlk0\n",
        "[Virtio]\nDev User /a\nDev User /b\n[Virtio]\nDev User /c\n",
        "[Virtio]\nDev Pci\n[VirtioPci]\nEnable Yes\n",
        "[VirtioPci]\nEnable Yes\nEnable Yes\n",
        "[VirtioPci]\nEnable Yes\n[VirtioPci]\nEnable No\n",
        "[Virtio]\nDev User /a\n[VirtioUser1]\nPath /a\n",
        "[VirtioUser0]\nPath /a\r\nName X\r\n",
        "\u{feff}[Virtio]\nDev User /a\n",
        "",
    ];

    #[test]
    fn every_ini_the_reader_accepts_converts_to_json_the_json_loader_accepts() {
        for text in TRICKY {
            match parse(text, "t.ini") {
                Ok(calls) => {
                    let doc = to_json(&calls);
                    let back = crate::config::parse_config(&doc).unwrap_or_else(|e| {
                        panic!("{text:?} is accepted as INI but its JSON is refused: {e}")
                    });
                    assert_eq!(back, calls, "{text:?}");
                }
                Err(e) => {
                    let e = e.to_string();
                    assert!(e.starts_with("t.ini:"), "{text:?}: no file:line in {e}");
                }
            }
        }
    }

    #[test]
    fn duplicates_and_bad_names_are_refused_with_file_and_line() {
        for (text, want) in [
            (TRICKY[0], "t.ini:6: controller name \"A\" is used twice"),
            (
                TRICKY[1],
                "t.ini:3: controller name \"VirtioScsi0\" is used twice",
            ),
            (TRICKY[2], "t.ini:3: section [VirtioUser0] appears twice"),
            (TRICKY[3], "t.ini:4: section [VirtioUser0] appears twice"),
            (TRICKY[4], "t.ini:3: controller name"),
            (TRICKY[9], "t.ini:4: Name is given twice"),
            (
                TRICKY[13],
                "t.ini:4: controller name \"VirtioScsi1\" is used twice",
            ),
            (
                TRICKY[14],
                "t.ini:6: controller name \"VirtioBlk0\" is used twice",
            ),
            (TRICKY[15], "t.ini:4: section [Virtio] appears twice"),
            (TRICKY[16], "t.ini:4: "),
            (TRICKY[17], "t.ini:3: "),
            (TRICKY[19], "t.ini:4: "),
        ] {
            let e = parse(text, "t.ini")
                .map(|c| format!("{c:?}"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{text:?}: expected {want:?} in {e}");
        }
    }
}
