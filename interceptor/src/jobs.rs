//! The example job service (`wakegate-interceptor jobs`): work that outlives its request.
//!
//! `POST /jobs` takes a job (`{"url": "http://..."}` to download, or `{"seconds": N}` to work
//! for N seconds in steps), answers `202 Accepted` with the job's id at once, and does the work
//! in the background. `GET /jobs/<id>` reports its progress, `GET /jobs` lists them all.
//!
//! Every response carries `Wakegate-Keep-Awake`: the time the running jobs still need, plus a
//! margin, or `0` once none is running. Behind the interceptor that keeps the service up while
//! it works with no request in flight, and lets it scale to zero once the work is done. Each
//! response renews the deadline from the job's progress, so a client that polls keeps a job
//! that runs late alive; one that never polls relies on the first estimate and its margin.
//!
//! Like the example backend, it binds its port only after `--boot-delay`, to play a slow app.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Full, Limited};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::server::{self, ConnectionSettings};

/// Flags of the job service.
#[derive(Clone, Debug, clap::Args)]
pub struct JobsArgs {
    /// Port to listen on (local mode sets PORT for the commands it starts).
    #[arg(long, env = "PORT", default_value_t = 18002)]
    pub port: u16,
    /// Address to listen on.
    #[arg(long, env = "WAKEGATE_JOBS_HOST", default_value = "127.0.0.1")]
    pub host: IpAddr,
    /// Time to wait before binding the port, to play a slow boot (e.g. 2s).
    #[arg(long, env = "WAKEGATE_JOBS_BOOT_DELAY", default_value = "2s", value_parser = humantime::parse_duration)]
    pub boot_delay: Duration,
    /// How long one step of a `seconds` job takes; progress moves once per step.
    #[arg(long, env = "WAKEGATE_JOBS_STEP", default_value = "1s", value_parser = humantime::parse_duration)]
    pub step: Duration,
    /// Added to the time the running jobs still need when asking to be kept awake, so a job
    /// that runs a little late is not cut off.
    #[arg(long, env = "WAKEGATE_JOBS_KEEP_AWAKE_MARGIN", default_value = "30s", value_parser = humantime::parse_duration)]
    pub keep_awake_margin: Duration,
    /// Download speed of `url` jobs, in bytes per second (a Pi on a slow link).
    #[arg(long, env = "WAKEGATE_JOBS_DOWNLOAD_RATE", default_value_t = 1 << 20, value_parser = clap::value_parser!(u64).range(1..))]
    pub download_rate: u64,
    /// The largest download; a longer one fails.
    #[arg(long, env = "WAKEGATE_JOBS_MAX_DOWNLOAD", default_value_t = 256 << 20)]
    pub max_download: u64,
    /// Most jobs kept (running and finished); past it, the oldest finished one is forgotten,
    /// and a new job is refused with 503 when all are running.
    #[arg(long, env = "WAKEGATE_JOBS_MAX_JOBS", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_jobs: u32,
}

/// The longest `seconds` job.
const MAX_SECONDS: u64 = 24 * 3600;
/// The largest `POST /jobs` body.
const MAX_REQUEST_BODY: usize = 8 * 1024;
/// How long a `url` job waits for the response headers.
const FETCH_HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// What a `url` job is guessed to take until it knows the download's size.
const UNKNOWN_SIZE_GUESS: Duration = Duration::from_secs(60);

type Body = Full<Bytes>;

/// What `POST /jobs` takes.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewJob {
    /// Download this (http:// only).
    url: Option<String>,
    /// Or work this many seconds.
    seconds: Option<u64>,
}

/// One job, as `GET /jobs/<id>` shows it.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct JobView {
    id: u64,
    /// `running`, `done` or `failed`.
    state: &'static str,
    /// From 0 to 1.
    progress: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bytes: Option<u64>,
    /// Seconds the job is expected to need still.
    remaining_seconds: f64,
    elapsed_seconds: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

#[derive(Debug)]
struct Job {
    view: JobView,
    started: Instant,
    /// When the job is expected to end, from its progress so far.
    expected_end: Instant,
}

#[derive(Debug)]
struct Jobs {
    next_id: u64,
    jobs: BTreeMap<u64, Job>,
    max: usize,
    margin: Duration,
}

impl Jobs {
    fn update(&mut self, id: u64, f: impl FnOnce(&mut Job)) {
        if let Some(job) = self.jobs.get_mut(&id) {
            f(job);
        }
    }

    /// What to ask the interceptor for: the longest time a running job still needs, plus the
    /// margin; zero (release) when none runs.
    fn keep_awake(&self, now: Instant) -> Duration {
        self.jobs
            .values()
            .filter(|j| j.view.state == "running")
            .map(|j| j.expected_end.saturating_duration_since(now) + self.margin)
            .max()
            .unwrap_or_default()
    }

    fn view(&self, id: u64, now: Instant) -> Option<JobView> {
        let job = self.jobs.get(&id)?;
        let mut view = job.view.clone();
        if view.state == "running" {
            view.remaining_seconds = job
                .expected_end
                .saturating_duration_since(now)
                .as_secs_f64();
            view.elapsed_seconds = now.duration_since(job.started).as_secs_f64();
        }
        Some(view)
    }

    /// Makes room for one more job: forgets the oldest finished one if full.
    fn make_room(&mut self) -> bool {
        if self.jobs.len() < self.max {
            return true;
        }
        let oldest_done = self
            .jobs
            .iter()
            .find(|(_, j)| j.view.state != "running")
            .map(|(id, _)| *id);
        match oldest_done {
            Some(id) => {
                self.jobs.remove(&id);
                true
            }
            None => false,
        }
    }
}

#[derive(Clone)]
struct Service {
    jobs: Arc<Mutex<Jobs>>,
    args: Arc<JobsArgs>,
    client: Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>,
    stop: CancellationToken,
}

/// Runs the job service until SIGTERM or SIGINT.
pub async fn run(args: JobsArgs) -> anyhow::Result<()> {
    let addr = SocketAddr::new(args.host, args.port);
    tracing::info!(%addr, boot_delay_ms = args.boot_delay.as_millis() as u64, "job service booting");
    tokio::time::sleep(args.boot_delay).await;
    let listener = server::bind(addr)?;
    tracing::info!(%addr, pid = std::process::id(), "job service listening");
    let stop = crate::signal::stop_on_terminate();
    let service = Service {
        jobs: Arc::new(Mutex::new(Jobs {
            next_id: 1,
            jobs: BTreeMap::new(),
            max: args.max_jobs as usize,
            margin: args.keep_awake_margin,
        })),
        args: Arc::new(args),
        client: Client::builder(TokioExecutor::new()).build_http(),
        stop: stop.clone(),
    };
    server::serve(
        listener,
        None,
        move |req, _remote| {
            let service = service.clone();
            async move { service.handle(req).await }
        },
        ConnectionSettings::internal(Duration::from_secs(10)),
        stop,
        Duration::from_secs(5),
    )
    .await;
    Ok(())
}

impl Service {
    fn lock(&self) -> std::sync::MutexGuard<'_, Jobs> {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let path = req.uri().path().to_owned();
        let mut rsp = match (req.method(), path.as_str()) {
            (_, "/healthz") => text(StatusCode::OK, "ok\n"),
            (&Method::POST, "/jobs") => self.create(req).await,
            (&Method::GET, "/jobs") => {
                let now = Instant::now();
                let jobs = self.lock();
                let all: Vec<JobView> = jobs
                    .jobs
                    .keys()
                    .filter_map(|id| jobs.view(*id, now))
                    .collect();
                json(StatusCode::OK, &all)
            }
            (&Method::GET, p) if p.starts_with("/jobs/") => {
                match p["/jobs/".len()..]
                    .parse::<u64>()
                    .ok()
                    .and_then(|id| self.lock().view(id, Instant::now()))
                {
                    Some(view) => json(StatusCode::OK, &view),
                    None => text(StatusCode::NOT_FOUND, "no such job\n"),
                }
            }
            (_, "/jobs") => text(
                StatusCode::METHOD_NOT_ALLOWED,
                "POST a job, or GET the list\n",
            ),
            _ => text(StatusCode::NOT_FOUND, "try POST /jobs, GET /jobs/<id>\n"),
        };
        // Every answer renews (or releases) the keep-awake deadline from the work left now.
        let keep_awake = self.lock().keep_awake(Instant::now());
        let secs = keep_awake.as_secs() + u64::from(keep_awake.subsec_nanos() > 0);
        rsp.headers_mut()
            .insert("wakegate-keep-awake", HeaderValue::from(secs));
        rsp
    }

    async fn create(&self, req: Request<Incoming>) -> Response<Body> {
        let body = match Limited::new(req.into_body(), MAX_REQUEST_BODY)
            .collect()
            .await
        {
            Ok(body) => body.to_bytes(),
            Err(_) => {
                return text(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "a job is at most 8 KiB of JSON\n",
                )
            }
        };
        let job = match parse_job(&body) {
            Ok(job) => job,
            Err(problem) => return text(StatusCode::BAD_REQUEST, &format!("{problem}\n")),
        };
        let now = Instant::now();
        let (id, view) = {
            let mut jobs = self.lock();
            if !jobs.make_room() {
                return text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "too many jobs running; try again later\n",
                );
            }
            let id = jobs.next_id;
            jobs.next_id += 1;
            let expected = match &job {
                Work::Sleep(d) => *d,
                Work::Download(_) => UNKNOWN_SIZE_GUESS,
            };
            let view = JobView {
                id,
                state: "running",
                progress: 0.0,
                url: match &job {
                    Work::Download(uri) => Some(uri.to_string()),
                    Work::Sleep(_) => None,
                },
                bytes: matches!(job, Work::Download(_)).then_some(0),
                remaining_seconds: expected.as_secs_f64(),
                elapsed_seconds: 0.0,
                error: None,
            };
            jobs.jobs.insert(
                id,
                Job {
                    view: view.clone(),
                    started: now,
                    expected_end: now + expected,
                },
            );
            (id, view)
        };
        tracing::info!(job = id, "job accepted");
        let service = self.clone();
        tokio::spawn(async move {
            let outcome = tokio::select! {
                outcome = service.work(id, job) => outcome,
                () = service.stop.cancelled() => Err("the service stopped before the job ended".to_owned()),
            };
            let now = Instant::now();
            service.lock().update(id, |j| {
                j.view.elapsed_seconds = now.duration_since(j.started).as_secs_f64();
                j.view.remaining_seconds = 0.0;
                match outcome {
                    Ok(()) => {
                        j.view.state = "done";
                        j.view.progress = 1.0;
                    }
                    Err(ref error) => {
                        j.view.state = "failed";
                        j.view.error = Some(error.clone());
                    }
                }
            });
            match outcome {
                Ok(()) => tracing::info!(job = id, "job done"),
                Err(error) => tracing::warn!(job = id, %error, "job failed"),
            }
        });
        let mut rsp = json(StatusCode::ACCEPTED, &view);
        if let Ok(location) = HeaderValue::try_from(format!("/jobs/{id}")) {
            rsp.headers_mut().insert(header::LOCATION, location);
        }
        rsp
    }

    async fn work(&self, id: u64, job: Work) -> Result<(), String> {
        match job {
            Work::Sleep(total) => {
                let step = self.args.step.max(Duration::from_millis(1));
                let start = Instant::now();
                loop {
                    let done = start.elapsed();
                    if done >= total {
                        return Ok(());
                    }
                    tokio::time::sleep(step.min(total - done)).await;
                    let done = start.elapsed().min(total);
                    self.lock().update(id, |j| {
                        j.view.progress = done.as_secs_f64() / total.as_secs_f64().max(1e-9);
                    });
                }
            }
            Work::Download(uri) => self.download(id, uri).await,
        }
    }

    /// Fetches `uri` at the configured rate, counting bytes and re-estimating the end.
    async fn download(&self, id: u64, uri: Uri) -> Result<(), String> {
        let mut req = Request::new(Empty::new());
        *req.uri_mut() = uri;
        let rsp = tokio::time::timeout(FETCH_HEADER_TIMEOUT, self.client.request(req))
            .await
            .map_err(|_| "the download did not answer in 30 s".to_owned())?
            .map_err(|e| format!("the download failed: {e}"))?;
        if !rsp.status().is_success() {
            return Err(format!("the download answered {}", rsp.status()));
        }
        let size = rsp
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if size.is_some_and(|n| n > self.args.max_download) {
            return Err(format!(
                "the download is over {} bytes",
                self.args.max_download
            ));
        }
        let rate = self.args.download_rate as f64;
        let start = Instant::now();
        let mut got = 0u64;
        let mut body = rsp.into_body();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| format!("the download broke off: {e}"))?;
            let Some(data) = frame.data_ref() else {
                continue;
            };
            got += data.len() as u64;
            if got > self.args.max_download {
                return Err(format!(
                    "the download is over {} bytes",
                    self.args.max_download
                ));
            }
            // Play a slow link: no faster than the rate.
            let due = start + Duration::from_secs_f64(got as f64 / rate);
            tokio::time::sleep_until(due).await;
            let now = Instant::now();
            self.lock().update(id, |j| {
                j.view.bytes = Some(got);
                if let Some(size) = size {
                    j.view.progress = got as f64 / size.max(1) as f64;
                    j.expected_end =
                        now + Duration::from_secs_f64(size.saturating_sub(got) as f64 / rate);
                } else {
                    j.expected_end = now + UNKNOWN_SIZE_GUESS;
                }
            });
        }
        if size.is_some_and(|n| got < n) {
            return Err(format!(
                "the download ended after {got} of {} bytes",
                size.unwrap_or(0)
            ));
        }
        Ok(())
    }
}

#[derive(Debug)]
enum Work {
    Sleep(Duration),
    Download(Uri),
}

/// Reads a job: JSON (`{"url": ...}` or `{"seconds": N}`), or a bare URL as the whole body.
fn parse_job(body: &[u8]) -> Result<Work, String> {
    let text = std::str::from_utf8(body).map_err(|_| "the job is not UTF-8".to_owned())?;
    let text = text.trim();
    let job = if text.starts_with('{') {
        serde_json::from_str::<NewJob>(text).map_err(|e| format!("the job is not valid: {e}"))?
    } else if text.is_empty() {
        return Err(r#"POST a job: {"url": "http://..."} or {"seconds": 10}"#.to_owned());
    } else {
        NewJob {
            url: Some(text.to_owned()),
            seconds: None,
        }
    };
    match (job.url, job.seconds) {
        (Some(url), None) => {
            let uri: Uri = url.parse().map_err(|_| format!("{url:?} is not a URL"))?;
            if uri.scheme_str() != Some("http") || uri.authority().is_none() {
                return Err(format!(
                    "{url:?} is not an http:// URL (https is not supported here)"
                ));
            }
            Ok(Work::Download(uri))
        }
        (None, Some(seconds)) if (1..=MAX_SECONDS).contains(&seconds) => {
            Ok(Work::Sleep(Duration::from_secs(seconds)))
        }
        (None, Some(_)) => Err(format!("seconds must be from 1 to {MAX_SECONDS}")),
        _ => Err(r#"give either "url" or "seconds""#.to_owned()),
    }
}

fn text(status: StatusCode, body: &str) -> Response<Body> {
    let mut rsp = Response::new(Full::new(Bytes::copy_from_slice(body.as_bytes())));
    *rsp.status_mut() = status;
    rsp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    rsp
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    let mut body = serde_json::to_vec(value).unwrap_or_default();
    body.push(b'\n');
    let mut rsp = Response::new(Full::new(Bytes::from(body)));
    *rsp.status_mut() = status;
    rsp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    rsp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_are_read_from_json_or_a_bare_url() {
        assert!(
            matches!(parse_job(br#"{"seconds": 5}"#), Ok(Work::Sleep(d)) if d == Duration::from_secs(5))
        );
        assert!(matches!(
            parse_job(b"http://127.0.0.1:9/video.mp4\n"),
            Ok(Work::Download(_))
        ));
        assert!(matches!(
            parse_job(br#"{"url": "http://a.example/v"}"#),
            Ok(Work::Download(_))
        ));
        for (body, problem) in [
            (&b""[..], "POST a job"),
            (br#"{"seconds": 0}"#, "from 1 to"),
            (br#"{"url": "https://a.example/v"}"#, "not an http:// URL"),
            (br#"{"url": "x", "seconds": 1}"#, "either"),
            (br#"{"colour": 1}"#, "not valid"),
            (b"\xff", "UTF-8"),
        ] {
            let err = parse_job(body).unwrap_err();
            assert!(err.contains(problem), "{err:?} should say {problem:?}");
        }
    }

    #[test]
    fn keep_awake_covers_the_longest_running_job_and_is_released_when_none_runs() {
        let now = Instant::now();
        let mut jobs = Jobs {
            next_id: 1,
            jobs: BTreeMap::new(),
            max: 2,
            margin: Duration::from_secs(30),
        };
        assert_eq!(jobs.keep_awake(now), Duration::ZERO);
        let job = |state, end: Duration| Job {
            view: JobView {
                id: 0,
                state,
                progress: 0.0,
                url: None,
                bytes: None,
                remaining_seconds: 0.0,
                elapsed_seconds: 0.0,
                error: None,
            },
            started: now,
            expected_end: now + end,
        };
        jobs.jobs.insert(1, job("running", Duration::from_secs(10)));
        jobs.jobs
            .insert(2, job("running", Duration::from_secs(100)));
        assert_eq!(jobs.keep_awake(now), Duration::from_secs(130));
        assert!(!jobs.make_room(), "full of running jobs");
        jobs.update(2, |j| j.view.state = "done");
        assert_eq!(jobs.keep_awake(now), Duration::from_secs(40));
        assert!(jobs.make_room(), "a finished job makes room");
        assert_eq!(jobs.jobs.keys().collect::<Vec<_>>(), [&1]);
    }
}
