//! The launcher run as it is in a container: ranks with their own stdio,
//! PMI descriptor and variables, and their exit codes reported.

use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::Command;

fn pipe() -> (std::fs::File, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: pipe(2) into a local array; both ends are owned below.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    use std::os::fd::FromRawFd;
    unsafe { (std::fs::File::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

#[test]
fn each_rank_writes_to_its_own_output_with_its_own_pmi_fd_and_rank_and_the_codes_come_back() {
    let (mut out0, w0) = pipe();
    let (mut out1, w1) = pipe();
    let (mut status, status_w) = pipe();
    let (pmi0, _p0) = std::os::unix::net::UnixStream::pair().unwrap();
    let (pmi1, _p1) = std::os::unix::net::UnixStream::pair().unwrap();
    let script = r#"echo "rank=$PMI_RANK fd=$(readlink /proc/self/fd/$PMI_FD)"; exit $((3 + PMI_RANK))"#;
    let n = |f: &dyn AsRawFd| f.as_raw_fd().to_string();
    let args = [
        "--status-fd".to_string(),
        n(&status_w),
        "--rank".into(),
        format!("0:0,{},2,{},7", n(&w0), n(&pmi0)),
        "--rank".into(),
        format!("1:0,{},2,{},7", n(&w1), n(&pmi1)),
        "--env".into(),
        "1:PMI_RANK=1".into(),
        "--env".into(),
        "1:NOT_IN_ITS_ENVIRONMENT=x".into(),
        "--".into(),
        "sh".into(),
        "-c".into(),
        format!("{script}; echo unreached"),
    ];
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_checkpoint-container-ranks"));
    cmd.args(&args).env("PMI_RANK", "0").env("PMI_FD", "7");
    // The fds must reach the launcher: clear close-on-exec on them.
    for fd in [w0.as_raw_fd(), w1.as_raw_fd(), status_w.as_raw_fd(), pmi0.as_raw_fd(), pmi1.as_raw_fd()] {
        unsafe { libc::fcntl(fd, libc::F_SETFD, 0) };
    }
    let code = cmd.status().unwrap();
    drop((w0, w1, status_w, pmi0, pmi1));
    let read = |f: &mut std::fs::File| {
        let mut s = String::new();
        f.read_to_string(&mut s).unwrap();
        s
    };
    let (o0, o1) = (read(&mut out0), read(&mut out1));
    assert!(o0.starts_with("rank=0 fd=socket:["), "{o0}");
    assert!(o1.starts_with("rank=1 fd=socket:["), "{o1}");
    assert_ne!(o0, o1.replace("rank=1", "rank=0"), "each rank has its own PMI socket");
    assert_eq!(read(&mut status), "codes 3 4\n");
    assert_eq!(code.code(), Some(3));
}
