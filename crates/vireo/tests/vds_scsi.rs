//! vireo against vhost-device-scsi, a real vhost-user-scsi target (READ/WRITE(10) only,
//! no UNMAP, one request queue of at most 128 descriptors, never answers TMFs).

mod common;

use std::io::{Read, Seek, SeekFrom, Write};
use std::time::Duration;

use common::*;
use vireo_bdev::{IoBuf, IoError, IoOp, IoRequest};

fn pattern(len: usize, salt: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(29) ^ salt)
        .collect()
}

#[test]
fn scan_finds_every_lun_with_spdk_names() {
    let v = Vds::start(3, 32 << 20);
    let reg = registry();
    let bdevs = reg
        .attach(&scsi_params("VirtioScsi0", &v.sock, 1, 128))
        .unwrap_or_else(|e| panic!("attach: {e}\n{}", v.log()));
    let mut names: Vec<String> = bdevs.iter().map(|b| b.name().to_string()).collect();
    names.sort();
    assert_eq!(
        names,
        ["VirtioScsi0t0", "VirtioScsi0t0l1", "VirtioScsi0t0l2"]
    );
    for b in &bdevs {
        let i = b.info();
        assert_eq!(i.driver, "virtio_scsi");
        assert_eq!(i.block_size, 512);
        assert_eq!(i.num_blocks, (32 << 20) / 512);
        assert!(i.vendor.is_some() && i.product.is_some());
        assert!(!i.ops.unmap, "UNMAP is probed, not trusted from VPD B2");
        assert!(i.limits.max_rw_blocks <= 65535);
    }
}

#[test]
fn data_matches_the_image_files_and_flush_works() {
    let v = Vds::start(2, 16 << 20);
    // Data put in LUN 1's image before attach is read through vireo.
    let theirs = pattern(8192, 3);
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&v.images[1])
            .unwrap();
        f.seek(SeekFrom::Start(4096 * 10)).unwrap();
        f.write_all(&theirs).unwrap();
    }
    let reg = registry();
    let bdevs = reg.attach(&scsi_params("S", &v.sock, 1, 128)).unwrap();
    let lun1 = bdevs.iter().find(|b| b.name() == "St0l1").unwrap().clone();
    let lun0 = bdevs.iter().find(|b| b.name() == "St0").unwrap().clone();
    {
        let mut ch = lun1.open_channel().unwrap();
        let c = ch.run(IoRequest::read(80, 16, IoBuf::Heap(vec![0; 8192]), 1));
        c.result.unwrap();
        assert_eq!(c.buf.unwrap().as_slice(), &theirs[..]);
    }
    // Data vireo writes to LUN 0 is in LUN 0's image, and only there.
    let ours = pattern(256 * 1024, 9);
    let mut ch = lun0.open_channel().unwrap();
    ch.run(IoRequest::write(2048, 512, IoBuf::Heap(ours.clone()), 2))
        .result
        .unwrap();
    ch.run(IoRequest::no_data(IoOp::Flush, 0, 0, 3))
        .result
        .unwrap();
    let mut got = vec![0u8; ours.len()];
    let mut f = std::fs::File::open(&v.images[0]).unwrap();
    f.seek(SeekFrom::Start(2048 * 512)).unwrap();
    f.read_exact(&mut got).unwrap();
    assert!(got == ours, "LUN 0 image holds the data");
    let mut other = vec![0u8; ours.len()];
    let mut f = std::fs::File::open(&v.images[1]).unwrap();
    f.seek(SeekFrom::Start(2048 * 512)).unwrap();
    f.read_exact(&mut other).unwrap();
    assert!(other.iter().all(|&x| x == 0), "LUN 1 untouched");
    // Write zeroes as WRITE SAME(16).
    ch.run(IoRequest::no_data(IoOp::WriteZeroes, 2048, 8, 4))
        .result
        .unwrap();
    let c = ch.run(IoRequest::read(2048, 16, IoBuf::Heap(vec![1; 8192]), 5));
    let d = c.buf.unwrap();
    assert!(d.as_slice()[..4096].iter().all(|&x| x == 0));
    assert_eq!(&d.as_slice()[4096..], &ours[4096..8192]);
}

#[test]
fn verify_many_in_flight_and_large_io() {
    let v = Vds::start(1, 64 << 20);
    let reg = registry();
    let b = reg
        .attach(&scsi_params("S", &v.sock, 1, 128))
        .unwrap()
        .pop()
        .unwrap();
    let mut ch = b.open_channel().unwrap();
    // More I/O than ring slots, each written then read back.
    for i in 0..300u64 {
        ch.submit(IoRequest::write(
            i * 8,
            8,
            IoBuf::Heap(pattern(4096, i as u8)),
            i,
        ))
        .unwrap();
    }
    let mut done = Vec::new();
    while done.len() < 300 {
        ch.poll(&mut done);
    }
    assert!(
        done.iter().all(|c| c.result.is_ok()),
        "{:?}",
        done.iter().find(|c| c.result.is_err())
    );
    for i in (0..300u64).step_by(17) {
        let c = ch.run(IoRequest::read(
            i * 8,
            8,
            IoBuf::Heap(vec![0; 4096]),
            1000 + i,
        ));
        assert_eq!(c.buf.unwrap().as_slice(), &pattern(4096, i as u8)[..]);
    }
    // 40 MiB in one I/O: split into READ/WRITE(10)s of at most 65535 blocks.
    let len = 40 << 20;
    let data = pattern(len, 77);
    let w = ch.run(IoRequest::write(
        1,
        (len / 512) as u64,
        IoBuf::Heap(data.clone()),
        1,
    ));
    assert!(w.result.is_ok(), "{:?}: {}", w.result, v.log());
    let c = ch.run(IoRequest::read(
        1,
        (len / 512) as u64,
        IoBuf::Heap(vec![0; len]),
        2,
    ));
    c.result.unwrap();
    assert!(c.buf.unwrap().as_slice() == &data[..]);
}

#[test]
fn unanswered_reset_times_out_cleanly() {
    let v = Vds::start(1, 16 << 20);
    let reg = registry();
    let b = reg
        .attach(&scsi_params("S", &v.sock, 1, 128))
        .unwrap()
        .pop()
        .unwrap();
    let b2 = b.clone();
    let r = within(30, "LUN reset", move || {
        b2.reset(Duration::from_millis(500))
    });
    match r {
        Ok(()) => {}
        Err(IoError::Timeout(m)) => assert!(m.contains("LOGICAL UNIT RESET"), "{m}"),
        Err(e) => panic!("unexpected {e}"),
    }
    // I/O still works after the reset attempt.
    let mut ch = b.open_channel().unwrap();
    ch.run(IoRequest::read(0, 8, IoBuf::Heap(vec![0; 4096]), 1))
        .result
        .unwrap();
}

#[test]
fn cli_perf_verify_on_a_scsi_lun() {
    let v = Vds::start(1, 64 << 20);
    // No vq_size: the default must be one vhost-device-scsi accepts (at most 128; it
    // serves one connection, so a refused size cannot be retried).
    let conf = v.dir.path().join("scsi.json");
    let doc = serde_json::json!({"subsystems": [{"subsystem": "bdev", "config": [
        {"method": "bdev_virtio_attach_controller", "params": {
            "name": "VirtioScsi0", "trtype": "user",
            "traddr": v.sock.display().to_string(), "dev_type": "scsi"}}]}]});
    std::fs::write(&conf, doc.to_string()).unwrap();
    let j = perf_json(
        &conf,
        &[
            "-b",
            "VirtioScsi0t0",
            "-w",
            "verify",
            "-o",
            "4096",
            "-q",
            "32",
            "-t",
            "2",
        ],
    );

    assert_eq!(j["total"]["errors"], 0);
    assert_eq!(j["total"]["verify_failures"], 0);
    assert!(j["total"]["ios"].as_u64().unwrap() > 100);
}

#[test]
fn one_queue_serves_every_lun_of_a_thread() {
    // vhost-device-scsi has a single request queue: channels of one thread on several
    // LUNs share it, and a second thread finds no free queue.
    let v = Vds::start(3, 16 << 20);
    let reg = registry();
    let bdevs = reg.attach(&scsi_params("S", &v.sock, 1, 128)).unwrap();
    assert_eq!(bdevs.len(), 3);
    let mut chans: Vec<_> = bdevs.iter().map(|b| b.open_channel().unwrap()).collect();
    for (k, ch) in chans.iter_mut().enumerate() {
        for i in 0..40u64 {
            ch.submit(IoRequest::write(
                i * 8,
                8,
                IoBuf::Heap(pattern(4096, (k * 40) as u8 + i as u8)),
                i,
            ))
            .unwrap();
        }
    }
    let mut done = vec![Vec::new(), Vec::new(), Vec::new()];
    while done.iter().map(Vec::len).sum::<usize>() < 120 {
        for (k, ch) in chans.iter_mut().enumerate() {
            ch.poll(&mut done[k]);
        }
    }
    for d in &done {
        assert_eq!(d.len(), 40);
        assert!(d.iter().all(|c| c.result.is_ok()));
    }
    for (k, ch) in chans.iter_mut().enumerate() {
        let c = ch.run(IoRequest::read(8 * 7, 8, IoBuf::Heap(vec![0; 4096]), 999));
        assert_eq!(
            c.buf.unwrap().as_slice(),
            &pattern(4096, (k * 40) as u8 + 7)[..]
        );
    }
    let b0 = bdevs[0].clone();
    let e = std::thread::spawn(move || b0.open_channel().map(|_| ()).unwrap_err().to_string())
        .join()
        .unwrap();
    assert!(e.contains("in use"), "{e}");
}
