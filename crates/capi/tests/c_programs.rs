//! The library as C programs see it: installed by scripts/install-libblkio.sh, found by
//! pkg-config, its layouts checked at compile time (tests/c/abi.c), every function of
//! blkio.h exported, and tests/c/blkio_test.c run against real devices in both wait
//! modes: qemu-storage-daemon's vhost-user-blk, and `vireo target` (blk with 4 KiB
//! blocks; scsi with two LUNs).
//!
//! Needs the library and the vireo binary built first (`cargo build -p vireo-capi -p
//! vireo`; scripts/test.sh does), cc, pkg-config, nm and readelf, and
//! qemu-storage-daemon.

mod common;

use std::collections::BTreeSet;
use std::process::Command;

use common::{blkio_test, c_source, compile, installed, run, Peer, Prefix};

fn prefix() -> &'static Prefix {
    installed("c_programs")
}

#[test]
fn install_script_lays_out_a_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let pfx = dir.path().join("p");
    let first = common::run_install_script(&pfx);
    // Idempotent: a second run over the same prefix succeeds and leaves the same files.
    let second = common::run_install_script(&pfx);
    assert_eq!(first, second);

    let lib = pfx.join("lib");
    let real = lib.join("libblkio.so.1.5.0");
    assert!(real.is_file(), "{first}");
    assert_eq!(
        std::fs::read_link(lib.join("libblkio.so.1")).unwrap(),
        std::path::Path::new("libblkio.so.1.5.0")
    );
    assert_eq!(
        std::fs::read_link(lib.join("libblkio.so")).unwrap(),
        std::path::Path::new("libblkio.so.1")
    );
    assert!(lib.join("libblkio.a").is_file());
    assert_eq!(
        std::fs::read(pfx.join("include/blkio.h")).unwrap(),
        std::fs::read(common::repo().join("crates/capi/include/blkio.h")).unwrap()
    );
    let p = Prefix {
        prefix: pfx.clone(),
        bin: pfx.clone(),
    };
    assert_eq!(p.pkg_config(&["--modversion"]), ["1.5.0"]);
    let libs = p.pkg_config(&["--libs"]);
    assert_eq!(libs, [format!("-L{}", lib.display()), "-lblkio".into()]);
    assert_eq!(
        p.pkg_config(&["--cflags"]),
        [format!("-I{}", pfx.join("include").display())]
    );

    // The SONAME programs record as NEEDED.
    let dynamic = Command::new("readelf")
        .arg("-d")
        .arg(&real)
        .output()
        .unwrap();
    let dynamic = String::from_utf8_lossy(&dynamic.stdout);
    assert!(
        dynamic.contains("Library soname: [libblkio.so.1]"),
        "{dynamic}"
    );
}

#[test]
fn abi_asserts_compile() {
    let p = prefix();
    compile(
        p,
        &c_source("abi.c"),
        &p.bin.join("abi.o"),
        &["-std=c11", "-c"],
    );
}

/// The names of the functions blkio.h declares: identifiers starting with blkio_ or
/// blkioq_ followed by `(`, outside comments.
fn header_functions(text: &str) -> BTreeSet<String> {
    // Drop /* ... */ comments, then // comments.
    let mut code = String::new();
    let mut rest = text;
    while let Some(i) = rest.find("/*") {
        code.push_str(&rest[..i]);
        match rest[i..].find("*/") {
            Some(j) => rest = &rest[i + j + 2..],
            None => rest = "",
        }
    }
    code.push_str(rest);
    let code: String = code
        .lines()
        .map(|l| l.split("//").next().unwrap())
        .collect::<Vec<_>>()
        .join("\n");

    let bytes = code.as_bytes();
    let ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let mut names = BTreeSet::new();
    let mut i = 0;
    while i < bytes.len() {
        if ident(bytes[i]) && (i == 0 || !ident(bytes[i - 1])) {
            let start = i;
            while i < bytes.len() && ident(bytes[i]) {
                i += 1;
            }
            let word = &code[start..i];
            let mut j = i;
            while j < bytes.len() && bytes[j].is_ascii_whitespace() {
                j += 1;
            }
            if (word.starts_with("blkio_") || word.starts_with("blkioq_"))
                && bytes.get(j) == Some(&b'(')
            {
                names.insert(word.to_string());
            }
        } else {
            i += 1;
        }
    }
    names
}

#[test]
fn header_parser_finds_declarations_only() {
    let t = "/* blkio_not_this(void) */\nint blkio_a(void);\nvoid blkioq_b (int x); // blkio_c(\n\
             struct blkio_mem_region { int blkio_field; };\nint xblkio_d(void);";
    let got: Vec<_> = header_functions(t).into_iter().collect();
    assert_eq!(got, ["blkio_a", "blkioq_b"]);
}

#[test]
fn every_header_function_is_exported() {
    let header = std::fs::read_to_string(common::repo().join("crates/capi/include/blkio.h"))
        .expect("blkio.h");
    let declared = header_functions(&header);
    assert!(
        declared.len() >= 40,
        "found only {} functions in blkio.h: {declared:?}",
        declared.len()
    );
    let lib = common::built_library();
    let out = Command::new("nm")
        .args(["-D", "--defined-only"])
        .arg(&lib)
        .output()
        .expect("nm must be installed (binutils)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let exported: BTreeSet<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let (_addr, kind, name) = (w.next()?, w.next()?, w.next()?);
            (kind == "T").then(|| name.split('@').next().unwrap().to_string())
        })
        .collect();
    let missing: Vec<_> = declared.difference(&exported).collect();
    assert!(
        missing.is_empty(),
        "declared in blkio.h but not exported by {}: {missing:?}",
        lib.display()
    );
    // And the other way: no blkio_ function the header does not declare.
    let extra: Vec<_> = exported
        .iter()
        .filter(|n| n.starts_with("blkio_") || n.starts_with("blkioq_"))
        .filter(|n| !declared.contains(*n))
        .collect();
    assert!(extra.is_empty(), "exported but not in blkio.h: {extra:?}");
}

#[test]
fn programs_need_libblkio_so_1() {
    let p = prefix();
    let bin = blkio_test(p);
    let out = Command::new("readelf").arg("-d").arg(bin).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("Shared library: [libblkio.so.1]"),
        "blkio_test should need libblkio.so.1:\n{text}"
    );
}

/// Run blkio_test in both modes against `peer` (`extra` is TARGET LUN for scsi); what
/// failed, with its FAIL lines.
fn blkio_test_both_modes(peer: &Peer, driver: &str, extra: &[&str], what: &str) -> Vec<String> {
    let p = prefix();
    let bin = blkio_test(p);
    let mut failures = Vec::new();
    for mode in ["poll", "fd"] {
        let name = format!("{what}-{mode}");
        let ran = run(
            p.command(bin)
                .arg(driver)
                .arg(&peer.sock)
                .arg(mode)
                .args(extra),
            peer.dir.path(),
            &name,
        );
        println!(
            "== blkio_test {driver} {mode} {extra:?}\n{}{}",
            ran.stdout, ran.stderr
        );
        if !ran.status.success() {
            let fails: Vec<&str> = ran
                .stdout
                .lines()
                .filter(|l| l.starts_with("FAIL") || l.starts_with("blkio_test "))
                .collect();
            failures.push(format!(
                "blkio_test {driver} {mode} {extra:?}: {}\n{}\n{}",
                ran.status,
                fails.join("\n"),
                ran.stderr
            ));
        }
    }
    failures
}

fn assert_passed(failures: Vec<String>, peer: &Peer) {
    assert!(
        failures.is_empty(),
        "{}\n--- peer log\n{}",
        failures.join("\n"),
        peer.log()
    );
}

#[test]
fn blkio_test_on_qemu_storage_daemon() {
    let qsd = Peer::qsd(64 << 20, 2);
    assert_passed(
        blkio_test_both_modes(&qsd, "virtio-blk-vhost-user", &[], "qsd"),
        &qsd,
    );
}

#[test]
fn blkio_test_on_vireo_target_blk_4k() {
    let t = Peer::vireo_target(&["--type", "blk", "--size", "64m", "--block-size", "4096"]);
    assert_passed(
        blkio_test_both_modes(&t, "virtio-blk-vhost-user", &[], "vt-blk"),
        &t,
    );
}

/// blkio_test linked with libblkio.a (and what `pkg-config --static` adds), run in poll
/// mode against `vireo target`.
#[test]
fn static_archive_links_and_runs() {
    let p = prefix();
    let out = p.bin.join("blkio_test_static");
    let private: Vec<String> = p
        .pkg_config(&["--static", "--libs"])
        .into_iter()
        .filter(|w| !w.starts_with("-L") && w != "-lblkio")
        .collect();
    let res = Command::new("cc")
        .args(["-Wall", "-Wextra", "-Werror"])
        .arg(c_source("blkio_test.c"))
        .args(p.pkg_config(&["--cflags"]))
        .arg(p.lib().join("libblkio.a"))
        .args(&private)
        .arg("-o")
        .arg(&out)
        .output()
        .expect("cc");
    assert!(
        res.status.success(),
        "linking libblkio.a with {private:?}:\n{}",
        String::from_utf8_lossy(&res.stderr)
    );
    let dynamic = Command::new("readelf")
        .arg("-d")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&dynamic.stdout).contains("libblkio"),
        "a program linked with libblkio.a needs no libblkio.so"
    );
    let t = Peer::vireo_target(&["--type", "blk", "--size", "64m"]);
    let ran = run(
        Command::new(&out)
            .arg("virtio-blk-vhost-user")
            .arg(&t.sock)
            .arg("poll"),
        t.dir.path(),
        "static",
    );
    println!("{}", ran.stdout);
    let fails: Vec<&str> = ran
        .stdout
        .lines()
        .filter(|l| l.starts_with("FAIL"))
        .collect();
    assert!(ran.status.success(), "{}\n{}", fails.join("\n"), ran.stderr);
}

#[test]
fn blkio_test_on_vireo_target_scsi_two_luns() {
    let t = Peer::vireo_target(&["--type", "scsi", "--luns", "2", "--size", "64m"]);
    let mut failures =
        blkio_test_both_modes(&t, "virtio-scsi-vhost-user", &["0", "0"], "vt-scsi-lun0");
    failures.extend(blkio_test_both_modes(
        &t,
        "virtio-scsi-vhost-user",
        &["0", "1"],
        "vt-scsi-lun1",
    ));
    assert_passed(failures, &t);
}
