//! CRIU's image-streamer protocol (`criu --stream`), spoken by the helper.
//!
//! On dump CRIU hands over one pipe per image file and root writes, checksums
//! and (optionally) compresses the bytes as they arrive; on restore root
//! serves them back from the sealed checkpoint, verifying them as it goes.
//! Why: every byte is touched once (the checksum is taken from the chunk just
//! written, still in the CPU cache, instead of re-reading the images to seal
//! them), the user never writes an image file, and CRIU, which runs as the
//! user, never needs access to the checkpoint directory.
//!
//! Wire format (criu/img-streamer.c): per file, CRIU sends a length-prefixed
//! (u32, little endian) `img_streamer_request_entry`; on restore the streamer
//! answers with a length-prefixed `img_streamer_reply_entry`, and only if the
//! file exists CRIU then passes one end of a fresh pipe with SCM_RIGHTS on a
//! one-byte message.

use crate::error::{fail, Context, EngineError, Result};
use crate::manifest::{Checksum, ImageFile};
use crate::storage::Writeback;
use ckpt_config::Compression;
use prost::Message;
use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

pub const CAPTURE_SOCKET: &str = "streamer-capture.sock";
pub const SERVE_SOCKET: &str = "streamer-serve.sock";
/// Unit of splicing and checksumming: fits the CPU cache (measured best
/// among 64 KiB to 4 MiB, docs/benchmark.md).
const CHUNK: usize = 256 << 10;
/// Pipe buffer asked for: CRIU can queue a few chunks while the previous one
/// is written. Larger pipes measured markedly slower (docs/benchmark.md).
const PIPE_SIZE: libc::c_int = 1 << 20;
/// zstd level for page images: level 1 measured faster than the negative
/// (fast) levels on half-random memory, and than higher ones.
const ZSTD_LEVEL: i32 = 1;

#[derive(Clone, PartialEq, prost::Message)]
struct FileRequest {
    #[prost(string, required, tag = "1")]
    filename: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct FileReply {
    #[prost(bool, required, tag = "1")]
    exists: bool,
}

fn protocol_error(why: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why.into())
}

/// The next file CRIU asks for, or None once it hangs up.
fn read_request(sock: &mut UnixStream) -> io::Result<Option<String>> {
    let mut len = [0u8; 4];
    match sock.read_exact(&mut len) {
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        r => r?,
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > 4096 {
        return Err(protocol_error(format!("request of {len} bytes")));
    }
    let mut buf = vec![0; len];
    sock.read_exact(&mut buf)?;
    let name = FileRequest::decode(&buf[..]).map_err(|e| protocol_error(e.to_string()))?.filename;
    // Only plain names: the file is created or opened in a directory of root's.
    if name.is_empty() || name.starts_with('.') || name.contains('/') || name.len() > 255 {
        return Err(protocol_error(format!("bad image name {name:?}")));
    }
    Ok(Some(name))
}

fn send_reply(sock: &mut UnixStream, exists: bool) -> io::Result<()> {
    let body = FileReply { exists }.encode_to_vec();
    let mut msg = (body.len() as u32).to_le_bytes().to_vec();
    msg.extend(body);
    sock.write_all(&msg)
}

/// The pipe end CRIU passes after a request.
fn receive_pipe(sock: &UnixStream) -> io::Result<File> {
    let mut byte = [0u8; 1];
    let (_, fds) = crate::sys::recv_with_fds::<1>(sock, &mut byte)?;
    let mut files: Vec<File> = fds.into_iter().map(File::from).collect();
    let pipe = files.pop().filter(|_| files.is_empty()).ok_or_else(|| protocol_error("expected one pipe"))?;
    if !std::os::unix::fs::FileTypeExt::is_fifo(&pipe.metadata()?.file_type()) {
        return Err(protocol_error("passed descriptor is not a pipe"));
    }
    let _ = nix::fcntl::fcntl(pipe.as_raw_fd(), nix::fcntl::FcntlArg::F_SETPIPE_SZ(PIPE_SIZE));
    Ok(pipe)
}

/// A listening socket in the directory CRIU is given with `-D`, connectable
/// by CRIU running as `uid`, served by one thread until `finish`.
struct Server<R> {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Result<R>>,
}

fn bind(criu_dir: &Path, name: &str, uid: u32, gid: u32) -> Result<UnixListener> {
    let path = criu_dir.join(name);
    let listener = UnixListener::bind(&path).context(|| format!("cannot create {}", path.display()))?;
    nix::unistd::chown(&path, Some(uid.into()), Some(gid.into())).context(|| format!("cannot hand {} to uid {uid}", path.display()))?;
    listener.set_nonblocking(true).context(|| format!("cannot set up {}", path.display()))?;
    Ok(listener)
}

impl<R: Send + 'static> Server<R> {
    /// Accepts CRIU's one connection and hands it to `serve` on a thread.
    fn start(listener: UnixListener, serve: impl FnOnce(UnixStream) -> Result<R> + Send + 'static) -> Server<R>
    where
        R: Default,
    {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || loop {
            match listener.accept() {
                Ok((sock, _)) => {
                    sock.set_nonblocking(false).context(|| "image streamer socket".into())?;
                    return serve(sock);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if stopped.load(Ordering::Relaxed) {
                        return Ok(R::default());
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(e) => return fail(format!("image streamer: {e}")),
            }
        });
        Server { stop, thread }
    }

    /// Waits for CRIU's files to be done; call once CRIU has exited (a CRIU
    /// that never connected is then no longer waited for).
    fn finish(self) -> Result<R> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or_else(|_| fail("image streamer thread panicked"))
    }
}

/// Runs one worker per open image (CRIU keeps several open at once) and
/// collects them when CRIU hangs up; the first failure is the result.
fn per_file<T: Send + 'static>(
    mut sock: UnixStream,
    mut on_request: impl FnMut(&mut UnixStream, String) -> io::Result<Option<Box<dyn FnOnce() -> Result<T> + Send>>>,
) -> Result<Vec<T>> {
    let mut workers = Vec::new();
    let mut error = None;
    loop {
        match read_request(&mut sock) {
            Ok(None) => break,
            Ok(Some(name)) => {
                log::debug!("image streamer: {name} requested");
                let answered = on_request(&mut sock, name);
                match answered {
                    Ok(Some(work)) => workers.push(std::thread::spawn(work)),
                    Ok(None) => {}
                    Err(e) => {
                        error = Some(EngineError::Failed(format!("image streamer: {e}")));
                        break;
                    }
                }
            }
            Err(e) => {
                error = Some(EngineError::Failed(format!("image streamer: {e}")));
                break;
            }
        }
    }
    drop(sock);
    let mut out = Vec::new();
    for w in workers {
        match w.join().unwrap_or_else(|_| fail("image streamer worker panicked")) {
            Ok(x) => out.push(x),
            Err(e) => {
                error.get_or_insert(e);
            }
        }
    }
    match error {
        Some(e) => Err(e),
        None => Ok(out),
    }
}

/// When the images' checksums are taken.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Summing {
    /// As the bytes arrive, by a thread just behind the writer: the images
    /// are complete soonest (a dump whose tree ends).
    WhileWriting,
    /// Once every image is written: until then only the bytes are moved, so
    /// a tree left running is stopped no longer than the copy takes (on a
    /// machine with few cores the checksum thread competes with CRIU).
    AfterDrain,
}

/// Receives the images of one dump into `images` (a directory only root can
/// reach), checksumming them as they are written or once all are.
pub struct Capture(Server<Vec<Captured>>);

/// An image written whole; `unsummed`: its checksum is still to be taken.
pub struct Captured {
    image: ImageFile,
    unsummed: Option<File>,
}

impl Capture {
    /// Listens in `criu_dir` (what CRIU gets as `-D`); call before starting
    /// CRIU, then `start` after (no thread may run while CRIU is forked).
    pub fn bind(criu_dir: &Path, uid: u32, gid: u32) -> Result<UnixListener> {
        bind(criu_dir, CAPTURE_SOCKET, uid, gid)
    }

    /// `ghost_budget`: the most bytes CRIU's copies of deleted files
    /// (`ghost-file-*`) may take together; past it the dump fails. What
    /// the tree showed before the dump was counted already (node_local.rs);
    /// this also bounds what it did not show (a deleted file passed in a
    /// socket's queue, one deleted after the look).
    pub fn start(listener: UnixListener, images: PathBuf, compression: Compression, summing: Summing, ghost_budget: u64) -> Capture {
        let ghosts = Arc::new(AtomicU64::new(0));
        Capture(Server::start(listener, move |sock| {
            per_file(sock, |sock, name| {
                let pipe = receive_pipe(sock)?;
                let path = images.join(&name);
                let zstd = compression == Compression::Zstd && name.starts_with("pages-");
                let budget = name.starts_with("ghost-file-").then(|| (ghosts.clone(), ghost_budget));
                Ok(Some(Box::new(move || capture_file(pipe, &path, name, zstd, summing, budget))))
            })
        }))
    }

    /// Every image written (CRIU's pipes are empty: none holds a page of
    /// the tree any more).
    pub fn finish(self) -> Result<Drained> {
        self.0.finish().map(Drained)
    }
}

/// The images of a dump, all written.
pub struct Drained(Vec<Captured>);

impl Drained {
    /// Every image with its checksum, sorted by name.
    pub fn checksums(self) -> Result<Vec<ImageFile>> {
        let mut files = std::thread::scope(|scope| {
            let summing: Vec<_> = self
                .0
                .into_iter()
                .map(|c| {
                    scope.spawn(move || -> Result<ImageFile> {
                        let Some(file) = c.unsummed else { return Ok(c.image) };
                        let xxh3 = sum_written(&file, c.image.size)
                            .map_err(|e| EngineError::Failed(format!("cannot read image {} back: {e}", c.image.name)))?;
                        Ok(ImageFile { xxh3, ..c.image })
                    })
                })
                .collect();
            summing.into_iter().map(|t| t.join().unwrap_or_else(|_| fail("image checksum thread panicked"))).collect::<Result<Vec<_>>>()
        })?;
        files.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(files)
    }
}

/// A writer that checksums what it writes.
struct SummingWriter<'a, W> {
    inner: W,
    hasher: Checksum,
    bytes: u64,
    writeback: Writeback<'a>,
}

impl<W: Write> Write for SummingWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        // What the buffer still holds is not in the file yet: one step behind.
        self.writeback.progress(self.bytes.saturating_sub(Writeback::STEP));
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// `budget`: for a deleted file's copy, the bytes all such copies have
/// taken so far, and the most they may.
fn capture_file(
    mut pipe: File,
    path: &Path,
    name: String,
    zstd: bool,
    summing: Summing,
    budget: Option<(Arc<AtomicU64>, u64)>,
) -> Result<Captured> {
    let err = |e: io::Error| EngineError::Failed(format!("cannot write image {}: {e}", path.display()));
    let file =
        File::options().write(true).read(true).create_new(true).mode(0o600).custom_flags(libc::O_NOFOLLOW).open(path).map_err(err)?;
    if let Some((taken, most)) = budget {
        let mut counted = 0;
        let size = splice_all(&pipe, &file, |now| {
            let all = taken.fetch_add(now - counted, Ordering::SeqCst) + (now - counted);
            counted = now;
            match all > most {
                true => Err(io::Error::other(format!("deleted files it holds take more than node_local_files_max ({most} bytes left)"))),
                false => Ok(()),
            }
        })
        .map_err(|e| EngineError::Failed(format!("image {name}: {e}")))?;
        return Ok(Captured { image: ImageFile { name, size, xxh3: String::new(), zstd: false }, unsummed: Some(file) });
    }
    // Compressed, the checksum is of what zstd writes: taken as it writes.
    let (size, xxh3) = if zstd {
        let sink = SummingWriter {
            inner: io::BufWriter::with_capacity(CHUNK, &file),
            hasher: Checksum::default(),
            bytes: 0,
            writeback: Writeback::new(&file),
        };
        let mut encoder = zstd::stream::write::Encoder::new(sink, ZSTD_LEVEL).map_err(err)?;
        let workers = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
        encoder.multithread(workers).map_err(err)?;
        io::copy(&mut pipe, &mut encoder).map_err(err)?;
        let mut sink = encoder.finish().map_err(err)?;
        sink.flush().map_err(err)?;
        (sink.bytes, Some(sink.hasher.hex()))
    } else if summing == Summing::WhileWriting {
        splice_summing(&pipe, &file).map(|(size, sum)| (size, Some(sum))).map_err(err)?
    } else {
        (splice_all(&pipe, &file, |_| Ok(())).map_err(err)?, None)
    };
    log::debug!("image streamer: {name} written");
    let unsummed = if xxh3.is_none() { Some(file) } else { None };
    Ok(Captured { image: ImageFile { name, size, xxh3: xxh3.unwrap_or_default(), zstd }, unsummed })
}

/// Moves the pipe's bytes into the file with splice (one copy, in the
/// kernel) until the pipe is closed, telling `written` each new size.
fn splice_all(pipe: &File, file: &File, mut written: impl FnMut(u64) -> io::Result<()>) -> io::Result<u64> {
    use nix::fcntl::{splice, SpliceFFlags};
    let mut offset: u64 = 0;
    loop {
        let mut off = offset as i64;
        match splice(pipe, None, file, Some(&mut off), CHUNK, SpliceFFlags::SPLICE_F_MOVE) {
            Ok(0) => return Ok(offset),
            Ok(n) => offset += n as u64,
            Err(e) => return Err(io::Error::from(e)),
        }
        written(offset)?;
    }
}

/// Checksums the file's first `size` bytes, read back from the page cache,
/// starting their writeback to storage as it goes.
fn sum_written(file: &File, size: u64) -> io::Result<String> {
    let mut sum = Checksum::default();
    let mut buf = vec![0u8; CHUNK];
    let mut writeback = Writeback::new(file);
    let mut done = 0;
    while done < size {
        let upto = size.min(done + Writeback::STEP);
        sum_range(file, &mut sum, &mut buf, done, upto)?;
        done = upto;
        writeback.progress(done);
    }
    Ok(sum.hex())
}

/// Adds bytes `from..upto` of the file to `sum`.
fn sum_range(file: &File, sum: &mut Checksum, buf: &mut [u8], from: u64, upto: u64) -> io::Result<()> {
    let mut done = from;
    while done < upto {
        let n = buf.len().min((upto - done) as usize);
        file.read_exact_at(&mut buf[..n], done)?;
        sum.update(&buf[..n]);
        done += n as u64;
    }
    Ok(())
}

/// Moves the pipe's bytes into the file with splice (one copy, in the
/// kernel) while a second thread checksums what has been written so far,
/// reading it back from the page cache just behind, and starts its
/// writeback to storage.
fn splice_summing(pipe: &File, file: &File) -> io::Result<(u64, String)> {
    let (written, to_sum) = std::sync::mpsc::channel::<u64>();
    std::thread::scope(|scope| {
        let summer = scope.spawn(move || -> io::Result<String> {
            let mut sum = Checksum::default();
            let mut buf = vec![0u8; CHUNK];
            let mut done = 0u64;
            let mut writeback = Writeback::new(file);
            while let Ok(upto) = to_sum.recv() {
                sum_range(file, &mut sum, &mut buf, done, upto)?;
                done = upto;
                writeback.progress(done);
            }
            Ok(sum.hex())
        });
        let spliced = splice_all(pipe, file, |offset| {
            let _ = written.send(offset);
            Ok(())
        });
        drop(written);
        let sum = summer.join().unwrap_or_else(|_| Err(io::Error::other("checksum thread panicked")));
        Ok((spliced?, sum?))
    })
}

/// Serves the images of a sealed checkpoint to a restoring CRIU.
pub struct Serve(Server<Vec<String>>);

impl Serve {
    pub fn bind(criu_dir: &Path, uid: u32, gid: u32) -> Result<UnixListener> {
        bind(criu_dir, SERVE_SOCKET, uid, gid)
    }

    /// Serves the files `files` lists from `dir`; anything else is reported
    /// missing to CRIU (it asks for optional images too).
    pub fn start(listener: UnixListener, dir: PathBuf, files: &[ImageFile]) -> Serve {
        let files: HashMap<String, ImageFile> = files.iter().map(|f| (f.name.clone(), f.clone())).collect();
        Serve(Server::start(listener, move |sock| {
            per_file(sock, |sock, name| {
                let Some(expected) = files.get(&name).cloned() else {
                    send_reply(sock, false)?;
                    return Ok(None);
                };
                send_reply(sock, true)?;
                let pipe = receive_pipe(sock)?;
                let dir = dir.clone();
                Ok(Some(Box::new(move || {
                    serve_file(&dir, &expected, pipe)?;
                    log::debug!("image streamer: {name} served");
                    Ok(name)
                })))
            })
        }))
    }

    /// The names of the files served, once CRIU is done.
    pub fn finish(self) -> Result<Vec<String>> {
        self.0.finish()
    }
}

/// Holds back the last bytes written until `release`: whatever reads the
/// other end never sees the whole file before its checksum is known good.
struct HoldBack<'a> {
    pipe: &'a File,
    held: Vec<u8>,
}

impl Write for HoldBack<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.held.len() >= CHUNK {
            (&*self.pipe).write_all(&self.held)?;
            self.held.clear();
        }
        self.held.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A reader that checksums what it reads.
struct SummingReader<R> {
    inner: R,
    hasher: Checksum,
    bytes: u64,
}

impl<R: Read> Read for SummingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

fn serve_file(dir: &Path, expected: &ImageFile, pipe: File) -> Result<()> {
    let path = &dir.join(&expected.name);
    let file =
        File::options().read(true).custom_flags(libc::O_NOFOLLOW).open(path).context(|| format!("cannot open {}", path.display()))?;
    let meta = file.metadata().context(|| format!("cannot stat {}", path.display()))?;
    if !meta.is_file() || meta.uid() != 0 || meta.len() != expected.size {
        return fail(format!(
            "checkpoint {} is truncated or altered: {} is {} bytes, the manifest says {}",
            dir.display(),
            expected.name,
            meta.len(),
            expected.size
        ));
    }
    let damaged = || {
        EngineError::Damaged(format!("checkpoint {} is damaged: checksum of {} does not match the manifest", dir.display(), expected.name))
    };
    let result = if expected.zstd {
        let mut reader = SummingReader { inner: io::BufReader::with_capacity(CHUNK, &file), hasher: Checksum::default(), bytes: 0 };
        let mut out = HoldBack { pipe: &pipe, held: Vec::with_capacity(2 * CHUNK) };
        zstd::stream::copy_decode(&mut reader, &mut out)
            .and_then(|_| io::copy(&mut reader, &mut io::sink()))
            .map(|_| ())
            .map_err(|e| EngineError::Failed(format!("cannot decompress {}: {e}", path.display())))?;
        if reader.bytes != expected.size || reader.hasher.hex() != expected.xxh3 {
            return Err(damaged());
        }
        (&pipe).write_all(&out.held)
    } else {
        splice_verified(&file, expected, &pipe, damaged)?
    };
    match result {
        // CRIU read what it needed and closed its end.
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        r => r.context(|| format!("cannot serve {}", path.display())),
    }
}

/// Splices the file into the pipe (no copy: page cache pages are passed by
/// reference) behind a thread that checksums it from the page cache; the
/// last chunk goes only once the whole file's checksum matches.
fn splice_verified(file: &File, expected: &ImageFile, pipe: &File, damaged: impl Fn() -> EngineError) -> Result<io::Result<()>> {
    let size = expected.size;
    // The last chunk is released only once the whole file checks out.
    let held_back = size.saturating_sub(CHUNK as u64);
    let (progress, summed) = std::sync::mpsc::channel::<io::Result<u64>>();
    std::thread::scope(|scope| {
        scope.spawn(move || {
            let mut sum = Checksum::default();
            let mut buf = vec![0u8; CHUNK.min(size as usize)];
            let mut done = 0u64;
            while done < size {
                let n = CHUNK.min((size - done) as usize);
                if let Err(e) = file.read_exact_at(&mut buf[..n], done) {
                    let _ = progress.send(Err(e));
                    return;
                }
                sum.update(&buf[..n]);
                done += n as u64;
                if done < size && progress.send(Ok(done)).is_err() {
                    return;
                }
            }
            let verdict = if sum.hex() == expected.xxh3 { Ok(size) } else { Err(io::Error::from(io::ErrorKind::InvalidData)) };
            let _ = progress.send(verdict);
        });
        let mut sent = 0u64;
        loop {
            let upto = match summed.recv() {
                Ok(Ok(upto)) if upto == size => size,
                Ok(Ok(upto)) => upto.min(held_back),
                Ok(Err(e)) if e.kind() == io::ErrorKind::InvalidData => return Err(damaged()),
                Ok(Err(e)) => return Err(EngineError::Failed(format!("cannot read an image: {e}"))),
                Err(_) => return Err(EngineError::Failed("checksum thread ended early".into())),
            };
            if let Err(e) = splice_range(file, sent, upto, pipe) {
                // CRIU closed its end: dropping `summed` stops the thread.
                return Ok(Err(e));
            }
            sent = upto;
            if sent == size {
                return Ok(Ok(()));
            }
        }
    })
}

/// Splices bytes `start..end` of `file` into `pipe` (page cache pages are
/// passed by reference, not copied).
fn splice_range(file: &File, start: u64, end: u64, pipe: &File) -> io::Result<()> {
    use nix::fcntl::{splice, SpliceFFlags};
    let mut off = start as i64;
    while (off as u64) < end {
        let len = (end - off as u64) as usize;
        match splice(file, Some(&mut off), pipe, None, len, SpliceFFlags::SPLICE_F_MOVE) {
            Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
            Ok(_) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_wire_format_matches_criu() {
        // protobuf-c encoding of img_streamer_request_entry{filename="pages-1.img"}
        let body = FileRequest { filename: "pages-1.img".into() }.encode_to_vec();
        assert_eq!(body[..2], [0x0a, 11]);
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let mut msg = (body.len() as u32).to_le_bytes().to_vec();
        msg.extend(&body);
        a.write_all(&msg).unwrap();
        assert_eq!(read_request(&mut b).unwrap().as_deref(), Some("pages-1.img"));
        drop(a);
        assert_eq!(read_request(&mut b).unwrap(), None);
    }

    #[test]
    fn names_that_leave_the_directory_are_refused() {
        for bad in ["../x", "a/b", ".hidden", ""] {
            let body = FileRequest { filename: bad.into() }.encode_to_vec();
            let (mut a, mut b) = UnixStream::pair().unwrap();
            let mut msg = (body.len() as u32).to_le_bytes().to_vec();
            msg.extend(&body);
            a.write_all(&msg).unwrap();
            assert!(read_request(&mut b).is_err(), "{bad:?}");
        }
    }

    /// Both ways of summing give the checksum of the bytes CRIU sent.
    #[test]
    fn checksums_after_the_drain_are_those_taken_while_writing() {
        let dir = std::env::temp_dir().join(format!("streamer-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // More than a pipe holds and not a whole number of chunks.
        let bytes: Vec<u8> = (0..3 * CHUNK as u64 + 4097).map(|i| (i * 7 % 251) as u8).collect();
        let mut expected = Checksum::default();
        expected.update(&bytes);
        for summing in [Summing::WhileWriting, Summing::AfterDrain] {
            let (read, mut write) = std::io::pipe().unwrap();
            let sent = bytes.clone();
            let writer = std::thread::spawn(move || write.write_all(&sent));
            let name = format!("pages-{summing:?}.img");
            let captured =
                capture_file(File::from(std::os::fd::OwnedFd::from(read)), &dir.join(&name), name, false, summing, None).unwrap();
            writer.join().unwrap().unwrap();
            let files = Drained(vec![captured]).checksums().unwrap();
            assert_eq!((files[0].size, files[0].xxh3.as_str()), (bytes.len() as u64, expected.hex().as_str()), "{summing:?}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Copies of deleted files share one budget: the one that goes past it
    /// fails, the ones within it are summed as any image.
    #[test]
    fn deleted_files_copies_stop_at_their_budget() {
        let dir = std::env::temp_dir().join(format!("streamer-ghost-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let taken = Arc::new(AtomicU64::new(0));
        let copy = |name: &str, len: usize| {
            let (read, mut write) = std::io::pipe().unwrap();
            let writer = std::thread::spawn(move || write.write_all(&vec![7u8; len]));
            let got = capture_file(
                File::from(std::os::fd::OwnedFd::from(read)),
                &dir.join(name),
                name.into(),
                false,
                Summing::WhileWriting,
                Some((taken.clone(), 100_000)),
            );
            let _ = writer.join();
            got
        };
        let first = copy("ghost-file-1.img", 60_000).unwrap();
        assert_eq!(Drained(vec![first]).checksums().unwrap()[0].size, 60_000);
        let second = copy("ghost-file-2.img", 60_000);
        assert!(second.is_err_and(|e| e.to_string().contains("take more than node_local_files_max")));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn reply_is_a_length_prefixed_bool() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        send_reply(&mut a, true).unwrap();
        let mut got = [0u8; 6];
        b.read_exact(&mut got).unwrap();
        assert_eq!(got, [2, 0, 0, 0, 0x08, 1]);
    }
}
