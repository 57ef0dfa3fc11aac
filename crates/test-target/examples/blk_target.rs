//! Runs the vhost-user-blk test target on its own, for poking at it with another front-end:
//!
//! ```text
//! cargo run -p vireo-target --example blk_target -- /tmp/blk.sock --ram 1G --queues 2 --seconds 30
//! ```
//!
//! Prints the target's counters when it ends (after `--seconds`, or never without it).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use vireo_target::{spawn_blk_target, Backing, BlkTargetConfig};

const USAGE: &str = "usage: blk_target SOCKET [--ram SIZE | --file PATH [--file-size SIZE]] \
[--block-size N] [--queues N] [--queue-size N] [--seg-max N] [--size-max N] \
[--max-discard-sectors N] [--max-discard-seg N] [--read-only] [--no-event-idx] [--seconds N]";

/// Parses `512`, `4K`, `64M`, `1G`, `2T` (binary units).
fn parse_size(s: &str) -> Result<u64, String> {
    let (digits, shift) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 30),
        Some('T' | 't') => (&s[..s.len() - 1], 40),
        _ => (s, 0),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
        .ok_or_else(|| format!("bad size {s:?}"))
}

fn parse_args() -> Result<(PathBuf, BlkTargetConfig, Option<Duration>), String> {
    let mut args = std::env::args().skip(1);
    let socket = PathBuf::from(args.next().ok_or("missing SOCKET")?);
    let mut cfg = BlkTargetConfig::default();
    let mut file: Option<PathBuf> = None;
    let mut file_size = None;
    let mut seconds = None;
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or(format!("{flag} needs a value"));
        let number = |v: String| v.parse::<u32>().map_err(|e| format!("{flag}: {e}"));
        match flag.as_str() {
            "--ram" => {
                cfg.backend = Backing::Ram {
                    size_bytes: parse_size(&value()?)?,
                }
            }
            "--file" => file = Some(PathBuf::from(value()?)),
            "--file-size" => file_size = Some(parse_size(&value()?)?),
            "--block-size" => cfg.block_size = number(value()?)?,
            "--queues" => {
                cfg.num_queues = u16::try_from(number(value()?)?).map_err(|e| e.to_string())?
            }
            "--queue-size" => {
                cfg.queue_size = u16::try_from(number(value()?)?).map_err(|e| e.to_string())?
            }
            "--seg-max" => cfg.seg_max = number(value()?)?,
            "--size-max" => cfg.size_max = parse_size(&value()?)? as u32,
            "--max-discard-sectors" => cfg.max_discard_sectors = number(value()?)?,
            "--max-discard-seg" => cfg.max_discard_seg = number(value()?)?,
            "--read-only" => cfg.read_only = true,
            "--no-event-idx" => cfg.event_idx = false,
            "--seconds" => seconds = Some(Duration::from_secs(u64::from(number(value()?)?))),
            other => return Err(format!("unknown flag {other}")),
        }
    }
    if let Some(path) = file {
        cfg.backend = Backing::File {
            path,
            size_bytes: file_size,
        };
    }
    Ok((socket, cfg, seconds))
}

fn main() -> ExitCode {
    let (socket, cfg, seconds) = match parse_args() {
        Ok(parsed) => parsed,
        Err(e) => {
            eprintln!("blk_target: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let target = match spawn_blk_target(&socket, cfg) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("blk_target: {e}");
            return ExitCode::FAILURE;
        }
    };
    eprintln!(
        "serving {} sectors on {}",
        target.capacity_sectors(),
        socket.display()
    );
    let start = Instant::now();
    while seconds.is_none_or(|s| start.elapsed() < s) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let stats = target.stats();
    target.stop();
    println!("{stats:#?}");
    ExitCode::SUCCESS
}
