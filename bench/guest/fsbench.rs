//! In-guest file system benchmark for bench/mounts.ts (std only, built
//! static by the bench with rustc and staged into the VM).
//!
//! usage: fsbench <dir> <files>
//! In <dir>: writes then reads a 64 MiB file sequentially (1 MiB calls),
//! creates <files> files of 100 bytes, stats each (first time), waits 0.6 s
//! (past the mount's 0.5 s cache timeout) and stats each again (cached out),
//! stats one file <files> times (cached), reads each. Prints one JSON line.

use std::fs;
use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

fn stat_all(dir: &Path, n: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        fs::metadata(dir.join(format!("f{}", i))).unwrap();
        out.push(ms(t));
    }
    out
}

fn list(v: &[f64]) -> String {
    let parts: Vec<String> = v.iter().map(|x| format!("{:.4}", x)).collect();
    format!("[{}]", parts.join(","))
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let dir = Path::new(&a[1]).join(".fsbench-work");
    let n: usize = a[2].parse().unwrap();
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(dir.join("many")).unwrap();
    let buf = vec![7u8; 1 << 20];
    let big = dir.join("big");
    let t = Instant::now();
    let mut f = fs::File::create(&big).unwrap();
    for _ in 0..64 {
        f.write_all(&buf).unwrap();
    }
    f.sync_all().unwrap();
    drop(f);
    let write_ms = ms(t);
    // Drop the guest's page cache so the read comes from the file system.
    let _ = fs::write("/proc/sys/vm/drop_caches", b"3");
    let mut rb = vec![0u8; 1 << 20];
    let t = Instant::now();
    let mut f = fs::File::open(&big).unwrap();
    let mut got = 0usize;
    loop {
        let r = f.read(&mut rb).unwrap();
        if r == 0 {
            break;
        }
        got += r;
    }
    let read_ms = ms(t);
    assert_eq!(got, 64 << 20);
    let many = dir.join("many");
    let small = vec![b'x'; 100];
    let t = Instant::now();
    for i in 0..n {
        fs::write(many.join(format!("f{}", i)), &small).unwrap();
    }
    let create_ms = ms(t);
    let first = stat_all(&many, n);
    std::thread::sleep(Duration::from_millis(600));
    let expired = stat_all(&many, n);
    // Cached: the same file again and again (well within the cache timeout).
    let mut hot = Vec::with_capacity(n);
    let f0 = many.join("f0");
    fs::metadata(&f0).unwrap();
    for _ in 0..n {
        let t = Instant::now();
        fs::metadata(&f0).unwrap();
        hot.push(ms(t));
    }
    let t = Instant::now();
    for i in 0..n {
        let b = fs::read(many.join(format!("f{}", i))).unwrap();
        assert_eq!(b.len(), 100);
    }
    let read_small_ms = ms(t);
    let _ = fs::remove_dir_all(&dir);
    println!(
        "{{\"writeMs\":{:.3},\"readMs\":{:.3},\"createMs\":{:.3},\"readSmallMs\":{:.3},\"first\":{},\"expired\":{},\"hot\":{}}}",
        write_ms,
        read_ms,
        create_ms,
        read_small_ms,
        list(&first),
        list(&expired),
        list(&hot)
    );
}
