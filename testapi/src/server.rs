//! The HTTP side: Kubernetes REST paths, verbs, patch types, list and watch streams.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use crate::resources::{self, ResourceDef};
use crate::selector::Selector;
use crate::store::{resource_key, ApiError, Part, Store, WatchStart};

type Body = UnsyncBoxBody<Bytes, Infallible>;

/// A running test API server on 127.0.0.1.
#[derive(Debug)]
pub struct ApiServer {
    addr: SocketAddr,
    inner: Arc<Inner>,
    stop: CancellationToken,
}

#[derive(Debug)]
struct Inner {
    store: Arc<Store>,
    defs: Vec<ResourceDef>,
    /// `plural.group` of kinds defined but not served yet (a CRD installed later).
    unserved: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl Inner {
    fn served(&self, def: &ResourceDef) -> bool {
        !self
            .unserved
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(&resource_key(def))
    }

    fn served_defs(&self) -> Vec<ResourceDef> {
        self.defs
            .iter()
            .filter(|d| self.served(d))
            .cloned()
            .collect()
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl ApiServer {
    /// Starts a server for `defs` on a free port.
    pub async fn start(defs: Vec<ResourceDef>) -> std::io::Result<Self> {
        Self::start_with_unserved(defs, Vec::new()).await
    }

    /// Starts a server for `defs`, of which `later` (`plural.group`) are not served until
    /// [`ApiServer::serve`]: a CRD installed while components run.
    pub async fn start_with_unserved(
        defs: Vec<ResourceDef>,
        later: Vec<String>,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let inner = Arc::new(Inner {
            store: Arc::new(Store::default()),
            defs,
            unserved: std::sync::Mutex::new(later.into_iter().collect()),
        });
        let stop = CancellationToken::new();
        tokio::spawn(serve(listener, inner.clone(), stop.clone()));
        Ok(Self { addr, inner, stop })
    }

    /// Starts serving a kind held back at start (`plural.group`).
    pub fn serve(&self, resource: &str) {
        self.inner
            .unserved
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(resource);
    }

    /// The server's base URL, `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig pointing at this server, for binaries that read `KUBECONFIG`.
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: test\n    namespace: default\ncurrent-context: test\nusers:\n- name: test\n  user: {{}}\n",
            self.url()
        )
    }

    /// The store behind the server, for fixtures and simulators.
    pub fn store(&self) -> Arc<Store> {
        self.inner.store.clone()
    }

    /// The definition of a served resource, by plural and group.
    pub fn def(&self, plural: &str, group: &str) -> Option<ResourceDef> {
        self.inner
            .defs
            .iter()
            .find(|d| d.plural == plural && d.group == group)
            .cloned()
    }
}

async fn serve(listener: TcpListener, inner: Arc<Inner>, stop: CancellationToken) {
    loop {
        let stream = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
        };
        let inner = inner.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let inner = inner.clone();
                async move { Ok::<_, Infallible>(inner.handle(req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::select! {
                _ = conn => {}
                () = stop.cancelled() => {}
            }
        });
    }
}

fn full(status: StatusCode, body: Value) -> Response<Body> {
    let mut rsp = Response::new(Full::new(Bytes::from(body.to_string())).boxed_unsync());
    *rsp.status_mut() = status;
    rsp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    rsp
}

fn error(err: &ApiError) -> Response<Body> {
    full(
        StatusCode::from_u16(err.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        err.to_status(),
    )
}

/// Where a resource path points.
struct Target<'a> {
    def: &'a ResourceDef,
    namespace: Option<String>,
    name: Option<String>,
    sub: Option<String>,
}

impl Inner {
    async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let path = req.uri().path().trim_end_matches('/').to_owned();
        let query: HashMap<String, String> = req
            .uri()
            .query()
            .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
            .unwrap_or_default();
        let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        let (group, version, rest) = match segs.as_slice() {
            ["version"] => {
                return full(
                    StatusCode::OK,
                    json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0-wakegate-testapi", "platform": "linux/amd64"}),
                )
            }
            ["api"] => return full(StatusCode::OK, resources::core_versions()),
            ["apis"] => return full(StatusCode::OK, resources::group_list(&self.served_defs())),
            ["api", version, rest @ ..] => ("", *version, rest),
            ["apis", group, version, rest @ ..] => (*group, *version, rest),
            _ => {
                return error(&ApiError::new(
                    404,
                    "NotFound",
                    format!("the server could not find the requested resource ({path})"),
                ))
            }
        };
        if rest.is_empty() {
            return match resources::resource_list(&self.served_defs(), group, version) {
                Some(list) => full(StatusCode::OK, list),
                None => error(&ApiError::new(
                    404,
                    "NotFound",
                    format!("no resources are served at {path}"),
                )),
            };
        }
        let Some(target) = self.target(group, version, rest) else {
            return error(&ApiError::new(
                404,
                "NotFound",
                format!("the server could not find the requested resource ({path})"),
            ));
        };
        let method = req.method().clone();
        let impersonated = req
            .headers()
            .get("impersonate-user")
            .and_then(|v| v.to_str().ok())
            .and_then(crate::rbac::ServiceAccount::parse);
        if let Some(sa) = impersonated {
            let watching = query.get("watch").is_some_and(|w| w == "true" || w == "1");
            let verb = match (&method, &target.name) {
                (&Method::GET, Some(_)) => "get",
                (&Method::GET, None) if watching => "watch",
                (&Method::GET, None) => "list",
                (&Method::POST, _) => "create",
                (&Method::PUT, _) => "update",
                (&Method::PATCH, _) => "patch",
                (&Method::DELETE, _) => "delete",
                _ => "unknown",
            };
            let attrs = crate::rbac::Attributes {
                verb,
                def: target.def,
                subresource: target.sub.as_deref(),
                namespace: target.namespace.as_deref(),
                name: target.name.as_deref(),
            };
            if let Err(err) = crate::rbac::authorize(&self.store, &self.defs, &sa, &attrs) {
                tracing::debug!(error = %err.message, "forbidden");
                return error(&err);
            }
        }
        let content_type = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("application/json")
            .to_owned();
        let body = match req.into_body().collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => {
                return error(&ApiError::new(
                    400,
                    "BadRequest",
                    format!("reading the body: {e}"),
                ))
            }
        };
        let result = match (&method, &target.name) {
            (&Method::GET, None) => {
                if query.get("watch").is_some_and(|w| w == "true" || w == "1") {
                    return self.watch(&target, &query);
                }
                self.list(&target, &query)
            }
            (&Method::GET, Some(name)) => self.get(&target, name),
            (&Method::POST, None) => self.create(&target, &body),
            (&Method::PUT, Some(name)) => self.replace(&target, name, &body),
            (&Method::PATCH, Some(name)) => self.patch(&target, name, &content_type, &body),
            (&Method::DELETE, Some(name)) => self.store.delete(target.def, ns(&target), name),
            _ => Err(ApiError::new(
                405,
                "MethodNotAllowed",
                format!("{method} is not supported on {path}"),
            )),
        };
        match result {
            Ok(value) => {
                let code = if method == Method::POST {
                    StatusCode::CREATED
                } else {
                    StatusCode::OK
                };
                full(code, value)
            }
            Err(err) => error(&err),
        }
    }

    fn target<'a>(&'a self, group: &str, version: &str, rest: &[&str]) -> Option<Target<'a>> {
        let find = |plural: &str| {
            self.defs.iter().find(|d| {
                d.group == group && d.version == version && d.plural == plural && self.served(d)
            })
        };
        if let ["namespaces", ns, plural, tail @ ..] = rest {
            if let Some(def) = find(plural).filter(|d| d.namespaced) {
                return Some(Target {
                    def,
                    namespace: Some((*ns).to_owned()),
                    name: tail.first().map(|s| (*s).to_owned()),
                    sub: tail.get(1).map(|s| (*s).to_owned()),
                });
            }
        }
        let (plural, tail) = rest.split_first()?;
        let def = find(plural)?;
        Some(Target {
            def,
            namespace: None,
            name: tail.first().map(|s| (*s).to_owned()),
            sub: tail.get(1).map(|s| (*s).to_owned()),
        })
    }

    fn list(
        &self,
        target: &Target<'_>,
        query: &HashMap<String, String>,
    ) -> Result<Value, ApiError> {
        let filter = Filter::new(query)?;
        let (items, rv) = self
            .store
            .list(target.def, target.namespace.as_deref(), |v| {
                filter.matches(v)
            });
        Ok(json!({
            "apiVersion": target.def.api_version(),
            "kind": format!("{}List", target.def.kind),
            "metadata": {"resourceVersion": rv.to_string()},
            "items": items,
        }))
    }

    fn get(&self, target: &Target<'_>, name: &str) -> Result<Value, ApiError> {
        let obj = self.store.get(target.def, ns(target), name)?;
        match target.sub.as_deref() {
            None | Some("status") => Ok(obj),
            Some("scale") => scale_view(target.def, &obj),
            Some(other) => Err(ApiError::new(
                404,
                "NotFound",
                format!("no subresource {other}"),
            )),
        }
    }

    fn create(&self, target: &Target<'_>, body: &[u8]) -> Result<Value, ApiError> {
        let obj = parse_body(body)?;
        if let (Some(path_ns), Some(body_ns)) =
            (&target.namespace, obj["metadata"]["namespace"].as_str())
        {
            if path_ns != body_ns {
                return Err(ApiError::new(
                    400,
                    "BadRequest",
                    "the namespace of the object does not match the namespace of the request",
                ));
            }
        }
        self.store.create(target.def, ns(target), obj)
    }

    fn replace(&self, target: &Target<'_>, name: &str, body: &[u8]) -> Result<Value, ApiError> {
        let incoming = parse_body(body)?;
        match target.sub.as_deref() {
            Some("scale") => self.write_scale(target, name, |_| Ok(incoming)),
            sub => self
                .store
                .update(target.def, ns(target), name, part(sub)?, |obj| {
                    *obj = incoming;
                    Ok(())
                }),
        }
    }

    fn patch(
        &self,
        target: &Target<'_>,
        name: &str,
        content_type: &str,
        body: &[u8],
    ) -> Result<Value, ApiError> {
        let patch = parse_body(body)?;
        let kind = content_type
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_owned();
        if target.sub.as_deref() == Some("scale") {
            return self.write_scale(target, name, |mut scale| {
                apply_patch(&mut scale, &kind, &patch)?;
                Ok(scale)
            });
        }
        let part = part(target.sub.as_deref())?;
        let result = self
            .store
            .update(target.def, ns(target), name, part, |obj| {
                // A patch never carries optimistic concurrency unless it sets resourceVersion itself.
                let had_rv = patch["metadata"]["resourceVersion"].is_string();
                apply_patch(obj, &kind, &patch)?;
                if !had_rv {
                    if let Some(m) = obj["metadata"].as_object_mut() {
                        m.remove("resourceVersion");
                    }
                }
                Ok(())
            });
        match result {
            // Server-side apply creates what does not exist yet.
            Err(e)
                if e.code == 404
                    && kind == "application/apply-patch+yaml"
                    && target.sub.is_none() =>
            {
                let mut obj = patch;
                obj["metadata"]["name"] = json!(name);
                self.store.create(target.def, ns(target), obj)
            }
            other => other,
        }
    }

    fn write_scale(
        &self,
        target: &Target<'_>,
        name: &str,
        change: impl FnOnce(Value) -> Result<Value, ApiError>,
    ) -> Result<Value, ApiError> {
        let paths = target.def.scale.clone().ok_or_else(|| {
            ApiError::new(
                404,
                "NotFound",
                format!("{} has no scale subresource", target.def.plural),
            )
        })?;
        let updated = self
            .store
            .update(target.def, ns(target), name, Part::Main, |obj| {
                let before = obj["metadata"]["resourceVersion"].clone();
                let scale = change(scale_view(target.def, obj)?)?;
                // A resourceVersion in the written Scale is a precondition, as on a real server.
                let given = &scale["metadata"]["resourceVersion"];
                if !given.is_null() && *given != before {
                    return Err(ApiError::new(
                        409,
                        "Conflict",
                        format!("Operation cannot be fulfilled on {}.{} \"{name}\": the object has been modified; please apply your changes to the latest version and try again", target.def.plural, target.def.group),
                    ));
                }
                let replicas = scale["spec"]["replicas"].as_i64().ok_or_else(|| {
                    ApiError::new(422, "Invalid", "spec.replicas must be an integer")
                })?;
                if replicas < 0 {
                    return Err(ApiError::new(
                        422,
                        "Invalid",
                        "spec.replicas must not be negative",
                    ));
                }
                set_pointer(obj, paths.spec_replicas, json!(replicas));
                if let Some(m) = obj["metadata"].as_object_mut() {
                    m.remove("resourceVersion");
                }
                Ok(())
            })?;
        scale_view(target.def, &updated)
    }

    fn watch(&self, target: &Target<'_>, query: &HashMap<String, String>) -> Response<Body> {
        let filter = match Filter::new(query) {
            Ok(f) => f,
            Err(e) => return error(&e),
        };
        let since = query
            .get("resourceVersion")
            .filter(|rv| !rv.is_empty() && *rv != "0")
            .and_then(|rv| rv.parse::<u64>().ok());
        let initial_events = query.get("sendInitialEvents").is_some_and(|v| v == "true");
        let since = if initial_events { None } else { since };
        let timeout = query
            .get("timeoutSeconds")
            .and_then(|t| t.parse::<u64>().ok())
            .map_or(Duration::from_secs(1800), Duration::from_secs);
        let resource = resource_key(target.def);
        let namespace = target.namespace.clone();
        let (events, start) = self.store.watch(since);
        let (tx, rx) = mpsc::channel::<Bytes>(256);
        let wanted = move |res: &str, ns: &str, obj: &Value| {
            res == resource
                && namespace.as_deref().is_none_or(|want| want == ns)
                && filter.matches(obj)
        };
        let rv_now = self.store.resource_version();
        tokio::spawn(stream_watch(
            events,
            start,
            wanted,
            tx,
            timeout,
            initial_events.then_some(rv_now),
        ));
        let body = StreamBody::new(futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv()
                .await
                .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
        }));
        let mut rsp = Response::new(BodyExt::boxed_unsync(body));
        rsp.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("application/json"),
        );
        rsp
    }
}

fn line(kind: &str, object: &Value) -> Bytes {
    let mut text = json!({"type": kind, "object": object}).to_string();
    text.push('\n');
    Bytes::from(text)
}

async fn stream_watch(
    mut events: broadcast::Receiver<crate::store::WatchEvent>,
    start: WatchStart,
    wanted: impl Fn(&str, &str, &Value) -> bool,
    tx: mpsc::Sender<Bytes>,
    timeout: Duration,
    bookmark_rv: Option<u64>,
) {
    let initial: Vec<Bytes> = match start {
        WatchStart::Gone => {
            let gone = ApiError::new(410, "Expired", "too old resource version");
            let _ = tx.send(line("ERROR", &gone.to_status())).await;
            return;
        }
        WatchStart::Fresh(objects) => objects
            .iter()
            .filter(|(res, ns, obj)| wanted(res, ns, obj))
            .map(|(_, _, obj)| line("ADDED", obj))
            .collect(),
        WatchStart::Resume(history) => history
            .iter()
            .filter(|e| wanted(&e.resource, &e.namespace, &e.object))
            .map(|e| line(e.kind.as_str(), &e.object))
            .collect(),
    };
    let mut last_rv = 0;
    for bytes in initial {
        if tx.send(bytes).await.is_err() {
            return;
        }
    }
    if let Some(rv) = bookmark_rv {
        last_rv = rv;
        let bookmark = json!({"kind": "Bookmark", "apiVersion": "v1", "metadata": {"resourceVersion": rv.to_string(), "annotations": {"k8s.io/initial-events-end": "true"}}});
        if tx.send(line("BOOKMARK", &bookmark)).await.is_err() {
            return;
        }
    }
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        tokio::select! {
            () = tokio::time::sleep_until(deadline) => return,
            () = tx.closed() => return,
            event = events.recv() => match event {
                Ok(e) => {
                    if e.rv <= last_rv || !wanted(&e.resource, &e.namespace, &e.object) {
                        continue;
                    }
                    if tx.send(line(e.kind.as_str(), &e.object)).await.is_err() {
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    let gone = ApiError::new(410, "Expired", "watch fell behind");
                    let _ = tx.send(line("ERROR", &gone.to_status())).await;
                    return;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
        }
    }
}

fn ns<'t>(target: &'t Target<'_>) -> &'t str {
    target.namespace.as_deref().unwrap_or("")
}

fn part(sub: Option<&str>) -> Result<Part, ApiError> {
    match sub {
        None => Ok(Part::Main),
        Some("status") => Ok(Part::Status),
        Some(other) => Err(ApiError::new(
            404,
            "NotFound",
            format!("no subresource {other}"),
        )),
    }
}

fn parse_body(body: &[u8]) -> Result<Value, ApiError> {
    // YAML is a superset of JSON: server-side apply may send either.
    serde_json::from_slice(body)
        .or_else(|_| serde_yaml::from_slice(body))
        .map_err(|e| {
            ApiError::new(
                400,
                "BadRequest",
                format!("the body is not JSON or YAML: {e}"),
            )
        })
}

fn apply_patch(obj: &mut Value, kind: &str, patch: &Value) -> Result<(), ApiError> {
    match kind {
        "application/json-patch+json" => {
            // Kubernetes treats a missing path as null in `test` operations (kube's finalizer
            // helper relies on it); the json-patch crate does not, so such tests are checked here.
            let mut patch = patch.clone();
            if let Some(ops) = patch.as_array_mut() {
                ops.retain(|op| {
                    let missing_null_test = op["op"] == "test"
                        && op["value"].is_null()
                        && op["path"]
                            .as_str()
                            .is_some_and(|p| obj.pointer(p).is_none());
                    !missing_null_test
                });
            }
            let ops: json_patch::Patch = serde_json::from_value(patch)
                .map_err(|e| ApiError::new(400, "BadRequest", format!("not a JSON patch: {e}")))?;
            json_patch::patch(obj, &ops)
                .map_err(|e| ApiError::new(422, "Invalid", format!("JSON patch failed: {e}")))
        }
        // Strategic merge and apply are treated as JSON merge patches: enough for the objects
        // Wakegate writes, which replace lists whole.
        "application/merge-patch+json"
        | "application/strategic-merge-patch+json"
        | "application/apply-patch+yaml" => {
            json_patch::merge(obj, patch);
            Ok(())
        }
        other => Err(ApiError::new(
            415,
            "UnsupportedMediaType",
            format!("unsupported patch type {other:?}"),
        )),
    }
}

fn scale_view(def: &ResourceDef, obj: &Value) -> Result<Value, ApiError> {
    let paths = def.scale.as_ref().ok_or_else(|| {
        ApiError::new(
            404,
            "NotFound",
            format!("{} has no scale subresource", def.plural),
        )
    })?;
    let spec = obj
        .pointer(paths.spec_replicas)
        .cloned()
        .unwrap_or(json!(1));
    let status = obj
        .pointer(paths.status_replicas)
        .cloned()
        .unwrap_or(json!(0));
    Ok(json!({
        "apiVersion": "autoscaling/v1",
        "kind": "Scale",
        "metadata": {
            "name": obj["metadata"]["name"],
            "namespace": obj["metadata"]["namespace"],
            "uid": obj["metadata"]["uid"],
            "resourceVersion": obj["metadata"]["resourceVersion"],
            "creationTimestamp": obj["metadata"]["creationTimestamp"],
        },
        "spec": {"replicas": spec},
        "status": {"replicas": status},
    }))
}

fn set_pointer(obj: &mut Value, pointer: &str, value: Value) {
    let mut cur = obj;
    let parts: Vec<&str> = pointer.split('/').skip(1).collect();
    for (i, part) in parts.iter().enumerate() {
        if !cur.is_object() {
            *cur = json!({});
        }
        let Some(map) = cur.as_object_mut() else {
            return;
        };
        if i == parts.len() - 1 {
            map.insert((*part).to_owned(), value);
            return;
        }
        cur = map.entry((*part).to_owned()).or_insert_with(|| json!({}));
    }
}

/// Label and field selectors of a list or watch.
struct Filter {
    labels: Selector,
    fields: Selector,
}

impl Filter {
    fn new(query: &HashMap<String, String>) -> Result<Self, ApiError> {
        let parse = |key: &str| {
            Selector::parse(query.get(key).map_or("", String::as_str))
                .map_err(|e| ApiError::new(400, "BadRequest", format!("{key}: {e}")))
        };
        Ok(Self {
            labels: parse("labelSelector")?,
            fields: parse("fieldSelector")?,
        })
    }

    fn matches(&self, obj: &Value) -> bool {
        self.labels
            .matches(|k| obj["metadata"]["labels"][k].as_str().map(str::to_owned))
            && self.fields.matches(|path| {
                let mut cur = obj;
                for part in path.split('.') {
                    cur = cur.get(part)?;
                }
                cur.as_str().map(str::to_owned)
            })
    }
}
