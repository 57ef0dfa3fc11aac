//! Async verified I/O with vireo: attach a vhost-user-blk controller, then run many
//! concurrent tasks that each write stamped blocks, flush, read them back and compare,
//! on a tokio current-thread runtime.
//!
//! ```sh
//! qemu-storage-daemon --blockdev driver=file,node-name=d0,filename=disk.img \
//!   --export type=vhost-user-blk,id=e0,node-name=d0,addr.type=unix,addr.path=/tmp/vhost.0,writable=on &
//! cargo run -p vireo-bdev --example async_verify -- /tmp/vhost.0 [event|poll] [TASKS] [ROUNDS]
//! ```
//!
//! `event` (the default) drives completions from tokio's reactor: the channel's
//! completion eventfd is registered with `AsyncFd`, the driver task arms the queue,
//! awaits readability and reaps; the thread sleeps while I/O is in flight. `poll`
//! spawns [`AsyncChannel::drive_polling`] instead (lowest latency, one busy core).

use std::os::fd::{BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use tokio::io::unix::AsyncFd;
use vireo_bdev::{Armed, AsyncChannel, AttachParams, DevType, IoBuf, Registry, TrType};
use vireo_virtio::{DmaConfig, DmaMemory};

/// Register a duplicate of the queue's completion eventfd with tokio's reactor (the
/// duplicate shares the eventfd, so readiness is the queue's).
fn register(fd: std::os::fd::RawFd) -> AsyncFd<OwnedFd> {
    // SAFETY: `fd` is the channel's completion eventfd, open while the channel lives,
    // which outlives this borrow (it is duplicated at once).
    let dup = unsafe { BorrowedFd::borrow_raw(fd) }
        .try_clone_to_owned()
        .expect("dup the completion eventfd");
    // SAFETY: the AsyncFd owns `dup`, a valid open descriptor that stays open and the
    // same until the AsyncFd is dropped.
    unsafe { AsyncFd::register(dup) }
        .map_err(|e| e.to_string())
        .expect("register the completion eventfd")
}

/// Reap completions whenever the device signals one; sleeps in tokio's reactor.
async fn event_driver(ch: AsyncChannel) {
    let mut afd: Option<(std::os::fd::RawFd, AsyncFd<OwnedFd>)> = None;
    loop {
        match ch.arm() {
            Armed::Ready => {}
            Armed::Fd(fd) => {
                if afd.as_ref().is_none_or(|(f, _)| *f != fd) {
                    afd = Some((fd, register(fd)));
                }
                if let Some((_, a)) = &afd {
                    // Bounded: I/O time limits are checked when the channel is polled.
                    if let Ok(Ok(mut g)) =
                        tokio::time::timeout(Duration::from_millis(10), a.readable()).await
                    {
                        g.clear_ready();
                    }
                }
            }
            // Nothing in flight (or a polled transport): look again shortly.
            Armed::NoFd => tokio::time::sleep(Duration::from_micros(200)).await,
        }
        ch.reap();
    }
}

fn stamp(block: &mut [u8], lba: u64, round: u64) {
    for (i, w) in block.chunks_mut(8).enumerate() {
        let v = lba
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(round << 32)
            .wrapping_add(i as u64);
        w.copy_from_slice(&v.to_le_bytes()[..w.len()]);
    }
}

const USAGE: &str = "usage: async_verify SOCKET [event|poll] [TASKS] [ROUNDS]";

/// The command line.
#[derive(Debug, PartialEq)]
struct Args {
    sock: String,
    /// `event` or `poll`.
    mode: String,
    tasks: u64,
    rounds: u64,
}

/// The command line, `None` for `-h`/`--help`, or what is wrong with it.
fn parse_args(args: impl IntoIterator<Item = String>) -> Result<Option<Args>, String> {
    let mut args = args.into_iter();
    let sock = match args.next() {
        None => return Err("missing SOCKET (the vhost-user-blk socket to attach)".into()),
        Some(h) if h == "-h" || h == "--help" => return Ok(None),
        Some(s) => s,
    };
    let mode = args.next().unwrap_or_else(|| "event".into());
    if mode != "event" && mode != "poll" {
        return Err(format!("the mode is `event` or `poll`, not {mode:?}"));
    }
    let mut number = |what: &str, default: u64| match args.next() {
        None => Ok(default),
        Some(v) => v
            .parse::<u64>()
            .map_err(|e| format!("{what} must be a number, not {v:?}: {e}")),
    };
    let tasks = number("TASKS", 32)?;
    let rounds = number("ROUNDS", 50)?;
    if let Some(extra) = args.next() {
        return Err(format!("unexpected argument {extra:?}"));
    }
    Ok(Some(Args {
        sock,
        mode,
        tasks,
        rounds,
    }))
}

/// Say what went wrong and exit 2 (bad input or an unusable device, not a panic).
fn fail(msg: String) -> ! {
    eprintln!("async_verify: {msg}");
    std::process::exit(2)
}

fn main() {
    let Args {
        sock,
        mode,
        tasks,
        rounds,
    } = match parse_args(std::env::args().skip(1)) {
        Ok(Some(a)) => a,
        Ok(None) => {
            println!("{USAGE}");
            return;
        }
        Err(e) => {
            eprintln!("async_verify: {e}");
            eprintln!("{USAGE}");
            std::process::exit(2);
        }
    };

    let mem = DmaMemory::new(DmaConfig::default())
        .unwrap_or_else(|e| fail(format!("cannot set up DMA memory: {e}")));
    let reg = Registry::new(mem);
    let bdev = reg
        .attach(&AttachParams {
            wwpn: None,
            name: "VirtioBlk0".into(),
            trtype: TrType::User,
            traddr: sock.clone(),
            dev_type: DevType::Blk,
            vq_count: 1,
            vq_size: 128,
            io_timeout: None,
            reconnect_timeout: None,
            packed_ring: Default::default(),
        })
        .unwrap_or_else(|e| fail(format!("attach {sock}: {e}")))
        .pop()
        .unwrap_or_else(|| fail(format!("{sock}: the controller has no bdev")));
    let info = bdev.info();
    let bs = info.block_size as usize;
    let blocks_per_io = (4096 / bs).max(1) as u64;
    let io = blocks_per_io as usize * bs;
    if tasks.saturating_mul(blocks_per_io) > info.num_blocks {
        fail(format!("the disk is too small for {tasks} tasks"));
    }
    let ch = AsyncChannel::new(bdev.open_channel().expect("channel"));

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let local = tokio::task::LocalSet::new();
    let start = Instant::now();
    let polling = mode == "poll";
    let (ios, bad) = local.block_on(&rt, async move {
        let driver = if polling {
            tokio::task::spawn_local(ch.drive_polling())
        } else {
            tokio::task::spawn_local(event_driver(ch.clone()))
        };
        let mut handles = Vec::new();
        for t in 0..tasks {
            let ch = ch.clone();
            let bdev = bdev.clone();
            handles.push(tokio::task::spawn_local(async move {
                let (mut ios, mut bad) = (0u64, 0u64);
                // Each task owns its blocks: no two tasks touch the same LBA.
                let lba = t * blocks_per_io;
                let mut buf = IoBuf::Dma(bdev.alloc_buf(io).expect("buffer"));
                let mut back = IoBuf::Dma(bdev.alloc_buf(io).expect("buffer"));
                let mut expect = vec![0u8; io];
                for round in 0..rounds {
                    for (k, b) in expect.chunks_mut(bs).enumerate() {
                        stamp(b, lba + k as u64, round);
                    }
                    buf.as_mut_slice().copy_from_slice(&expect);
                    let c = ch.write(lba, blocks_per_io, buf).await;
                    c.result.expect("write");
                    buf = c.buf.expect("the buffer comes back");
                    if round % 10 == 9 {
                        ch.flush().await.result.expect("flush");
                    }
                    back.as_mut_slice().fill(0);
                    let c = ch.read(lba, blocks_per_io, back).await;
                    c.result.expect("read");
                    back = c.buf.expect("the buffer comes back");
                    if back.as_slice() != &expect[..] {
                        bad += 1;
                    }
                    ios += 2;
                }
                (ios, bad)
            }));
        }
        let (mut ios, mut bad) = (0, 0);
        for h in handles {
            let (i, b) = h.await.expect("task");
            ios += i;
            bad += b;
        }
        if polling {
            // The polling driver ends by itself once it holds the last handle.
            drop(ch);
            tokio::time::timeout(Duration::from_secs(5), driver)
                .await
                .expect("the polling driver ends when the channel's last handle goes")
                .expect("driver task");
        } else {
            driver.abort();
        }
        (ios, bad)
    });
    let secs = start.elapsed().as_secs_f64();
    println!(
        "async_verify ({mode}): {tasks} tasks x {rounds} rounds: {ios} I/Os in {secs:.2} s ({:.0} IOPS), {bad} verify failures",
        ios as f64 / secs
    );
    if bad > 0 {
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Option<Args>, String> {
        parse_args(args.iter().map(|a| a.to_string()))
    }

    #[test]
    fn without_arguments_it_is_a_usage_error_not_a_panic() {
        assert!(parse(&[]).unwrap_err().contains("missing SOCKET"));
        assert_eq!(parse(&["--help"]), Ok(None));
        assert_eq!(
            parse(&["/tmp/vhost.0"]),
            Ok(Some(Args {
                sock: "/tmp/vhost.0".into(),
                mode: "event".into(),
                tasks: 32,
                rounds: 50
            }))
        );
        assert_eq!(parse(&["s", "poll", "4", "5"]).unwrap().unwrap().rounds, 5);
        assert!(parse(&["s", "busy"])
            .unwrap_err()
            .contains("`event` or `poll`"));
        assert!(parse(&["s", "poll", "many"]).unwrap_err().contains("TASKS"));
        assert!(parse(&["s", "poll", "1", "x"])
            .unwrap_err()
            .contains("ROUNDS"));
        assert!(parse(&["s", "poll", "1", "2", "3"]).is_err());
    }
}
