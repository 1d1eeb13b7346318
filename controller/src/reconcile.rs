//! Reconciling HTTPScaledObjects: validate, keep the owned KEDA ScaledObject (KEDA mode) or
//! check for another scaler (standalone mode), publish the route to the scalers, and write a
//! status a person can act on. An invalid object only affects itself.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{finalizer, Event};
use kube::{Client, Resource, ResourceExt};
use serde_json::{json, Value};
use wakegate_crds::{
    HTTPScaledObject, RouteKind, ValidRoute, Workload, FINALIZER, ORPHAN_SCALEDOBJECT_ANNOTATION,
    SKIP_SCALEDOBJECT_ANNOTATION,
};

use crate::metrics::ControllerMetrics;
use crate::routes::{RouteEntry, Routes};

/// Which scaler acts on the routes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScalerMode {
    /// KEDA scales, through a generated ScaledObject and this controller's external scaler.
    Keda,
    /// This controller scales through the `/scale` subresource.
    Standalone,
}

/// What reconcile needs.
pub struct Context {
    /// The kube client.
    pub client: Client,
    /// Accepted routes, shared with the scalers.
    pub routes: Arc<Routes>,
    /// The active scaler.
    pub mode: ScalerMode,
    /// `service.namespace:port` of this controller's external scaler, for ScaledObjects.
    pub scaler_address: String,
    /// Whether KEDA's ScaledObject kind was served at start. Informational: the standalone
    /// scaler looks for ScaledObjects at every reconcile, so KEDA installed later is noticed.
    pub keda_served: bool,
    /// Standalone mode: watched workloads and their possible other owners.
    pub workloads: Option<Arc<crate::workloads::Workloads>>,
    /// Lookups already reported as forbidden, so each is logged once, not per reconcile.
    pub forbidden_logged: std::sync::Mutex<std::collections::HashSet<&'static str>>,
    /// Metrics.
    pub metrics: ControllerMetrics,
}

/// Why a reconcile failed (it is retried).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An API call failed.
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// The finalizer machinery failed.
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
}

impl Error {
    /// A bounded label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Kube(_) => "kube",
            Self::Finalizer(_) => "finalizer",
        }
    }
}

/// KEDA's ScaledObject resource.
pub fn scaled_object_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("keda.sh", "v1alpha1", "ScaledObject"),
        "scaledobjects",
    )
}

/// Reconciles one HTTPScaledObject.
pub async fn reconcile(obj: Arc<HTTPScaledObject>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = obj.namespace().unwrap_or_default();
    let api: Api<HTTPScaledObject> = Api::namespaced(ctx.client.clone(), &ns);
    let started = std::time::Instant::now();
    let result = finalizer(&api, FINALIZER, obj, |event| async {
        match event {
            Event::Apply(obj) => apply(&obj, &ctx).await,
            Event::Cleanup(obj) => {
                ctx.routes.remove(&key(&obj), RouteKind::HTTPScaledObject);
                tracing::info!(route = %key(&obj), "HTTPScaledObject deleted");
                Ok(Action::await_change())
            }
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    ctx.metrics
        .reconciled(started.elapsed(), result.as_ref().err().map(Error::kind));
    result
}

/// What to do after a failed reconcile.
pub fn error_policy(obj: Arc<HTTPScaledObject>, err: &Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(route = %key(&obj), error = %err, "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(5))
}

fn key(obj: &HTTPScaledObject) -> String {
    format!("{}/{}", obj.namespace().unwrap_or_default(), obj.name_any())
}

async fn apply(obj: &HTTPScaledObject, ctx: &Context) -> Result<Action, Error> {
    let route = key(obj);
    let validated = obj.validate().and_then(|spec| match spec.workload.clone() {
        Some(workload) => Ok((spec, workload)),
        None => Err(wakegate_crds::SpecError {
            field: "scaleTargetRef".into(),
            problem: "names no workload".into(),
        }),
    });
    let (spec, workload) = match validated {
        Ok(valid) => valid,
        Err(err) => {
            ctx.routes.remove(&route, RouteKind::HTTPScaledObject);
            tracing::info!(%route, error = %err, "HTTPScaledObject is invalid");
            write_status(
                ctx,
                obj,
                None,
                vec![condition(
                    obj,
                    "Ready",
                    false,
                    "InvalidSpec",
                    &format!("{err}; fix it to route and scale this workload"),
                )],
            )
            .await?;
            return Ok(Action::await_change());
        }
    };
    let ns = obj.namespace().unwrap_or_default();
    let mut conditions = Vec::new();
    let mut other_owner = None;
    let entry = |other_owner| RouteEntry {
        namespace: ns.clone(),
        name: obj.name_any(),
        created: obj
            .meta()
            .creation_timestamp
            .as_ref()
            .map(|t| SystemTime::from(t.0)),
        other_owner,
        seen: crate::routes::seen(obj.meta()),
        spec: spec.clone(),
    };
    if ctx.routes.shadowed(&route) {
        // Mid-migration: the InterceptorRoute routes, and whatever scales it is the user's.
        // This object's ScaledObject is no longer synced; the orphan annotation still lets it
        // outlive this object, whichever order the guide's steps were done in.
        ctx.routes.upsert(entry(None));
        if ctx.mode == ScalerMode::Keda {
            orphan_if_asked(ctx, obj).await?;
        }
        let message = format!(
            "the InterceptorRoute {route} is in effect instead: this HTTPScaledObject neither routes nor scales; delete it once the migration is done"
        );
        write_status(
            ctx,
            obj,
            Some(&spec),
            vec![condition(
                obj,
                "Ready",
                false,
                "ShadowedByInterceptorRoute",
                &message,
            )],
        )
        .await?;
        return Ok(Action::requeue(Duration::from_secs(300)));
    }
    match ctx.mode {
        ScalerMode::Keda => {
            let (ready, reason, message) = match sync_scaled_object(ctx, obj, &workload).await {
                Ok(message) => (true, "Reconciled", message),
                Err(err) => (
                    false,
                    "CreateError",
                    format!("could not create or update the KEDA ScaledObject: {err}"),
                ),
            };
            conditions.push(condition(obj, "Ready", ready, reason, &message));
        }
        ScalerMode::Standalone => {
            let owners = find_other_owner(ctx, &ns, &workload).await?;
            other_owner = owners.owner;
            let routing = format!(
                "routing to {} and scaling {} between {} and {} replicas",
                spec.target_service(),
                workload.target_workload(),
                workload.min_replicas,
                workload.max_replicas
            );
            conditions.push(condition(obj, "Ready", true, "Reconciled", &routing));
            let (ok, reason, message) =
                scaling(other_owner.as_deref(), &owners.forbidden, &workload);
            conditions.push(condition(obj, "Scaling", ok, reason, &message));
        }
    }
    ctx.routes.upsert(entry(other_owner));
    write_status(ctx, obj, Some(&spec), conditions).await?;
    // Standalone: look again now and then for an HPA or ScaledObject that appeared.
    Ok(match ctx.mode {
        ScalerMode::Standalone => Action::requeue(Duration::from_secs(60)),
        ScalerMode::Keda => Action::requeue(Duration::from_secs(300)),
    })
}

/// What `kubectl apply` records of the last configuration it applied, on every object.
const LAST_APPLIED_ANNOTATION: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// The ScaledObject an HTTPScaledObject asks for, exactly as the KEDA HTTP Add-on makes it.
pub fn desired_scaled_object(
    obj: &HTTPScaledObject,
    spec: &Workload,
    scaler_address: &str,
) -> Value {
    let orphan = obj
        .annotations()
        .get(ORPHAN_SCALEDOBJECT_ANNOTATION)
        .is_some_and(|v| v == "true");
    let owner = json!([{
        "apiVersion": "http.keda.sh/v1alpha1",
        "kind": "HTTPScaledObject",
        "name": obj.name_any(),
        "uid": obj.uid().unwrap_or_default(),
        "controller": true,
        "blockOwnerDeletion": true,
    }]);
    // The user's labels and annotations carry over, kubectl's bookkeeping does not: a later
    // `kubectl apply` of the ScaledObject would merge against the HTTPScaledObject's config.
    let annotations: std::collections::BTreeMap<&String, &String> = obj
        .annotations()
        .iter()
        .filter(|(k, _)| k.as_str() != LAST_APPLIED_ANNOTATION)
        .collect();
    json!({
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": {
            "name": obj.name_any(),
            "namespace": obj.namespace(),
            "labels": obj.labels(),
            "annotations": annotations,
            "ownerReferences": if orphan { json!([]) } else { owner },
        },
        "spec": {
            "scaleTargetRef": {
                "apiVersion": spec.api_version,
                "kind": spec.kind,
                "name": spec.name,
            },
            "minReplicaCount": spec.min_replicas,
            "maxReplicaCount": spec.max_replicas,
            "cooldownPeriod": spec.scaledown_period.as_secs(),
            "initialCooldownPeriod": spec.initial_cooldown.as_secs(),
            "advanced": {"restoreToOriginalReplicaCount": true},
            "triggers": [{
                "type": "external-push",
                "metadata": {
                    "scalerAddress": scaler_address,
                    "httpScaledObject": obj.name_any(),
                },
            }],
        },
    })
}

async fn sync_scaled_object(
    ctx: &Context,
    obj: &HTTPScaledObject,
    spec: &Workload,
) -> Result<String, kube::Error> {
    let ns = obj.namespace().unwrap_or_default();
    let api: Api<DynamicObject> =
        Api::namespaced_with(ctx.client.clone(), &ns, &scaled_object_resource());
    let name = obj.name_any();
    if obj
        .annotations()
        .get(SKIP_SCALEDOBJECT_ANNOTATION)
        .is_some_and(|v| v == "true")
    {
        if let Some(existing) = api.get_opt(&name).await? {
            let owned = existing
                .owner_references()
                .iter()
                .any(|r| Some(&r.uid) == obj.uid().as_ref());
            if owned {
                api.delete(&name, &DeleteParams::default()).await?;
                return Ok(format!("ScaledObject creation skipped by annotation; deleted the owned ScaledObject {name}"));
            }
        }
        return Ok("ScaledObject creation skipped by annotation".into());
    }
    let desired = desired_scaled_object(obj, spec, &ctx.scaler_address);
    let params = PatchParams::apply("wakegate-controller").force();
    api.patch(&name, &params, &Patch::Apply(&desired)).await?;
    Ok(format!(
        "ScaledObject {name} scales {} through {}",
        spec.target_workload(),
        ctx.scaler_address
    ))
}

/// With the orphan annotation, drops this object's owner reference from its ScaledObject.
async fn orphan_if_asked(ctx: &Context, obj: &HTTPScaledObject) -> Result<(), kube::Error> {
    let orphan = obj
        .annotations()
        .get(ORPHAN_SCALEDOBJECT_ANNOTATION)
        .is_some_and(|v| v == "true");
    if !orphan {
        return Ok(());
    }
    let api: Api<DynamicObject> = Api::namespaced_with(
        ctx.client.clone(),
        &obj.namespace().unwrap_or_default(),
        &scaled_object_resource(),
    );
    let name = obj.name_any();
    let Some(existing) = api.get_opt(&name).await? else {
        return Ok(());
    };
    let kept: Vec<_> = existing
        .owner_references()
        .iter()
        .filter(|r| Some(&r.uid) != obj.uid().as_ref())
        .cloned()
        .collect();
    if kept.len() != existing.owner_references().len() {
        api.patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"ownerReferences": kept}})),
        )
        .await?;
    }
    Ok(())
}

/// An HPA or a ScaledObject (not ours) that targets the same workload.
use crate::workloads::OtherOwners;

/// Lists `api`, treating "not served" as empty and "forbidden" as unknown (reported once in the
/// log, and in the result), so an optional lookup never stops waking and scaling.
async fn list_optional<K>(
    ctx: &Context,
    api: Api<K>,
    what: &'static str,
    forbidden: &mut Vec<&'static str>,
) -> Result<Vec<K>, kube::Error>
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.list(&ListParams::default()).await {
        Ok(list) => Ok(list.items),
        // The kind is not served (KEDA not installed): nothing can be scaled by it.
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(Vec::new()),
        Err(kube::Error::Api(s)) if s.code == 403 => {
            let first = ctx
                .forbidden_logged
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(what);
            if first {
                tracing::warn!(error = %s.message, "cannot list {what}: workloads they scale cannot be told apart; scaling anyway (grant get and list on them to the controller)");
            }
            forbidden.push(what);
            Ok(Vec::new())
        }
        Err(err) => Err(err),
    }
}

/// Whether an HPA or a ScaledObject already scales the route's workload: from the watches, or,
/// until they have listed (or while they are forbidden), from the API.
pub(crate) async fn find_other_owner(
    ctx: &Context,
    ns: &str,
    spec: &Workload,
) -> Result<OtherOwners, kube::Error> {
    if let Some(workloads) = &ctx.workloads {
        let found = workloads.other_owners(ns, &spec.kind, &spec.name);
        if found.unknown.is_empty() && found.forbidden.is_empty() {
            return Ok(found);
        }
    }
    // Not listed yet, or forbidden to watch (the LIST says whether it still is: a grant made
    // since takes effect at the next reconcile).
    list_other_owners(ctx, ns, spec).await
}

/// The same from LISTs, one per kind.
async fn list_other_owners(
    ctx: &Context,
    ns: &str,
    spec: &Workload,
) -> Result<OtherOwners, kube::Error> {
    let mut found = OtherOwners::default();
    let hpas: Api<HorizontalPodAutoscaler> = Api::namespaced(ctx.client.clone(), ns);
    for hpa in list_optional(ctx, hpas, "HorizontalPodAutoscalers", &mut found.forbidden).await? {
        let target = hpa.spec.as_ref().map(|s| &s.scale_target_ref);
        if target.is_some_and(|t| t.name == spec.name && t.kind == spec.kind) {
            found.owner = Some(format!("HorizontalPodAutoscaler {}", hpa.name_any()));
            return Ok(found);
        }
    }
    // Looked for whether or not KEDA was served at start: one installed later is noticed at
    // the next reconcile.
    let sos: Api<DynamicObject> =
        Api::namespaced_with(ctx.client.clone(), ns, &scaled_object_resource());
    for so in list_optional(ctx, sos, "ScaledObjects", &mut found.forbidden).await? {
        let target = &so.data["spec"]["scaleTargetRef"];
        let kind = target["kind"].as_str().unwrap_or("Deployment");
        if target["name"].as_str() == Some(spec.name.as_str()) && kind == spec.kind {
            found.owner = Some(format!("ScaledObject {}", so.name_any()));
            return Ok(found);
        }
    }
    Ok(found)
}

/// The standalone `Scaling` condition's status, reason and message: whether Wakegate scales
/// `workload`, given the other owner found (if any) and the lookups that were forbidden.
pub(crate) fn scaling(
    other_owner: Option<&str>,
    forbidden: &[&str],
    workload: &Workload,
) -> (bool, &'static str, String) {
    match (other_owner, forbidden) {
        (Some(owner), _) => (false, "ScaledByAnotherOwner", format!("{owner} already scales {}; Wakegate routes and holds requests but leaves its replicas alone", workload.target_workload())),
        (None, []) => (true, "Standalone", "Wakegate scales this workload through its /scale subresource".into()),
        (None, forbidden) => (true, "OwnerCheckForbidden", format!("Wakegate scales this workload, but could not check whether {} also scale it: listing them is forbidden to the controller's service account (grant get and list)", forbidden.join(" or "))),
    }
}

/// A condition, keeping the existing transition time when the status is unchanged.
fn condition(
    obj: &HTTPScaledObject,
    kind: &str,
    status: bool,
    reason: &str,
    message: &str,
) -> Value {
    let known = obj.status.as_ref().map_or(&[][..], |s| &s.conditions[..]);
    condition_in(known, obj.meta().generation, kind, status, reason, message)
}

/// A condition among the `known` ones of an object at `generation`, keeping the existing
/// transition time when the status is unchanged.
pub(crate) fn condition_in(
    known: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    generation: Option<i64>,
    kind: &str,
    status: bool,
    reason: &str,
    message: &str,
) -> Value {
    let status = if status { "True" } else { "False" };
    let previous = known.iter().find(|c| c.type_ == kind);
    let since = match previous {
        Some(c) if c.status == status => c.last_transition_time.0.to_string(),
        _ => k8s_openapi::jiff::Timestamp::now()
            .round(k8s_openapi::jiff::Unit::Second)
            .map_or_else(
                |_| k8s_openapi::jiff::Timestamp::now().to_string(),
                |t| t.to_string(),
            ),
    };
    json!({
        "type": kind,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": since,
        "observedGeneration": generation,
    })
}

async fn write_status(
    ctx: &Context,
    obj: &HTTPScaledObject,
    spec: Option<&ValidRoute>,
    conditions: Vec<Value>,
) -> Result<(), kube::Error> {
    let status = json!({
        "targetWorkload": spec.and_then(ValidRoute::target_workload),
        "targetService": spec.map(ValidRoute::target_service),
        "conditions": conditions,
    });
    let current = serde_json::to_value(&obj.status).unwrap_or(Value::Null);
    if current == status {
        return Ok(());
    }
    let api: Api<HTTPScaledObject> =
        Api::namespaced(ctx.client.clone(), &obj.namespace().unwrap_or_default());
    api.patch_status(
        &obj.name_any(),
        &PatchParams::default(),
        &Patch::Merge(json!({"status": status})),
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scaled_object_matches_the_addon_shape() {
        let obj: HTTPScaledObject = serde_json::from_value(json!({
            "apiVersion": "http.keda.sh/v1alpha1", "kind": "HTTPScaledObject",
            "metadata": {"name": "xkcd", "namespace": "apps", "uid": "u-1", "labels": {"team": "a"}, "annotations": {"note": "x", "kubectl.kubernetes.io/last-applied-configuration": "{\"kind\":\"HTTPScaledObject\"}"}},
            "spec": {"hosts": ["myhost.com"], "scaleTargetRef": {"name": "xkcd", "kind": "Deployment", "apiVersion": "apps/v1", "service": "xkcd", "port": 8080},
                     "replicas": {"min": 5, "max": 10}, "scaledownPeriod": 150, "initialCooldownPeriod": 7}
        }))
        .unwrap();
        let spec = obj.validate().unwrap().workload.unwrap();
        let so = desired_scaled_object(&obj, &spec, "wakegate-controller.wakegate:9090");
        assert_eq!(so["metadata"]["ownerReferences"][0]["controller"], true);
        assert_eq!(so["metadata"]["ownerReferences"][0]["uid"], "u-1");
        assert_eq!(so["metadata"]["labels"]["team"], "a");
        assert_eq!(
            so["metadata"]["annotations"],
            json!({"note": "x"}),
            "kubectl's last-applied-configuration is not copied"
        );
        assert_eq!(
            so["spec"]["scaleTargetRef"],
            json!({"apiVersion": "apps/v1", "kind": "Deployment", "name": "xkcd"})
        );
        assert_eq!(
            (
                so["spec"]["minReplicaCount"].clone(),
                so["spec"]["maxReplicaCount"].clone()
            ),
            (json!(5), json!(10))
        );
        assert_eq!(so["spec"]["cooldownPeriod"], 150);
        assert_eq!(so["spec"]["initialCooldownPeriod"], 7);
        assert_eq!(
            so["spec"]["advanced"]["restoreToOriginalReplicaCount"],
            true
        );
        assert_eq!(
            so["spec"]["triggers"],
            json!([{"type": "external-push", "metadata": {"scalerAddress": "wakegate-controller.wakegate:9090", "httpScaledObject": "xkcd"}}])
        );

        let mut orphaned = obj.clone();
        orphaned
            .annotations_mut()
            .insert(ORPHAN_SCALEDOBJECT_ANNOTATION.into(), "true".into());
        let so = desired_scaled_object(&orphaned, &spec, "x:1");
        assert_eq!(so["metadata"]["ownerReferences"], json!([]));
    }
}

/// kube's mock-service pattern: the exact API calls one reconcile makes.
#[cfg(test)]
mod mock_tests {
    use super::*;
    use http::{Request, Response};
    use kube::client::Body;

    fn context(client: Client) -> Arc<Context> {
        Arc::new(Context {
            client,
            routes: Arc::new(Routes::default()),
            mode: ScalerMode::Standalone,
            scaler_address: "x:1".into(),
            keda_served: false,
            workloads: None,
            forbidden_logged: Default::default(),
            metrics: ControllerMetrics::register(&prometheus::Registry::new()).unwrap(),
        })
    }

    #[tokio::test]
    async fn an_invalid_object_gets_one_status_patch_naming_the_field() {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let ctx = context(Client::new(service, "default"));
        let obj: HTTPScaledObject = serde_json::from_value(json!({
            "apiVersion": "http.keda.sh/v1alpha1", "kind": "HTTPScaledObject",
            "metadata": {"name": "bad", "namespace": "apps", "finalizers": [FINALIZER], "generation": 3},
            "spec": {"scaleTargetRef": {"name": "a", "service": "a", "port": 80, "portName": "http"}}
        }))
        .unwrap();
        let routes = ctx.routes.clone();
        let server = tokio::spawn(async move {
            let (request, send) = handle.next_request().await.expect("one API call");
            assert_eq!(request.method(), http::Method::PATCH);
            assert_eq!(
                request.uri().path(),
                "/apis/http.keda.sh/v1alpha1/namespaces/apps/httpscaledobjects/bad/status"
            );
            assert_eq!(
                request.headers()["content-type"],
                "application/merge-patch+json"
            );
            let body = request.into_body().collect_bytes().await.unwrap();
            let patch: Value = serde_json::from_slice(&body).unwrap();
            let ready = &patch["status"]["conditions"][0];
            assert_eq!(
                (
                    ready["type"].as_str(),
                    ready["status"].as_str(),
                    ready["reason"].as_str()
                ),
                (Some("Ready"), Some("False"), Some("InvalidSpec"))
            );
            assert!(ready["message"]
                .as_str()
                .unwrap()
                .starts_with("spec.scaleTargetRef: set exactly one of port and portName"));
            assert_eq!(ready["observedGeneration"], 3);
            assert!(patch["status"]["targetWorkload"].is_null());
            let mut rsp = obj_json();
            rsp["status"] = patch["status"].clone();
            send.send_response(Response::new(Body::from(serde_json::to_vec(&rsp).unwrap())));
            assert!(
                handle.next_request().await.is_none(),
                "no further API calls"
            );
        });
        let action = reconcile(Arc::new(obj), ctx).await.unwrap();
        assert_eq!(action, Action::await_change());
        assert!(
            routes.get("apps/bad").is_none(),
            "an invalid object is not routed"
        );
        drop(routes);
        tokio::time::timeout(std::time::Duration::from_secs(5), server)
            .await
            .unwrap()
            .unwrap();
    }

    fn obj_json() -> Value {
        json!({"apiVersion": "http.keda.sh/v1alpha1", "kind": "HTTPScaledObject",
               "metadata": {"name": "bad", "namespace": "apps"},
               "spec": {"scaleTargetRef": {"name": "a", "service": "a", "port": 80}}})
    }
}
