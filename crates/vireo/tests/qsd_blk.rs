//! vireo against qemu-storage-daemon's vhost-user-blk export.

mod common;

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use common::*;
use vireo_bdev::{IoBuf, IoError, IoOp, IoRequest};

fn pattern(len: usize, salt: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ salt)
        .collect()
}

#[test]
fn null_co_attach_reports_geometry_and_serial() {
    let q = Qsd::start(QsdOpts {
        backend: Backend::Null(1 << 30),
        lbs: 4096,
        ..Default::default()
    });
    let reg = registry();
    let b = attach_blk(&reg, &q.sock, 1);
    let i = b.info();
    assert_eq!(i.name, "VirtioBlk0");
    assert_eq!(i.block_size, 4096);
    assert_eq!(i.num_blocks, (1 << 30) / 4096);
    assert!(i.ops.read && i.ops.write && i.ops.flush);
    assert!(i.serial.is_some(), "qsd answers GET_ID");
    let mut ch = b.open_channel().unwrap();
    // null-co reads zeroes.
    let buf = IoBuf::Dma(b.alloc_buf(8192).unwrap());
    let c = ch.run(IoRequest::read(10, 2, buf, 1));
    c.result.unwrap();
    assert!(c.buf.unwrap().as_slice().iter().all(|&x| x == 0));
}

#[test]
fn file_data_round_trips_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), 64 << 20);
    // Data put in the file before attach is read by vireo.
    let theirs = pattern(64 * 1024, 7);
    {
        let mut f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
        f.seek(SeekFrom::Start(1 << 20)).unwrap();
        f.write_all(&theirs).unwrap();
        f.sync_all().unwrap();
    }
    let q = Qsd::start(QsdOpts {
        backend: Backend::File(img.clone()),
        ..Default::default()
    });
    let reg = registry();
    let b = attach_blk(&reg, &q.sock, 1);
    let mut ch = b.open_channel().unwrap();
    let c = ch.run(IoRequest::read(
        (1 << 20) / 512,
        128,
        IoBuf::Dma(b.alloc_buf(64 * 1024).unwrap()),
        1,
    ));
    c.result.unwrap();
    assert_eq!(c.buf.unwrap().as_slice(), &theirs[..]);

    // Data vireo writes (from a heap buffer: bounced) is found in the file.
    let ours = pattern(128 * 1024, 99);
    let c = ch.run(IoRequest::write(8192, 256, IoBuf::Heap(ours.clone()), 2));
    c.result.unwrap();
    ch.run(IoRequest::no_data(IoOp::Flush, 0, 0, 3))
        .result
        .unwrap();
    let mut f = std::fs::File::open(&img).unwrap();
    f.seek(SeekFrom::Start(8192 * 512)).unwrap();
    let mut got = vec![0u8; ours.len()];
    f.read_exact(&mut got).unwrap();
    assert_eq!(got, ours);

    // And a heap-buffer read is bounced back correctly.
    let c = ch.run(IoRequest::read(
        8192,
        256,
        IoBuf::Heap(vec![0; 128 * 1024]),
        4,
    ));
    c.result.unwrap();
    assert_eq!(c.buf.unwrap().as_slice(), &ours[..]);
    let st = b.iostat();
    assert_eq!(st.num_write_ops, 1);
    assert_eq!(st.bytes_written, 128 * 1024);
    drop(ch);
    assert_eq!(b.iostat().num_read_ops, 2);
}

#[test]
fn discard_and_write_zeroes_reach_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), 64 << 20);
    let q = Qsd::start(QsdOpts {
        backend: Backend::File(img.clone()),
        ..Default::default()
    });
    let reg = registry();
    let b = attach_blk(&reg, &q.sock, 1);
    assert!(b.info().ops.unmap && b.info().ops.write_zeroes);
    let mut ch = b.open_channel().unwrap();
    let mib = 1 << 20;
    // Fill 8 MiB at 4 MiB with non-zero data.
    let data = pattern(8 * mib, 3);
    ch.run(IoRequest::write(
        4 * mib as u64 / 512,
        (8 * mib / 512) as u64,
        IoBuf::Heap(data.clone()),
        1,
    ))
    .result
    .unwrap();
    ch.run(IoRequest::no_data(IoOp::Flush, 0, 0, 2))
        .result
        .unwrap();
    let allocated = std::fs::metadata(&img).unwrap().blocks();
    assert!(allocated >= (8 * mib / 512) as u64, "data is allocated");

    // Discard the first 4 MiB of it: the file gets a hole there.
    ch.run(IoRequest::no_data(
        IoOp::Unmap,
        4 * mib as u64 / 512,
        (4 * mib / 512) as u64,
        3,
    ))
    .result
    .unwrap();
    // Write zeroes over the next 2 MiB.
    ch.run(IoRequest::no_data(
        IoOp::WriteZeroes,
        8 * mib as u64 / 512,
        (2 * mib / 512) as u64,
        4,
    ))
    .result
    .unwrap();
    ch.run(IoRequest::no_data(IoOp::Flush, 0, 0, 5))
        .result
        .unwrap();

    let mut file = vec![0u8; 8 * mib];
    let mut f = std::fs::File::open(&img).unwrap();
    f.seek(SeekFrom::Start(4 * mib as u64)).unwrap();
    f.read_exact(&mut file).unwrap();
    assert!(
        file[..6 * mib].iter().all(|&x| x == 0),
        "discarded and zeroed ranges read zero"
    );
    assert_eq!(&file[6 * mib..], &data[6 * mib..], "the rest is untouched");
    let after = std::fs::metadata(&img).unwrap().blocks();
    assert!(
        after <= allocated - (4 * mib / 512) as u64,
        "discard punched a hole: {allocated} -> {after} sectors allocated"
    );
    // vireo reads the same.
    let c = ch.run(IoRequest::read(
        4 * mib as u64 / 512,
        (8 * mib / 512) as u64,
        IoBuf::Heap(vec![1; 8 * mib]),
        6,
    ));
    c.result.unwrap();
    assert_eq!(c.buf.unwrap().as_slice(), &file[..]);
}

#[test]
fn two_queues_serve_two_threads_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), 64 << 20);
    let q = Qsd::start(QsdOpts {
        backend: Backend::File(img),
        queues: 2,
        ..Default::default()
    });
    let reg = registry();
    let b = attach_blk(&reg, &q.sock, 2);
    assert_eq!(b.info().num_queues, 2);
    let mut handles = Vec::new();
    for t in 0..2u64 {
        let b = b.clone();
        handles.push(std::thread::spawn(move || {
            let mut ch = b.open_channel().unwrap();
            // Each thread verifies its own half with many I/Os in flight.
            let base = t * 32768;
            let mut done = Vec::new();
            let mut expected = std::collections::HashMap::new();
            for i in 0..64u64 {
                let data = pattern(4096, (t * 64 + i) as u8);
                let mut buf = b.alloc_buf(4096).unwrap();
                buf.as_mut_slice().copy_from_slice(&data);
                ch.submit(IoRequest::write(base + i * 8, 8, IoBuf::Dma(buf), i))
                    .unwrap();
                expected.insert(i, data);
            }
            while done.len() < 64 {
                ch.poll(&mut done);
            }
            assert!(done.iter().all(|c| c.result.is_ok()));
            done.clear();
            for i in 0..64u64 {
                let buf = b.alloc_buf(4096).unwrap();
                ch.submit(IoRequest::read(base + i * 8, 8, IoBuf::Dma(buf), i))
                    .unwrap();
            }
            while done.len() < 64 {
                ch.poll(&mut done);
            }
            for c in &done {
                c.result.as_ref().unwrap();
                assert_eq!(
                    c.buf.as_ref().unwrap().as_slice(),
                    &expected[&c.user_data][..]
                );
            }
            ch.stats()
        }));
    }
    for h in handles {
        let st = h.join().unwrap();
        assert_eq!(st.num_write_ops, 64);
        assert_eq!(st.num_read_ops, 64);
    }
    // A third channel finds no free queue: a clear error.
    let _a = b.open_channel().unwrap();
    let _b = b.open_channel().unwrap();
    let e = b.open_channel().unwrap_err().to_string();
    assert!(e.contains("request queues are in use"), "{e}");
}

#[test]
fn too_many_queues_is_a_clear_error() {
    let q = Qsd::start(QsdOpts::default());
    let reg = registry();
    let e = reg
        .attach(&blk_params("B", &q.sock, 4))
        .unwrap_err()
        .to_string();
    assert!(e.contains("vq_count=4") && e.contains("offers 1"), "{e}");
}

#[test]
fn large_io_is_split_and_verified() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), 128 << 20);
    let q = Qsd::start(QsdOpts {
        backend: Backend::File(img.clone()),
        ..Default::default()
    });
    let reg = registry();
    let b = attach_blk(&reg, &q.sock, 1);
    let lim = b.info().limits;
    // An I/O bigger than one device request can carry.
    let bytes = ((lim.max_rw_blocks * 512) as usize + 3 * 512).min(96 << 20);
    let blocks = (bytes / 512) as u64;
    let mut ch = b.open_channel().unwrap();
    let data = pattern(bytes, 5);
    let mut buf = b.alloc_buf(bytes).unwrap();
    buf.as_mut_slice().copy_from_slice(&data);
    ch.run(IoRequest::write(1, blocks, IoBuf::Dma(buf), 1))
        .result
        .unwrap();
    let c = ch.run(IoRequest::read(
        1,
        blocks,
        IoBuf::Dma(b.alloc_buf(bytes).unwrap()),
        2,
    ));
    c.result.unwrap();
    assert!(
        c.buf.unwrap().as_slice() == &data[..],
        "read back what was written"
    );
    let st = ch.stats();
    if blocks > lim.max_rw_blocks {
        assert!(
            st.device_requests >= 4,
            "split into several device requests: {st:?}"
        );
    }
    let mut f = std::fs::File::open(&img).unwrap();
    f.seek(SeekFrom::Start(512)).unwrap();
    let mut got = vec![0u8; bytes];
    f.read_exact(&mut got).unwrap();
    assert!(got == data, "the file holds the data");
}

#[test]
fn read_only_export_refuses_writes() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), 16 << 20);
    let q = Qsd::start(QsdOpts {
        backend: Backend::File(img),
        read_only: true,
        ..Default::default()
    });
    let reg = registry();
    let b = attach_blk(&reg, &q.sock, 1);
    assert!(b.info().read_only);
    let mut ch = b.open_channel().unwrap();
    let r = ch.submit(IoRequest::write(0, 8, IoBuf::Heap(vec![1; 4096]), 1));
    let e = r.unwrap_err();
    assert!(matches!(e.error, IoError::ReadOnly(_)), "{e}");
    assert!(e.to_string().contains("read-only"));
    let e = ch
        .submit(IoRequest::no_data(IoOp::Unmap, 0, 8, 2))
        .unwrap_err();
    assert!(matches!(e.error, IoError::ReadOnly(_)));
    ch.run(IoRequest::read(0, 8, IoBuf::Heap(vec![1; 4096]), 3))
        .result
        .unwrap();
}

#[test]
fn out_of_range_and_bad_buffers_are_refused() {
    let q = Qsd::start(QsdOpts {
        backend: Backend::Null(1 << 20),
        ..Default::default()
    });
    let reg = registry();
    let b = attach_blk(&reg, &q.sock, 1);
    let n = b.info().num_blocks;
    let mut ch = b.open_channel().unwrap();
    let e = ch
        .submit(IoRequest::read(n - 1, 2, IoBuf::Heap(vec![0; 1024]), 1))
        .unwrap_err();
    assert!(matches!(e.error, IoError::OutOfRange { .. }), "{e}");
    let e = ch
        .submit(IoRequest::read(u64::MAX, 2, IoBuf::Heap(vec![0; 1024]), 1))
        .unwrap_err();
    assert!(matches!(e.error, IoError::OutOfRange { .. }), "{e}");
    let e = ch
        .submit(IoRequest::read(0, 2, IoBuf::Heap(vec![0; 1000]), 1))
        .unwrap_err();
    assert!(matches!(e.error, IoError::InvalidBuffer(_)), "{e}");
    let e = ch
        .submit(IoRequest::read(0, 0, IoBuf::Heap(vec![]), 1))
        .unwrap_err();
    assert!(matches!(e.error, IoError::InvalidRequest(_)), "{e}");
    // The last block is fine.
    ch.run(IoRequest::read(n - 1, 1, IoBuf::Heap(vec![1; 512]), 2))
        .result
        .unwrap();
}

#[test]
fn missing_socket_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let reg = registry();
    let e = reg
        .attach(&blk_params("B", &dir.path().join("nope.sock"), 1))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("cannot connect") && e.contains("nope.sock"),
        "{e}"
    );
}

#[test]
fn a_socket_that_is_not_vhost_user_is_a_clear_error() {
    use std::os::unix::net::UnixListener;
    let dir = tempfile::tempdir().unwrap();
    // A server that answers with garbage.
    let path = dir.path().join("garbage.sock");
    let l = UnixListener::bind(&path).unwrap();
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            let _ =
                s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\nthis is not vhost-user at all...");
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    let p = path.clone();
    let e = within(20, "attach to a garbage socket", move || {
        registry()
            .attach(&blk_params("B", &p, 1))
            .unwrap_err()
            .to_string()
    });
    assert!(e.contains("vhost-user"), "{e}");

    // A server that accepts and never answers: bounded by the reply timeout.
    let path = dir.path().join("silent.sock");
    let l = UnixListener::bind(&path).unwrap();
    std::thread::spawn(move || {
        let mut keep = Vec::new();
        for s in l.incoming().flatten() {
            keep.push(s);
        }
    });
    let mem = vireo_virtio::DmaMemory::new(vireo_virtio::DmaConfig {
        initial_region_size: 1 << 20,
        ..Default::default()
    })
    .unwrap();
    let e = within(20, "attach to a silent socket", move || {
        vireo_virtio::VhostUserTransport::connect_with_timeout(&path, mem, Duration::from_secs(1))
            .unwrap_err()
            .to_string()
    });
    assert!(e.contains("vhost-user"), "{e}");
}

#[test]
fn target_closing_mid_run_fails_io_without_hanging() {
    let mut q = Qsd::start(QsdOpts::default());
    let reg = registry();
    let b = attach_blk(&reg, &q.sock, 1);
    let mut ch = b.open_channel().unwrap();
    let bufs: Vec<_> = (0..32).map(|_| b.alloc_buf(4096).unwrap()).collect();
    for (i, buf) in bufs.into_iter().enumerate() {
        ch.submit(IoRequest::read(i as u64 * 8, 8, IoBuf::Dma(buf), i as u64))
            .unwrap();
    }
    let mut done = Vec::new();
    // Run a while, then kill the target with I/O in flight.
    let start = std::time::Instant::now();
    let mut killed = false;
    let mut errors = 0;
    let mut last_error = None;
    while ch.in_flight() > 0 {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "I/O hung after the target died"
        );
        ch.poll(&mut done);
        for c in done.drain(..) {
            match c.result {
                // Keep I/O in flight across the kill: reads that completed before the
                // target died go out again, so some are on the ring when it dies.
                Ok(()) => {
                    let ud = c.user_data;
                    ch.submit(IoRequest::read(ud * 8, 8, c.buf.unwrap(), ud))
                        .unwrap();
                }
                Err(e) => {
                    errors += 1;
                    last_error = Some(e);
                }
            }
        }
        if !killed && start.elapsed() > Duration::from_millis(300) {
            q.kill();
            killed = true;
        }
    }
    assert!(errors > 0, "in-flight I/O failed");
    assert_eq!(last_error, Some(IoError::Disconnected));
    // New I/O fails at once with the same clear error.
    let c = ch.run(IoRequest::read(0, 8, IoBuf::Heap(vec![0; 4096]), 99));
    assert_eq!(c.result, Err(IoError::Disconnected));
    let ctrl = reg.controllers();
    assert!(
        ctrl[0].1.as_deref().unwrap_or("").contains("closed"),
        "{ctrl:?}"
    );
}
