//! A test-only OTLP trace receiver: the collector end of `OTEL_EXPORTER_OTLP_ENDPOINT`.
//!
//! It listens on 127.0.0.1 for both OTLP transports the binaries can use: gRPC
//! (`TraceService/Export`, built on `opentelemetry-proto`'s tonic types) and HTTP/protobuf
//! (`POST /v1/traces`). Every span it receives is kept, flattened, for tests to wait on and
//! assert about.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use prost::Message as _;
use tokio::sync::Notify;

/// One received span, flattened.
#[derive(Clone, Debug)]
pub struct ReceivedSpan {
    /// The `service.name` of the resource that sent it.
    pub service: String,
    pub name: String,
    /// Hex, as in `traceparent`.
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a root span.
    pub parent_span_id: String,
    /// `SPAN_KIND_SERVER` and so on, as OTLP names them (without the prefix: `SERVER`).
    pub kind: String,
    pub start_unix_nano: u64,
    pub end_unix_nano: u64,
    /// Attribute values as strings (ints, bools and doubles printed).
    pub attributes: BTreeMap<String, String>,
    /// `UNSET`, `OK` or `ERROR`.
    pub status: String,
    /// The spans it links to, as `(trace id, span id)`.
    pub links: Vec<(String, String)>,
}

impl ReceivedSpan {
    /// An attribute's value, if it has one.
    pub fn attr(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }

    /// How long the span lasted.
    pub fn duration(&self) -> Duration {
        Duration::from_nanos(self.end_unix_nano.saturating_sub(self.start_unix_nano))
    }
}

#[derive(Default)]
struct Received {
    spans: Mutex<Vec<ReceivedSpan>>,
    changed: Notify,
    /// Export requests seen, by transport.
    grpc: Mutex<usize>,
    http: Mutex<usize>,
}

impl Received {
    fn add(&self, request: ExportTraceServiceRequest) {
        let mut spans = self.spans.lock().unwrap_or_else(|e| e.into_inner());
        for resource in request.resource_spans {
            let service = resource
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| kv.value.as_ref()?.value.as_ref())
                .map(text)
                .unwrap_or_default();
            for scope in resource.scope_spans {
                for span in scope.spans {
                    let kind =
                        opentelemetry_proto::tonic::trace::v1::span::SpanKind::try_from(span.kind)
                            .map(|k| k.as_str_name().trim_start_matches("SPAN_KIND_").to_owned())
                            .unwrap_or_default();
                    let status = span
                        .status
                        .as_ref()
                        .and_then(|s| {
                            opentelemetry_proto::tonic::trace::v1::status::StatusCode::try_from(
                                s.code,
                            )
                            .ok()
                        })
                        .map(|c| {
                            c.as_str_name()
                                .trim_start_matches("STATUS_CODE_")
                                .to_owned()
                        })
                        .unwrap_or_else(|| "UNSET".to_owned());
                    spans.push(ReceivedSpan {
                        service: service.clone(),
                        name: span.name,
                        trace_id: hex(&span.trace_id),
                        span_id: hex(&span.span_id),
                        parent_span_id: hex(&span.parent_span_id),
                        kind,
                        start_unix_nano: span.start_time_unix_nano,
                        end_unix_nano: span.end_time_unix_nano,
                        attributes: span
                            .attributes
                            .into_iter()
                            .filter_map(|kv| Some((kv.key, text(kv.value?.value.as_ref()?))))
                            .collect(),
                        status,
                        links: span
                            .links
                            .iter()
                            .map(|l| (hex(&l.trace_id), hex(&l.span_id)))
                            .collect(),
                    });
                }
            }
        }
        drop(spans);
        self.changed.notify_waiters();
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn text(value: &Value) -> String {
    match value {
        Value::StringValue(s) => s.clone(),
        Value::BoolValue(b) => b.to_string(),
        Value::IntValue(i) => i.to_string(),
        Value::DoubleValue(d) => d.to_string(),
        other => format!("{other:?}"),
    }
}

struct Grpc(Arc<Received>);

#[tonic::async_trait]
impl TraceService for Grpc {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        *self.0.grpc.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        self.0.add(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// A running receiver; it stops when dropped.
pub struct Receiver {
    grpc: SocketAddr,
    http: SocketAddr,
    received: Arc<Received>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Receiver {
    /// Starts both listeners on 127.0.0.1.
    pub async fn start() -> std::io::Result<Self> {
        let received = Arc::new(Received::default());
        let grpc_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let http_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let (grpc, http) = (grpc_listener.local_addr()?, http_listener.local_addr()?);
        let service = TraceServiceServer::new(Grpc(received.clone()));
        let grpc_task = tokio::spawn(async move {
            let incoming = accepted(grpc_listener);
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(incoming)
                .await;
        });
        let http_received = received.clone();
        let http_task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = http_listener.accept().await else {
                    return;
                };
                let received = http_received.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let received = received.clone();
                        async move { Ok::<_, hyper::Error>(http_export(&received, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(Self {
            grpc,
            http,
            received,
            tasks: vec![grpc_task, http_task],
        })
    }

    /// `OTEL_EXPORTER_OTLP_ENDPOINT` for `OTEL_EXPORTER_OTLP_PROTOCOL=grpc`.
    pub fn grpc_endpoint(&self) -> String {
        format!("http://{}", self.grpc)
    }

    /// `OTEL_EXPORTER_OTLP_ENDPOINT` for `http/protobuf` (the exporter adds `/v1/traces`).
    pub fn http_endpoint(&self) -> String {
        format!("http://{}", self.http)
    }

    /// Export requests received so far over gRPC and over HTTP.
    pub fn exports(&self) -> (usize, usize) {
        (
            *self.received.grpc.lock().unwrap_or_else(|e| e.into_inner()),
            *self.received.http.lock().unwrap_or_else(|e| e.into_inner()),
        )
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.received
            .spans
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Waits until `done` holds for the spans received, up to `deadline`; returns them, or
    /// `Err` with what was received by then.
    pub async fn wait_for(
        &self,
        deadline: Duration,
        done: impl Fn(&[ReceivedSpan]) -> bool,
    ) -> Result<Vec<ReceivedSpan>, Vec<ReceivedSpan>> {
        let until = tokio::time::Instant::now() + deadline;
        loop {
            let changed = self.received.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let spans = self.spans();
            if done(&spans) {
                return Ok(spans);
            }
            if tokio::time::timeout_at(until, changed).await.is_err() {
                return Err(self.spans());
            }
        }
    }
}

async fn http_export(
    received: &Received,
    req: http::Request<hyper::body::Incoming>,
) -> http::Response<Full<Bytes>> {
    let reply = |status: http::StatusCode, body: &'static str| {
        let mut rsp = http::Response::new(Full::new(Bytes::from_static(body.as_bytes())));
        *rsp.status_mut() = status;
        rsp
    };
    if req.method() != http::Method::POST || req.uri().path() != "/v1/traces" {
        return reply(http::StatusCode::NOT_FOUND, "only POST /v1/traces\n");
    }
    let Ok(body) = req.into_body().collect().await else {
        return reply(http::StatusCode::BAD_REQUEST, "unreadable body\n");
    };
    match ExportTraceServiceRequest::decode(body.to_bytes()) {
        Ok(request) => {
            *received.http.lock().unwrap_or_else(|e| e.into_inner()) += 1;
            received.add(request);
            let mut rsp = http::Response::new(Full::new(Bytes::from(
                ExportTraceServiceResponse {
                    partial_success: None,
                }
                .encode_to_vec(),
            )));
            rsp.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/x-protobuf"),
            );
            rsp
        }
        Err(_) => reply(
            http::StatusCode::BAD_REQUEST,
            "not an ExportTraceServiceRequest\n",
        ),
    }
}

/// A listener's connections, as the stream tonic serves.
fn accepted(
    listener: tokio::net::TcpListener,
) -> impl futures_util::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    futures_util::stream::unfold(listener, |listener| async move {
        let accepted = listener.accept().await.map(|(stream, _)| stream);
        Some((accepted, listener))
    })
}
