//! The agent's HTTP endpoint: `/livez`, `/healthz` and `/metrics` (GET only), served by
//! hyper's HTTP/1 server on a current-thread tokio runtime.
//!
//! Every connection is a task on that one thread, so a thousand slow clients are a thousand
//! small tasks, not threads. At most [`MAX_CONNECTIONS`] are open: the one accepted after
//! them closes the oldest (a probe or a scrape is answered in milliseconds, so the oldest is
//! one that is slow to send its request), and a kubelet probe is never queued behind them.
//! A request's headers must arrive within [`HEADER_TIMEOUT`], a connection serves one request,
//! and none lasts longer than [`CONNECTION_LIFETIME`]. `/metrics`, which walks every map, is rendered by one worker
//! thread started with the endpoint; `/livez` touches nothing but the socket.
//!
//! Both threads start with the endpoint, whose start fails if they cannot: no thread is
//! spawned afterwards, and an accept that fails (no file descriptor left) is retried.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::AbortHandle;

use super::{metrics, Stats};
use crate::agent::context::Context;
use meshbpf::Result;

/// The most connections open at once; the next one closes the oldest.
pub const MAX_CONNECTIONS: usize = 128;
/// How long a client has to send a request's headers (kubelet and Prometheus send them at
/// once).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a connection may stay open (a client slow to read a large `/metrics`).
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(30);
/// The largest request head read (hyper's minimum): the endpoint takes no request body.
const MAX_BUF: usize = 8192;
/// Scrapes waiting for the metrics worker beyond which `/metrics` answers 503.
const QUEUED_SCRAPES: usize = 4;

/// What every connection's task shares.
struct Shared {
    stats: Arc<Stats>,
    /// The attachment's pins: /healthz reads the programs' order from it.
    pin_dir: std::path::PathBuf,
    /// The metrics worker's queue: each scrape sends where its text goes.
    scrapes: SyncSender<oneshot::Sender<String>>,
}

/// Serves `listener` until the process exits, on two threads of its own (the runtime and the
/// metrics worker); fails, serving nothing, if either cannot start.
pub(super) fn serve(
    listener: std::net::TcpListener,
    pin_dir: &Path,
    stats: Arc<Stats>,
) -> Result<SocketAddr> {
    let bound = listener
        .local_addr()
        .context(|| "reading the listening address".into())?;
    listener
        .set_nonblocking(true)
        .context(|| format!("making {bound} non-blocking"))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .context(|| "starting the HTTP endpoint's runtime".into())?;
    let listener = {
        let _entered = runtime.enter();
        TcpListener::from_std(listener).context(|| format!("serving {bound}"))?
    };
    let (scrapes, queue) = sync_channel::<oneshot::Sender<String>>(QUEUED_SCRAPES);
    let worker_stats = stats.clone();
    let shared_pin_dir = pin_dir.to_path_buf();
    let pin_dir = pin_dir.to_path_buf();
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for reply in queue {
                // A client that left meanwhile drops its receiver: nothing to do.
                let _ = reply.send(metrics::render(&pin_dir, &worker_stats));
            }
        })
        .context(|| "starting the metrics worker thread".into())?;
    let shared = Arc::new(Shared {
        stats,
        pin_dir: shared_pin_dir,
        scrapes,
    });
    std::thread::Builder::new()
        .name("http".into())
        .spawn(move || runtime.block_on(accept_loop(listener, shared)))
        .context(|| "starting the HTTP endpoint's thread".into())?;
    Ok(bound)
}

/// Accepts connections for ever, each a task; keeps at most [`MAX_CONNECTIONS`] open.
async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut open: VecDeque<AbortHandle> = VecDeque::with_capacity(MAX_CONNECTIONS);
    let mut last_warning: Option<Instant> = None;
    loop {
        open.retain(|task| !task.is_finished());
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(err) => {
                // EMFILE and the like: the pending connection stays queued in the kernel.
                // Closing the oldest connection frees a descriptor for it.
                if let Some(oldest) = open.pop_front() {
                    oldest.abort();
                    shared.stats.http_evicted.fetch_add(1, Ordering::Relaxed);
                }
                if last_warning.is_none_or(|at| at.elapsed() > Duration::from_secs(10)) {
                    last_warning = Some(Instant::now());
                    tracing::warn!(error = %err, "accepting a connection to the HTTP endpoint");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if open.len() >= MAX_CONNECTIONS {
            if let Some(oldest) = open.pop_front() {
                oldest.abort();
                shared.stats.http_evicted.fetch_add(1, Ordering::Relaxed);
            }
        }
        let task = tokio::spawn(connection(stream, shared.clone()));
        open.push_back(task.abort_handle());
    }
}

/// Serves one connection's requests until the client closes it or a timeout does.
async fn connection(stream: TcpStream, shared: Arc<Shared>) {
    let service = service_fn(move |request| {
        let shared = shared.clone();
        async move { Ok::<_, Infallible>(respond(&request, &shared).await) }
    });
    // One request per connection (`Connection: close`), as before hyper: probes and scrapes
    // come seconds apart, a connection kept idle between them would only hold a slot, and a
    // client that reads to the end of the stream gets it at once.
    let served = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(MAX_BUF)
        .keep_alive(false)
        .serve_connection(TokioIo::new(stream), service);
    // A failed or timed-out connection is the client's problem, not the agent's.
    let _ = tokio::time::timeout(CONNECTION_LIFETIME, served).await;
}

async fn respond(request: &Request<Incoming>, shared: &Shared) -> Response<Full<Bytes>> {
    if request.method() != Method::GET {
        let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into());
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET"));
        return response;
    }
    match request.uri().path() {
        "/livez" => text(StatusCode::OK, "ok\n".into()),
        // Not ready either while another program (a CNI's socket load balancer) runs
        // before capture: a few bpf(2) queries, no map walk.
        "/healthz" => match [shared.stats.problems(), order_problem(&shared.pin_dir)].concat() {
            problems if problems.is_empty() => text(StatusCode::OK, "ok\n".into()),
            problems => text(StatusCode::SERVICE_UNAVAILABLE, problems.join("\n") + "\n"),
        },
        "/metrics" => {
            let (reply, rendered) = oneshot::channel();
            match shared.scrapes.try_send(reply) {
                Ok(()) => match rendered.await {
                    Ok(body) => {
                        let mut response = text(StatusCode::OK, body);
                        response.headers_mut().insert(
                            CONTENT_TYPE,
                            HeaderValue::from_static(metrics::CONTENT_TYPE),
                        );
                        response
                    }
                    Err(_) => text(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "the metrics worker stopped; restart the agent\n".into(),
                    ),
                },
                Err(TrySendError::Full(_)) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "too many scrapes at once; try again\n".into(),
                ),
                Err(TrySendError::Disconnected(_)) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "the metrics worker stopped; restart the agent\n".into(),
                ),
            }
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "try /livez, /healthz or /metrics\n".into(),
        ),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Other programs that run before meshbpf's capture programs, as a /healthz problem.
fn order_problem(pin_dir: &Path) -> Vec<String> {
    meshbpf::Mesh::open(pin_dir)
        .and_then(|mesh| mesh.order_problem())
        .ok()
        .flatten()
        .into_iter()
        .collect()
}
