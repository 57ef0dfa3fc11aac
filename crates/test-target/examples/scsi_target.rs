//! Runs the vhost-user-scsi test target on its own, for poking at it with another front-end:
//!
//! ```text
//! cargo run -p vireo-target --example scsi_target -- /tmp/scsi.sock --targets 4 --luns 4 \
//!     --ram 256M --queues 2 --max-transfer 128 --max-unmap-desc 8 --seconds 30
//! ```
//!
//! With `--file-dir DIR`, every logical unit is a sparse file `DIR/t<target>l<lun>.img` of
//! `--file-size` bytes (created if missing). Prints the target's counters when it ends (after
//! `--seconds`, or never without it).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use vireo_scsi::SenseFormat;
use vireo_target::{spawn_scsi_target, Backing, LunConfig, ScsiTargetConfig};

const USAGE: &str = "usage: scsi_target SOCKET [--targets N] [--luns N] \
[--ram SIZE | --file-dir DIR [--file-size SIZE]] [--block-size N] [--queues N] [--queue-size N] \
[--seg-max N] [--max-transfer BLOCKS] [--max-unmap-lba BLOCKS] [--max-unmap-desc N] \
[--max-write-same BLOCKS] [--no-unmap] [--no-write-same] [--no-16] [--read-only] \
[--power-on-ua] [--not-ready N] [--start-required] [--descriptor-sense] [--tmf-never-answer] \
[--seconds N]";

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

struct Args {
    socket: PathBuf,
    cfg: ScsiTargetConfig,
    seconds: Option<Duration>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = std::env::args().skip(1);
    let socket = PathBuf::from(args.next().ok_or("missing SOCKET")?);
    let mut cfg = ScsiTargetConfig::default();
    let mut lun = LunConfig::default();
    let (mut targets, mut luns) = (1u8, 1u16);
    let mut file_dir: Option<PathBuf> = None;
    let mut file_size = 1u64 << 30;
    let mut seconds = None;
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or(format!("{flag} needs a value"));
        let number = |v: String| v.parse::<u32>().map_err(|e| format!("{flag}: {e}"));
        match flag.as_str() {
            "--targets" => {
                targets = u8::try_from(number(value()?)?).map_err(|e| format!("{flag}: {e}"))?
            }
            "--luns" => {
                luns = u16::try_from(number(value()?)?).map_err(|e| format!("{flag}: {e}"))?
            }
            "--ram" => {
                lun.backend = Backing::Ram {
                    size_bytes: parse_size(&value()?)?,
                }
            }
            "--file-dir" => file_dir = Some(PathBuf::from(value()?)),
            "--file-size" => file_size = parse_size(&value()?)?,
            "--block-size" => lun.block_size = number(value()?)?,
            "--queues" => {
                cfg.num_request_queues =
                    u16::try_from(number(value()?)?).map_err(|e| format!("{flag}: {e}"))?
            }
            "--queue-size" => {
                cfg.queue_size =
                    u16::try_from(number(value()?)?).map_err(|e| format!("{flag}: {e}"))?
            }
            "--seg-max" => cfg.seg_max = number(value()?)?,
            "--max-transfer" => lun.limits.max_transfer_length = number(value()?)?,
            "--max-unmap-lba" => lun.limits.max_unmap_lba_count = number(value()?)?,
            "--max-unmap-desc" => lun.limits.max_unmap_descriptor_count = number(value()?)?,
            "--max-write-same" => lun.limits.max_write_same_length = u64::from(number(value()?)?),
            "--no-unmap" => lun.support_unmap = false,
            "--no-write-same" => lun.support_write_same = false,
            "--no-16" => lun.support_16 = false,
            "--read-only" => lun.read_only = true,
            "--power-on-ua" => cfg.power_on_unit_attention = true,
            "--not-ready" => lun.not_ready_tur_count = number(value()?)?,
            "--start-required" => lun.start_required = true,
            "--descriptor-sense" => cfg.sense_format = SenseFormat::Descriptor,
            "--tmf-never-answer" => cfg.tmf_never_answer = true,
            "--seconds" => seconds = Some(Duration::from_secs(u64::from(number(value()?)?))),
            other => return Err(format!("unknown flag {other}")),
        }
    }
    let grid = ScsiTargetConfig::grid(targets, luns, |t, l| {
        let mut unit = lun.clone();
        if let Some(dir) = &file_dir {
            unit.backend = Backing::File {
                path: dir.join(format!("t{t}l{l}.img")),
                size_bytes: Some(file_size),
            };
        }
        unit
    });
    cfg.luns = grid.luns;
    cfg.max_target = grid.max_target;
    Ok(Args {
        socket,
        cfg,
        seconds,
    })
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(parsed) => parsed,
        Err(e) => {
            eprintln!("scsi_target: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let target = match spawn_scsi_target(&args.socket, args.cfg) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("scsi_target: {e}");
            return ExitCode::FAILURE;
        }
    };
    eprintln!(
        "serving {} logical units on {}",
        target.luns().len(),
        args.socket.display()
    );
    let start = Instant::now();
    while args.seconds.is_none_or(|s| start.elapsed() < s) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let stats = target.stats();
    target.stop();
    println!("{stats:#?}");
    ExitCode::SUCCESS
}
