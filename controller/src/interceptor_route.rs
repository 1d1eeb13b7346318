//! Reconciling InterceptorRoutes: validate, and write a `Ready` condition a person can act on.
//! An InterceptorRoute names no workload and the controller creates nothing for it:
//!
//! - **KEDA mode:** the user's ScaledObject, with an `external-push` trigger whose metadata
//!   says `interceptorRoute: <name>`, scales the workload; this controller is its scaler.
//! - **Standalone mode:** the `wakegate.dev/scale-target-ref` annotation (with
//!   `wakegate.dev/min-replicas`, `max-replicas`, `scaledown-period` and
//!   `initial-cooldown-period`) names the workload this controller scales; without it, requests
//!   are routed and held but nothing wakes the target, and a `Scaling` condition says so.
//!
//! The route table every replica answers from is filled by the watch
//! ([`crate::routes::follow`]); a reconcile adds what only it learns (another owner of the
//! workload's replicas). An invalid route only affects itself.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use serde_json::{json, Value};
use wakegate_crds::{InterceptorRoute, RouteKind, ScalingMetric, ValidRoute};

use crate::reconcile::{condition_in, find_other_owner, scaling, Context, Error, ScalerMode};
use crate::routes::RouteEntry;

/// Reconciles one InterceptorRoute.
pub async fn reconcile(obj: Arc<InterceptorRoute>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = std::time::Instant::now();
    let result = apply(&obj, &ctx).await;
    ctx.metrics
        .reconciled(started.elapsed(), result.as_ref().err().map(Error::kind));
    result
}

/// What to do after a failed reconcile.
pub fn error_policy(obj: Arc<InterceptorRoute>, err: &Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(route = %key(&obj), error = %err, "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(5))
}

fn key(obj: &InterceptorRoute) -> String {
    format!("{}/{}", obj.namespace().unwrap_or_default(), obj.name_any())
}

/// What the route reports, for the status: `concurrency (target 50) and requestRate (target
/// 100/s over 1m)`.
fn metrics_text(spec: &ValidRoute) -> String {
    spec.metrics
        .iter()
        .map(|m| match m {
            ScalingMetric::Concurrency { target } => format!("concurrency (target {target})"),
            ScalingMetric::RequestRate { target, window, .. } => {
                format!("requestRate (target {target}/s over {}s)", window.as_secs())
            }
        })
        .collect::<Vec<_>>()
        .join(" and ")
}

async fn apply(obj: &InterceptorRoute, ctx: &Context) -> Result<Action, Error> {
    if obj.meta().deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let route = key(obj);
    let known = obj.status.as_ref().map_or(&[][..], |s| &s.conditions[..]);
    let generation = obj.meta().generation;
    let condition = |kind: &str, ok: bool, reason: &str, message: &str| {
        condition_in(known, generation, kind, ok, reason, message)
    };
    let spec = match obj.validate() {
        Ok(spec) => spec,
        Err(err) => {
            ctx.routes.remove(&route, RouteKind::InterceptorRoute);
            tracing::info!(%route, error = %err, "InterceptorRoute is invalid");
            let message = format!("{err}; fix it to route this Service");
            write_status(
                ctx,
                obj,
                vec![condition("Ready", false, "InvalidSpec", &message)],
            )
            .await?;
            return Ok(Action::await_change());
        }
    };
    let ns = obj.namespace().unwrap_or_default();
    let name = obj.name_any();
    let mut conditions = Vec::new();
    let mut other_owner = None;
    let routing = format!(
        "routing to {}, reporting {}",
        spec.target_service(),
        metrics_text(&spec)
    );
    match (ctx.mode, &spec.workload) {
        (ScalerMode::Keda, _) => {
            let message = format!(
                "{routing} to the ScaledObject whose external-push trigger has interceptorRoute: {name} (scalerAddress {})",
                ctx.scaler_address
            );
            conditions.push(condition("Ready", true, "Reconciled", &message));
        }
        (ScalerMode::Standalone, None) => {
            conditions.push(condition("Ready", true, "Reconciled", &routing));
            conditions.push(condition(
                "Scaling",
                false,
                "NoWorkload",
                "no KEDA here and no wakegate.dev/scale-target-ref annotation: requests are routed and held, but nothing wakes the target; annotate the route with the workload to scale (e.g. Deployment/my-app)",
            ));
        }
        (ScalerMode::Standalone, Some(workload)) => {
            let owners = find_other_owner(ctx, &ns, workload).await?;
            other_owner = owners.owner;
            let message = format!(
                "{routing}; scaling {} between {} and {} replicas",
                workload.target_workload(),
                workload.min_replicas,
                workload.max_replicas
            );
            conditions.push(condition("Ready", true, "Reconciled", &message));
            let (ok, reason, message) =
                scaling(other_owner.as_deref(), &owners.forbidden, workload);
            conditions.push(condition("Scaling", ok, reason, &message));
        }
    }
    ctx.routes.upsert(RouteEntry {
        namespace: ns,
        name,
        created: obj
            .meta()
            .creation_timestamp
            .as_ref()
            .map(|t| SystemTime::from(t.0)),
        other_owner,
        seen: crate::routes::seen(obj.meta()),
        spec,
    });
    write_status(ctx, obj, conditions).await?;
    Ok(match ctx.mode {
        ScalerMode::Standalone => Action::requeue(Duration::from_secs(60)),
        ScalerMode::Keda => Action::requeue(Duration::from_secs(300)),
    })
}

async fn write_status(
    ctx: &Context,
    obj: &InterceptorRoute,
    conditions: Vec<Value>,
) -> Result<(), kube::Error> {
    let status = json!({ "conditions": conditions });
    let current = serde_json::to_value(&obj.status).unwrap_or(Value::Null);
    if current == status {
        return Ok(());
    }
    let api: Api<InterceptorRoute> =
        Api::namespaced(ctx.client.clone(), &obj.namespace().unwrap_or_default());
    api.patch_status(
        &obj.name_any(),
        &PatchParams::default(),
        &Patch::Merge(json!({ "status": status })),
    )
    .await?;
    Ok(())
}
