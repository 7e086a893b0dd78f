//! The workload the checkpoint tests run inside an Apptainer container.
//!
//! It is built so that a wrong restore cannot go unnoticed:
//! - it fills `--mem-mib` of memory with a deterministic pattern (half
//!   pseudo-random, half compressible) and keeps a running checksum that
//!   depends on that memory, on a counter, on a second thread and on a child
//!   process reached through pipes;
//! - every step it prints `counter=N checksum=X` to stdout and appends the
//!   same line to `--out` (a file on a bind mount, opened O_APPEND);
//! - at the end it re-hashes all of its memory and prints
//!   `done counter=N checksum=X memhash=Y`.
//!
//! `--expect` computes that final line without sleeping: it is what an
//! uninterrupted run prints, so a restored run must print exactly it.

use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::mpsc;
use std::time::Duration;

const PAGE: usize = 4096;

struct Args {
    mem_mib: usize,
    steps: u64,
    interval_ms: u64,
    out: Option<String>,
    expect: bool,
}

fn parse_args() -> Args {
    let mut a = Args { mem_mib: 64, steps: 100, interval_ms: 100, out: None, expect: false };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| usage(&format!("{arg} needs a value")));
        match arg.as_str() {
            "--mem-mib" => a.mem_mib = value().parse().unwrap_or_else(|_| usage("bad --mem-mib")),
            "--steps" => a.steps = value().parse().unwrap_or_else(|_| usage("bad --steps")),
            "--interval-ms" => a.interval_ms = value().parse().unwrap_or_else(|_| usage("bad --interval-ms")),
            // "%t" becomes the Slurm task id, for multi-task steps.
            "--out" => a.out = Some(value().replace("%t", &std::env::var("SLURM_PROCID").unwrap_or_default())),
            "--expect" => a.expect = true,
            _ => usage(&format!("unknown argument {arg}")),
        }
    }
    a
}

fn usage(why: &str) -> ! {
    eprintln!("ckpt-workload: {why}\nusage: ckpt-workload [--mem-mib N] [--steps N] [--interval-ms MS] [--out FILE] [--expect]");
    std::process::exit(2)
}

fn xorshift(mut x: u64) -> u64 {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    x
}

/// First half of the pages pseudo-random (incompressible), second half a
/// repeating pattern (compressible).
fn fill(mem: &mut [u64]) {
    let half = mem.len() / 2;
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for (i, w) in mem.iter_mut().enumerate() {
        *w = if i < half {
            x = xorshift(x);
            x
        } else {
            (i as u64 % 512) * 0x0101_0101_0101_0101
        };
    }
}

/// One step: rewrite one page chosen by the counter and fold it into the sum.
fn step(mem: &mut [u64], counter: u64) -> u64 {
    let words = PAGE / 8;
    let pages = mem.len() / words;
    let page = (xorshift(counter + 1) as usize) % pages;
    let chunk = &mut mem[page * words..(page + 1) * words];
    let mut sum = 0u64;
    for (i, w) in chunk.iter_mut().enumerate() {
        *w = xorshift(*w ^ counter ^ i as u64);
        sum = sum.wrapping_mul(31).wrapping_add(*w);
    }
    sum
}

fn memhash(mem: &[u64]) -> u64 {
    mem.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, w| (h ^ w).wrapping_mul(0x100_0000_01b3))
}

/// The child's part of the checksum: what it answers for a counter.
fn child_answer(counter: u64) -> u64 {
    xorshift(counter.wrapping_mul(0x2545_F491_4F6C_DD1D) | 1)
}

fn pipe() -> (std::fs::File, std::fs::File) {
    let mut fds = [0; 2];
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0, "pipe");
    unsafe { (std::fs::File::from(OwnedFd::from_raw_fd(fds[0])), std::fs::File::from(OwnedFd::from_raw_fd(fds[1]))) }
}

/// Forks the helper child: it reads counters from one pipe and writes its
/// answers to the other, until the parent closes the pipe.
fn spawn_child() -> (std::fs::File, std::fs::File) {
    let (to_child_r, to_child_w) = pipe();
    let (from_child_r, from_child_w) = pipe();
    match unsafe { libc::fork() } {
        -1 => panic!("fork failed"),
        0 => {
            drop(to_child_w);
            drop(from_child_r);
            let (mut r, mut w) = (to_child_r, from_child_w);
            let mut buf = [0u8; 8];
            while r.read_exact(&mut buf).is_ok() {
                let answer = child_answer(u64::from_le_bytes(buf));
                if w.write_all(&answer.to_le_bytes()).is_err() {
                    break;
                }
            }
            unsafe { libc::_exit(0) }
        }
        _ => (to_child_w, from_child_r),
    }
}

fn main() {
    let args = parse_args();
    // The child is forked first, so it shares none of the big buffer.
    let mut child = if args.expect { None } else { Some(spawn_child()) };
    let mut mem = vec![0u64; args.mem_mib * 1024 * 1024 / 8];
    fill(&mut mem);

    // The second thread folds each step's sum into the running checksum.
    let (work_tx, work_rx) = mpsc::channel::<(u64, u64, u64)>();
    let (sum_tx, sum_rx) = mpsc::channel::<u64>();
    std::thread::spawn(move || {
        let mut checksum = 0u64;
        for (counter, page_sum, answer) in work_rx {
            checksum = xorshift(checksum ^ page_sum ^ answer.rotate_left(counter as u32 % 64));
            sum_tx.send(checksum).unwrap();
        }
    });

    let mut out = args
        .out
        .as_ref()
        .map(|p| std::fs::OpenOptions::new().create(true).append(true).open(p).unwrap_or_else(|e| usage(&format!("cannot open {p}: {e}"))));
    let stdout = std::io::stdout();
    let mut checksum = 0;
    for counter in 1..=args.steps {
        let page_sum = step(&mut mem, counter);
        let answer = match &mut child {
            Some((to, from)) => {
                to.write_all(&counter.to_le_bytes()).expect("child gone");
                let mut buf = [0u8; 8];
                from.read_exact(&mut buf).expect("child gone");
                u64::from_le_bytes(buf)
            }
            None => child_answer(counter),
        };
        work_tx.send((counter, page_sum, answer)).unwrap();
        checksum = sum_rx.recv().unwrap();
        if args.expect {
            continue;
        }
        let line = format!("counter={counter} checksum={checksum:016x}\n");
        stdout.lock().write_all(line.as_bytes()).unwrap();
        if let Some(f) = &mut out {
            f.write_all(line.as_bytes()).unwrap();
        }
        std::thread::sleep(Duration::from_millis(args.interval_ms));
    }
    let line = format!("done counter={} checksum={checksum:016x} memhash={:016x}\n", args.steps, memhash(&mem));
    stdout.lock().write_all(line.as_bytes()).unwrap();
    if let Some(f) = &mut out {
        f.write_all(line.as_bytes()).unwrap();
    }
    drop(child);
    unsafe { libc::wait(std::ptr::null_mut()) };
}
