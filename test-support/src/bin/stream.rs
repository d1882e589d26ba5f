//! Byte-exact stream checks through the sidecar, for the sockmap tests (and the
//! benchmarks): a server and a client that move N bytes of a deterministic
//! pattern with a chosen syscall on each side and check every byte.
//!
//! ```text
//! stream serve ADDR
//! stream run DEST --op upload|download|halfclose|abort --size N
//!            [--send write|writev|sendmsg|sendfile|splice|epoll]
//!            [--recv read|small|peek|splice|epoll] [--parallel P] [--count C]
//!            [--duration SECS]
//! ```
//! The client's header line tells the server what to do:
//! - upload: the client sends N bytes; the server answers `ok N` (or `bad ...`).
//! - download: the server sends N bytes and closes.
//! - halfclose: the client sends N bytes and shuts down writing; the server reads to EOF,
//!   then sends N bytes back and closes (data flowing toward a half-closed socket).
//! - serverfirst: the server sends N bytes and shuts down writing; the client reads to EOF,
//!   then sends N bytes and closes; the server, which can no longer answer, prints
//!   `verdict serverfirst ok N` (or `bad ...`) on its stdout (data flowing toward a socket
//!   that shut down writing).
//! - abort: the server sends N/2 bytes and resets the connection; the client must see an
//!   error or EOF promptly, never hang.
//! - stall: the server reads nothing until the client releases it; meanwhile the client
//!   writes without blocking until the path is full (a write fails with EAGAIN and the
//!   socket stays unwritable for a settling second: every relay on the way has moved what
//!   it could), or N bytes went. Then it releases the server (a second connection, header
//!   `release TOKEN`) and sends the rest blocking; the server checks all N and answers
//!   `ok N`. Prints `queued=` what the stalled path took in. On a busy machine the figure
//!   is still what the path holds: a transient EAGAIN (the application outran a relay that
//!   was off-CPU) does not end the count, and the server cannot start reading while the
//!   client is still counting (it used to stall for a fixed time).
//!
//! Three more ops measure instead of check (`--duration SECS`), each connection of
//! `--parallel` on its own thread, and end with one `summary` line over all of them:
//! - pingpong: the client sends N bytes, the server echoes them, for the duration;
//!   requests per second and latency percentiles from every sample (not averages).
//! - shortconn: the same, with a new connection per request; connections per second,
//!   request and connect() latency percentiles.
//! - flood: the client writes N-byte messages for the duration; throughput.
//!
//! Every byte received is checked against the pattern at its offset, so a lost, duplicated
//! or reordered byte is caught where it happens. `run` prints `ok op=... bytes=...` per
//! connection, or `fail ...` and exits 1.

use std::collections::BTreeSet;
use std::io::{self, BufRead, BufReader, IoSlice, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::thread;
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::{fcntl, splice, FcntlArg, OFlag, SpliceFFlags};
use nix::libc;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
use nix::sys::sendfile::sendfile;
use nix::sys::socket::{recv, sendmsg, setsockopt, sockopt, MsgFlags, SockaddrStorage};
use nix::sys::uio::writev;
use nix::unistd::{pipe2, read, write};

const CHUNK: usize = 64 * 1024;

/// Latency samples (ns) of every request, and of every connect(), over all threads.
static SAMPLES: Mutex<Vec<u32>> = Mutex::new(Vec::new());
static CONNECT_SAMPLES: Mutex<Vec<u32>> = Mutex::new(Vec::new());
/// Bytes flooded, over all threads.
static FLOODED: AtomicU64 = AtomicU64::new(0);
/// Tokens of stalled connections their clients released (`release TOKEN`), until the
/// stalled connection's thread takes its own; RELEASE wakes those threads.
static RELEASED: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());
static RELEASE: Condvar = Condvar::new();
/// Numbers the stall tokens of this client's connections.
static STALLS: AtomicU64 = AtomicU64::new(0);

/// `MESHBPF_TEST_TIMEOUT_SCALE`, which stretches the harness's own guards (vm/run.sh's
/// emulated guest sets it).
fn scale() -> u32 {
    std::env::var("MESHBPF_TEST_TIMEOUT_SCALE")
        .ok()
        .and_then(|s| s.parse::<u32>().ok())
        .filter(|&s| s >= 1)
        .unwrap_or(1)
}

/// A stall guard, not a speed goal: 30 s, scaled (a busy emulated 2-core guest has taken
/// longer than 30 s to move a megabyte through the stand-in).
fn timeout() -> Duration {
    Duration::from_secs(30) * scale()
}

/// How long a socket that said EAGAIN must stay unwritable before `stall` takes the path
/// for full: 1 s, scaled. A relay on the way (a sidecar) that is runnable is scheduled well
/// within that even on a busy machine; if one was not, the count only comes out lower.
fn settle() -> Duration {
    Duration::from_secs(1) * scale()
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("serve") => args.get(1).ok_or_else(|| "serve ADDR".to_string()).and_then(|a| serve(a)),
        Some("run") => run(&args[1..]),
        _ => Err("usage: stream serve ADDR | stream run DEST --op OP --size N [--send M] [--recv M] [--parallel P]".into()),
    };
    if let Err(err) = result {
        eprintln!("stream: {err}");
        std::process::exit(1);
    }
}

/// The pattern byte at `offset`: cheap, deterministic, not periodic at any power of two.
fn pattern(offset: u64) -> u8 {
    let x = offset.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (x >> 56) as u8 ^ (offset % 251) as u8
}

fn fill(buf: &mut [u8], offset: u64) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b = pattern(offset + i as u64);
    }
}

/// Checks a received stream against the pattern as it arrives: its length, and the first
/// offset where a byte was lost, duplicated or reordered.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Verifier {
    len: u64,
    first_bad: Option<u64>,
}

impl Verifier {
    fn new() -> Self {
        Verifier {
            len: 0,
            first_bad: None,
        }
    }

    fn update(&mut self, data: &[u8]) {
        if self.first_bad.is_none() {
            if let Some(i) = data
                .iter()
                .enumerate()
                .position(|(i, &b)| b != pattern(self.len + i as u64))
            {
                self.first_bad = Some(self.len + i as u64);
            }
        }
        self.len += data.len() as u64;
    }

    /// `ok N`, or what went wrong compared with `expected` bytes of pattern.
    fn verdict(&self, expected: u64) -> String {
        match self.first_bad {
            None if self.len == expected => format!("ok {}", self.len),
            None => format!("bad got {} of {expected} bytes", self.len),
            Some(at) => format!(
                "bad got {} of {expected} bytes, wrong from offset {at}",
                self.len
            ),
        }
    }
}

// ---------- server ----------

fn serve(addr: &str) -> Result<(), String> {
    let addr: SocketAddr = addr.parse().map_err(|_| format!("bad address {addr}"))?;
    let listener = TcpListener::bind(addr).map_err(|e| format!("bind {addr}: {e}"))?;
    println!(
        "listening={}",
        listener.local_addr().map_err(|e| e.to_string())?
    );
    for stream in listener.incoming().flatten() {
        thread::spawn(move || {
            if let Err(err) = serve_one(stream) {
                eprintln!("stream server: {err}");
            }
        });
    }
    Ok(())
}

fn serve_one(stream: TcpStream) -> io::Result<()> {
    stream.set_read_timeout(Some(timeout()))?;
    let mut reader = BufReader::with_capacity(CHUNK, stream.try_clone()?);
    let mut header = String::new();
    reader.read_line(&mut header)?;
    let words: Vec<&str> = header.split_whitespace().collect();
    let word = |i: usize| words.get(i).copied().unwrap_or("");
    let (op, size) = (word(0), word(1).parse::<u64>().unwrap_or(0));
    let mut out = stream;
    match op {
        "upload" => {
            let got = verify_reader(&mut reader.by_ref().take(size))?;
            writeln!(out, "{}", got.verdict(size))?;
        }
        "download" => send_pattern_write(&mut out, size)?,
        "halfclose" => {
            let got = verify_reader(&mut reader)?; // to EOF
            if got.verdict(size) != format!("ok {size}") {
                return Err(io::Error::other(format!(
                    "halfclose upload: {}",
                    got.verdict(size)
                )));
            }
            send_pattern_write(&mut out, size)?;
        }
        "serverfirst" => {
            send_pattern_write(&mut out, size)?;
            out.shutdown(Shutdown::Write)?;
            let got = verify_reader(&mut reader)?; // to EOF
            println!("verdict serverfirst {}", got.verdict(size));
            return Ok(());
        }
        "pingpong" => {
            let mut buf = vec![0u8; size as usize];
            loop {
                if let Err(err) = reader.read_exact(&mut buf) {
                    return if err.kind() == io::ErrorKind::UnexpectedEof {
                        Ok(())
                    } else {
                        Err(err)
                    };
                }
                out.write_all(&buf)?;
            }
        }
        "stall" => {
            wait_for_release(word(2))?;
            let got = verify_reader(&mut reader.by_ref().take(size))?;
            writeln!(out, "{}", got.verdict(size))?;
        }
        "release" => {
            let mut released = RELEASED.lock().unwrap_or_else(|e| e.into_inner());
            released.insert(word(1).to_string());
            RELEASE.notify_all();
            drop(released);
            writeln!(out, "released")?;
        }
        "flood" => {
            let got = io::copy(&mut reader, &mut io::sink())?;
            writeln!(out, "ok {got}")?;
        }
        "abort" => {
            send_pattern_write(&mut out, size / 2)?;
            // SO_LINGER 0: close() sends a reset.
            let linger = libc::linger {
                l_onoff: 1,
                l_linger: 0,
            };
            setsockopt(&out, sockopt::Linger, &linger)?;
            return Ok(());
        }
        other => return Err(io::Error::other(format!("unknown op {other:?}"))),
    }
    out.shutdown(Shutdown::Write)
}

/// Blocks a stalled connection's thread until its client released `token` (which it may
/// have done already), or fails after the guard.
fn wait_for_release(token: &str) -> io::Result<()> {
    let released = RELEASED.lock().unwrap_or_else(|e| e.into_inner());
    let (mut released, waited) = RELEASE
        .wait_timeout_while(released, timeout(), |r| !r.contains(token))
        .unwrap_or_else(|e| e.into_inner());
    if waited.timed_out() {
        return Err(io::Error::other(format!(
            "stall {token:?}: the client did not release it within {:?}",
            timeout()
        )));
    }
    released.remove(token);
    Ok(())
}

fn verify_reader(r: &mut impl Read) -> io::Result<Verifier> {
    let mut d = Verifier::new();
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            return Ok(d);
        }
        d.update(&buf[..n]);
    }
}

fn send_pattern_write(w: &mut impl Write, size: u64) -> io::Result<()> {
    write_pattern(w, 0, size)
}

/// The pattern's bytes from offset `from` up to `size`.
fn write_pattern(w: &mut impl Write, from: u64, size: u64) -> io::Result<()> {
    let mut buf = vec![0u8; CHUNK];
    let mut at = from;
    while at < size {
        let n = (size - at).min(CHUNK as u64) as usize;
        fill(&mut buf[..n], at);
        w.write_all(&buf[..n])?;
        at += n as u64;
    }
    Ok(())
}

// ---------- client ----------

struct Opts {
    dest: SocketAddr,
    op: String,
    size: u64,
    send: String,
    recv: String,
    parallel: usize,
    count: usize,
    duration: Duration,
}

fn run(args: &[String]) -> Result<(), String> {
    let dest = args
        .first()
        .ok_or("run needs a destination")?
        .parse()
        .map_err(|_| "bad destination")?;
    let mut o = Opts {
        dest,
        op: "upload".into(),
        size: 1024,
        send: "write".into(),
        recv: "read".into(),
        parallel: 1,
        count: 1,
        duration: Duration::from_secs(2),
    };
    let mut it = args[1..].iter();
    while let Some(flag) = it.next() {
        let v = it.next().ok_or(format!("{flag} needs a value"))?.clone();
        match flag.as_str() {
            "--op" => o.op = v,
            "--size" => o.size = v.parse().map_err(|_| "bad size")?,
            "--send" => o.send = v,
            "--recv" => o.recv = v,
            "--parallel" => o.parallel = v.parse().map_err(|_| "bad parallel")?,
            "--count" => o.count = v.parse().map_err(|_| "bad count")?,
            "--duration" => {
                o.duration = Duration::from_secs_f64(v.parse().map_err(|_| "bad duration")?)
            }
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    let start = std::time::Instant::now();
    let results: Vec<Result<String, String>> = thread::scope(|s| {
        let handles: Vec<_> = (0..o.parallel).map(|_| s.spawn(|| run_many(&o))).collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("client thread panicked".into()))
            })
            .collect()
    });
    let mut failed = false;
    for r in results {
        match r {
            Ok(line) => println!("{line}"),
            Err(err) => {
                println!("fail {err}");
                failed = true;
            }
        }
    }
    if failed {
        return Err("at least one connection failed".into());
    }
    if matches!(o.op.as_str(), "pingpong" | "shortconn" | "flood") {
        println!("{}", summary(&o, start.elapsed().as_secs_f64()));
    }
    Ok(())
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    let at = ((sorted.len() as f64 * p) as usize).min(sorted.len().saturating_sub(1));
    sorted.get(at).copied().unwrap_or(0) as f64 / 1000.0
}

/// One line over every connection of a measuring run.
fn summary(o: &Opts, secs: f64) -> String {
    let take = |m: &Mutex<Vec<u32>>| {
        let mut v = std::mem::take(&mut *m.lock().unwrap_or_else(|e| e.into_inner()));
        v.sort_unstable();
        v
    };
    let (samples, connects) = (take(&SAMPLES), take(&CONNECT_SAMPLES));
    let mut line = format!(
        "summary op={} size={} connections={} requests={} rps={:.0} p50_us={:.1} p99_us={:.1} p999_us={:.1}",
        o.op,
        o.size,
        o.parallel,
        samples.len(),
        samples.len() as f64 / secs,
        percentile(&samples, 0.50),
        percentile(&samples, 0.99),
        percentile(&samples, 0.999)
    );
    if !connects.is_empty() {
        line += &format!(
            " connect_p50_us={:.1} connect_p99_us={:.1}",
            percentile(&connects, 0.50),
            percentile(&connects, 0.99)
        );
    }
    if o.op == "flood" {
        line += &format!(
            " mbytes_per_sec={:.1}",
            FLOODED.load(Ordering::Relaxed) as f64 / secs / 1e6
        );
    }
    line
}

/// `count` connections one after another; reports the last, or the first failure.
fn run_many(o: &Opts) -> Result<String, String> {
    let mut last = String::new();
    for i in 0..o.count {
        last = run_one(o).map_err(|e| format!("connection {i}: {e}"))?;
    }
    Ok(if o.count > 1 {
        format!("{last} connections={}", o.count)
    } else {
        last
    })
}

fn run_one(o: &Opts) -> Result<String, String> {
    if o.op == "shortconn" {
        return shortconn(o);
    }
    let stream =
        TcpStream::connect_timeout(&o.dest, timeout()).map_err(|e| format!("connect: {e}"))?;
    stream
        .set_read_timeout(Some(timeout()))
        .map_err(|e| e.to_string())?;
    stream
        .set_write_timeout(Some(timeout()))
        .map_err(|e| e.to_string())?;
    let mut s = stream;
    let token = format!(
        "{}-{}",
        std::process::id(),
        STALLS.fetch_add(1, Ordering::Relaxed)
    );
    let header = if o.op == "stall" {
        format!("{} {} {token}\n", o.op, o.size)
    } else {
        format!("{} {}\n", o.op, o.size)
    };
    if matches!(o.op.as_str(), "pingpong" | "flood") {
        // Measuring ops send the header with their first payload, in one write: what a
        // client's first message looks like, and what sockmap's first-message policy sees.
        return measure(s, o, header.as_bytes());
    }
    s.write_all(header.as_bytes())
        .map_err(|e| format!("header: {e}"))?;
    let want = format!("ok {}", o.size);
    match o.op.as_str() {
        "upload" => {
            send(&s, &o.send, o.size)?;
            let mut line = String::new();
            BufReader::new(&s)
                .read_line(&mut line)
                .map_err(|e| format!("reading the verdict: {e}"))?;
            if line.trim() != want {
                return Err(format!("server: {}", line.trim()));
            }
            Ok(format!("ok op=upload send={} bytes={}", o.send, o.size))
        }
        "download" | "halfclose" => {
            if o.op == "halfclose" {
                send(&s, &o.send, o.size)?;
                s.shutdown(Shutdown::Write)
                    .map_err(|e| format!("shutdown: {e}"))?;
            }
            let got = receive(&s, &o.recv, None)?;
            if got.verdict(o.size) != want {
                return Err(format!("received: {}", got.verdict(o.size)));
            }
            Ok(format!("ok op={} recv={} bytes={}", o.op, o.recv, got.len))
        }
        "serverfirst" => {
            let got = receive(&s, &o.recv, None)?;
            if got.verdict(o.size) != want {
                return Err(format!("received: {}", got.verdict(o.size)));
            }
            send(&s, &o.send, o.size)?;
            Ok(format!(
                "ok op=serverfirst recv={} send={} bytes={}",
                o.recv, o.send, got.len
            ))
        }
        "abort" => check_abort(&s, o),
        "stall" => {
            let queued = write_until_full(&s, o.size)?;
            release(o, &token)?;
            write_pattern(&mut s, queued, o.size).map_err(|e| format!("write: {e}"))?;
            let line = last_word(&s, "the verdict")?;
            if line != want {
                return Err(format!("server: {line}"));
            }
            Ok(format!("ok op=stall queued={queued} bytes={}", o.size))
        }
        other => Err(format!("unknown op {other}")),
    }
}

/// Shuts down writing and reads the server's one-line answer (`what` it is), trimmed.
fn last_word(s: &TcpStream, what: &str) -> Result<String, String> {
    s.shutdown(Shutdown::Write)
        .map_err(|e| format!("shutdown: {e}"))?;
    let mut line = String::new();
    BufReader::new(s)
        .read_line(&mut line)
        .map_err(|e| format!("reading {what}: {e}"))?;
    Ok(line.trim().to_string())
}

/// Lets the server of a stalled connection start reading: a second connection to the same
/// destination says `release TOKEN` and waits for the server's `released`.
fn release(o: &Opts, token: &str) -> Result<(), String> {
    let mut s = TcpStream::connect_timeout(&o.dest, timeout())
        .map_err(|e| format!("connect to release the server: {e}"))?;
    s.set_read_timeout(Some(timeout()))
        .map_err(|e| e.to_string())?;
    s.write_all(format!("release {token}\n").as_bytes())
        .map_err(|e| format!("release: {e}"))?;
    match last_word(&s, "the release")?.as_str() {
        "released" => Ok(()),
        other => Err(format!("release: the server answered {other:?}")),
    }
}

/// Writes the pattern without blocking until the path is full (EAGAIN, and the socket
/// stays unwritable for [`settle`]) or `size` bytes went; returns how many did. Any other
/// error fails (ENOMEM is one).
fn write_until_full(s: &TcpStream, size: u64) -> Result<u64, String> {
    s.set_nonblocking(true).map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; CHUNK];
    let mut at = 0;
    while at < size {
        let n = (size - at).min(CHUNK as u64) as usize;
        fill(&mut buf[..n], at);
        match (&*s).write(&buf[..n]) {
            Ok(sent) => at += sent as u64,
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                if !ready_within(s, EpollFlags::EPOLLOUT, settle())? {
                    break;
                }
            }
            Err(err) => return Err(format!("write at {at}: {err}")),
        }
    }
    s.set_nonblocking(false).map_err(|e| e.to_string())?;
    Ok(at)
}

fn measure(mut s: TcpStream, o: &Opts, header: &[u8]) -> Result<String, String> {
    match o.op.as_str() {
        "pingpong" => pingpong(s, o, header),
        _ => {
            let chunk = vec![0x5au8; o.size as usize];
            let first = [header, &chunk].concat();
            let start = std::time::Instant::now();
            s.write_all(&first).map_err(|e| format!("write: {e}"))?;
            let mut sent = o.size;
            while start.elapsed() < o.duration {
                s.write_all(&chunk).map_err(|e| format!("write: {e}"))?;
                sent += o.size;
            }
            let line = last_word(&s, "the count")?;
            let secs = start.elapsed().as_secs_f64();
            if line != format!("ok {sent}") {
                return Err(format!("sent {sent}, server: {line}"));
            }
            FLOODED.fetch_add(sent, Ordering::Relaxed);
            Ok(format!(
                "ok op=flood size={} bytes={sent} mbytes_per_sec={:.1}",
                o.size,
                sent as f64 / secs / 1e6
            ))
        }
    }
}

fn check_abort(s: &TcpStream, o: &Opts) -> Result<String, String> {
    match receive(s, &o.recv, Some(o.size)) {
        // EOF or an error before all bytes: the reset reached the application.
        Ok(got) if got.len < o.size => {
            Ok(format!("ok op=abort recv={} eof_after={}", o.recv, got.len))
        }
        Ok(got) => Err(format!(
            "received {} bytes of a stream that was reset at {}",
            got.len,
            o.size / 2
        )),
        Err(err) if err.contains("timed out") || err.contains("Resource temporarily") => {
            Err(format!("hang: {err}"))
        }
        Err(err) => Ok(format!("ok op=abort recv={} error={err}", o.recv)),
    }
}

/// Request/response over one connection for the duration: requests per second and
/// latency percentiles (microseconds) from every sample.
fn pingpong(mut s: TcpStream, o: &Opts, header: &[u8]) -> Result<String, String> {
    let request = vec![0xa5u8; o.size as usize];
    let mut response = vec![0u8; o.size as usize];
    let mut reader = s.try_clone().map_err(|e| e.to_string())?;
    let mut samples: Vec<u32> = Vec::new();
    let mut first = Some([header, &request].concat());
    let start = std::time::Instant::now();
    while start.elapsed() < o.duration {
        let t = std::time::Instant::now();
        s.write_all(first.take().as_deref().unwrap_or(&request))
            .map_err(|e| format!("write: {e}"))?;
        reader
            .read_exact(&mut response)
            .map_err(|e| format!("read: {e}"))?;
        samples.push(t.elapsed().as_nanos().min(u32::MAX as u128) as u32);
    }
    let secs = start.elapsed().as_secs_f64();
    samples.sort_unstable();
    let pct = |p: f64| percentile(&samples, p);
    SAMPLES
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .extend_from_slice(&samples);
    Ok(format!(
        "ok op=pingpong size={} requests={} rps={:.0} p50_us={:.1} p99_us={:.1} p999_us={:.1}",
        o.size,
        samples.len(),
        samples.len() as f64 / secs,
        pct(0.50),
        pct(0.99),
        pct(0.999)
    ))
}

/// A new connection per request for the duration (the "pingpong" protocol, one exchange).
fn shortconn(o: &Opts) -> Result<String, String> {
    let request = [
        format!("pingpong {}\n", o.size).into_bytes(),
        vec![0xa5u8; o.size as usize],
    ]
    .concat();
    let mut response = vec![0u8; o.size as usize];
    let (mut samples, mut connects) = (Vec::new(), Vec::new());
    let start = std::time::Instant::now();
    while start.elapsed() < o.duration {
        let t = std::time::Instant::now();
        let mut s =
            TcpStream::connect_timeout(&o.dest, timeout()).map_err(|e| format!("connect: {e}"))?;
        connects.push(t.elapsed().as_nanos().min(u32::MAX as u128) as u32);
        s.set_read_timeout(Some(timeout()))
            .map_err(|e| e.to_string())?;
        s.write_all(&request).map_err(|e| format!("write: {e}"))?;
        s.read_exact(&mut response)
            .map_err(|e| format!("read: {e}"))?;
        drop(s);
        samples.push(t.elapsed().as_nanos().min(u32::MAX as u128) as u32);
    }
    let n = samples.len();
    SAMPLES
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .extend_from_slice(&samples);
    CONNECT_SAMPLES
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .extend_from_slice(&connects);
    Ok(format!("ok op=shortconn size={} requests={n}", o.size))
}

/// The result of a system call, its error named by `what`.
fn check<T>(result: nix::Result<T>, what: &str) -> Result<T, String> {
    result.map_err(|err| format!("{what}: {err}"))
}

/// Sends `size` pattern bytes on `s` with the syscall `method`.
fn send(s: &TcpStream, method: &str, size: u64) -> Result<(), String> {
    let mut buf = vec![0u8; CHUNK];
    let mut at = 0u64;
    if method == "epoll" {
        set_nonblocking(s, true)?;
    }
    let pipe = if method == "splice" {
        Some(check(pipe2(OFlag::O_CLOEXEC), "pipe")?)
    } else {
        None
    };
    while at < size {
        let n = (size - at).min(CHUNK as u64) as usize;
        fill(&mut buf[..n], at);
        let mut off = 0;
        while off < n {
            let rest = &buf[off..n];
            let sent = match method {
                "write" => check(write(s, rest), "write")?,
                "writev" | "sendmsg" => {
                    // Three (writev) or four (sendmsg) iovecs of uneven sizes.
                    let parts = if method == "writev" { 3 } else { 4 };
                    let cuts: Vec<usize> = (1..parts)
                        .map(|i| rest.len() * i / parts + i)
                        .map(|c| c.min(rest.len()))
                        .collect();
                    let mut iov = Vec::new();
                    let mut start = 0;
                    for &c in cuts.iter().chain(std::iter::once(&rest.len())) {
                        iov.push(IoSlice::new(&rest[start..c]));
                        start = c;
                    }
                    if method == "writev" {
                        check(writev(s, &iov), "writev")?
                    } else {
                        check(
                            sendmsg::<SockaddrStorage>(
                                s.as_raw_fd(),
                                &iov,
                                &[],
                                MsgFlags::empty(),
                                None,
                            ),
                            "sendmsg",
                        )?
                    }
                }
                "sendfile" => {
                    let file = memfd_with(rest)?;
                    let mut sent = 0usize;
                    while sent < rest.len() {
                        let mut offset = sent as libc::off_t;
                        sent += check(
                            sendfile(s, &file, Some(&mut offset), rest.len() - sent),
                            "sendfile",
                        )?;
                    }
                    sent
                }
                "splice" => {
                    let (r, w) = pipe.as_ref().ok_or("no pipe")?;
                    let put = check(write(w, rest), "write to pipe")?;
                    let mut moved = 0;
                    while moved < put {
                        moved += check(
                            splice(r, None, s, None, put - moved, SpliceFFlags::SPLICE_F_MOVE),
                            "splice to socket",
                        )?;
                    }
                    put
                }
                "epoll" => match write(s, rest) {
                    Ok(n) => n,
                    Err(Errno::EAGAIN) => {
                        wait_ready(s, EpollFlags::EPOLLOUT)?;
                        0
                    }
                    Err(err) => return Err(format!("write: {err}")),
                },
                other => return Err(format!("unknown send method {other}")),
            };
            off += sent;
        }
        at += n as u64;
    }
    if method == "epoll" {
        set_nonblocking(s, false)?;
    }
    Ok(())
}

/// Receives to EOF (or `limit` bytes) with the syscall `method`.
fn receive(s: &TcpStream, method: &str, limit: Option<u64>) -> Result<Verifier, String> {
    let fd = s.as_raw_fd();
    let mut d = Verifier::new();
    let mut buf = vec![0u8; CHUNK];
    let pipe = if method == "splice" {
        Some(check(pipe2(OFlag::O_CLOEXEC), "pipe")?)
    } else {
        None
    };
    if method == "epoll" {
        set_nonblocking(s, true)?;
    }
    loop {
        if limit.is_some_and(|l| d.len >= l) {
            return Ok(d);
        }
        let n = match method {
            "read" => check(read(fd, &mut buf), "read")?,
            "small" => check(read(fd, &mut buf[..7]), "read")?,
            "peek" => {
                let peeked = check(
                    recv(fd, &mut buf[..4096], MsgFlags::MSG_PEEK),
                    "recv(MSG_PEEK)",
                )?;
                let mut again = vec![0u8; peeked];
                let got = check(read(fd, &mut again), "read after peek")?;
                if got != peeked || again[..] != buf[..peeked] {
                    return Err(format!(
                        "MSG_PEEK saw {peeked} bytes, read returned {got} different ones"
                    ));
                }
                got
            }
            "splice" => {
                let (r, w) = pipe.as_ref().ok_or("no pipe")?;
                let moved = check(
                    splice(s, None, w, None, CHUNK, SpliceFFlags::SPLICE_F_MOVE),
                    "splice from socket",
                )?;
                let mut got = 0;
                while got < moved {
                    got += check(read(r.as_raw_fd(), &mut buf[got..moved]), "read from pipe")?;
                }
                moved
            }
            "epoll" => match read(fd, &mut buf) {
                Ok(n) => n,
                Err(Errno::EAGAIN) => {
                    wait_ready(s, EpollFlags::EPOLLIN)?;
                    continue;
                }
                Err(err) => return Err(format!("read: {err}")),
            },
            other => return Err(format!("unknown recv method {other}")),
        };
        if n == 0 {
            return Ok(d);
        }
        d.update(&buf[..n]);
    }
}

/// A memfd holding `data`, for sendfile.
fn memfd_with(data: &[u8]) -> Result<OwnedFd, String> {
    let file = check(
        memfd_create(c"stream", MemFdCreateFlag::MFD_CLOEXEC),
        "memfd_create",
    )?;
    let mut written = 0;
    while written < data.len() {
        written += check(write(&file, &data[written..]), "write to memfd")?;
    }
    Ok(file)
}

fn set_nonblocking(s: &TcpStream, on: bool) -> Result<(), String> {
    let flags = check(fcntl(s.as_raw_fd(), FcntlArg::F_GETFL), "fcntl")?;
    let mut flags = OFlag::from_bits_retain(flags);
    flags.set(OFlag::O_NONBLOCK, on);
    check(fcntl(s.as_raw_fd(), FcntlArg::F_SETFL(flags)), "fcntl").map(|_| ())
}

/// Waits (bounded) until `fd` is ready for `events`.
fn wait_ready(fd: impl AsFd, events: EpollFlags) -> Result<(), String> {
    if !ready_within(fd, events, timeout())? {
        return Err("epoll_wait timed out: the stream stalled".into());
    }
    Ok(())
}

/// Whether `fd` turns ready for `events` (or an error or hang-up) within `wait`.
fn ready_within(fd: impl AsFd, events: EpollFlags, wait: Duration) -> Result<bool, String> {
    let epoll = check(Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC), "epoll_create1")?;
    let events = events | EpollFlags::EPOLLRDHUP | EpollFlags::EPOLLHUP | EpollFlags::EPOLLERR;
    check(epoll.add(fd, EpollEvent::new(events, 0)), "epoll_ctl")?;
    let wait = EpollTimeout::try_from(wait).map_err(|e| e.to_string())?;
    let mut ready = [EpollEvent::empty()];
    Ok(check(epoll.wait(&mut ready, wait), "epoll_wait")? > 0)
}
