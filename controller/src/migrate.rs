//! `wakegate-controller migrate`: HTTPScaledObjects to InterceptorRoutes, following the add-on's
//! zero-downtime guide. For each HTTPScaledObject in the input it prints the steps, the
//! equivalent InterceptorRoute, and the ScaledObject with an `interceptorRoute` trigger that
//! takes over from the generated one (or, with `--standalone`, the `wakegate.dev/*` annotations
//! that name the workload for Wakegate's own scaler instead). Pure: text in, text out.

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};
use wakegate_crds::{options, HTTPScaledObject, ORPHAN_SCALEDOBJECT_ANNOTATION};

/// Flags of `migrate`.
#[derive(Clone, Debug, clap::Args)]
pub struct MigrateArgs {
    /// The manifest to read (YAML, one or more documents); `-` reads stdin.
    #[arg(short = 'f', long = "filename")]
    pub file: std::path::PathBuf,
    /// `scalerAddress` for the ScaledObjects' triggers: this controller's Service as KEDA
    /// reaches it.
    #[arg(long, default_value = "wakegate-controller.wakegate:9090")]
    pub scaler_address: String,
    /// No KEDA: name the workload on the InterceptorRoute for Wakegate's standalone scaler
    /// instead of writing a ScaledObject.
    #[arg(long)]
    pub standalone: bool,
}

/// Why the input could not be migrated.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// A document is not YAML.
    #[error("document {index}: {source}")]
    Yaml {
        /// 1-based document number.
        index: usize,
        /// The parser's message.
        #[source]
        source: serde_yaml::Error,
    },
    /// An HTTPScaledObject is invalid: it would not route today either.
    #[error("HTTPScaledObject {name} (document {index}) is invalid: {problem}")]
    Invalid {
        /// Its name.
        name: String,
        /// 1-based document number.
        index: usize,
        /// What is wrong.
        problem: String,
    },
    /// The input holds no HTTPScaledObject.
    #[error("no HTTPScaledObject (http.keda.sh/v1alpha1) in the input")]
    Nothing,
}

/// The migration of every HTTPScaledObject in `input`, as YAML with the steps as comments.
pub fn migrate(
    input: &str,
    scaler_address: &str,
    standalone: bool,
) -> Result<String, MigrateError> {
    use serde::Deserialize;
    let mut out = String::new();
    let mut found = 0;
    for (i, doc) in serde_yaml::Deserializer::from_str(input).enumerate() {
        let index = i + 1;
        let value = serde_yaml::Value::deserialize(doc)
            .map_err(|source| MigrateError::Yaml { index, source })?;
        let is_httpso = value.get("kind").and_then(|k| k.as_str()) == Some("HTTPScaledObject")
            && value.get("apiVersion").and_then(|v| v.as_str()) == Some("http.keda.sh/v1alpha1");
        if !is_httpso {
            continue;
        }
        let obj: HTTPScaledObject =
            serde_yaml::from_value(value).map_err(|source| MigrateError::Yaml { index, source })?;
        let name = obj.metadata.name.clone().unwrap_or_default();
        obj.validate().map_err(|e| MigrateError::Invalid {
            name: name.clone(),
            index,
            problem: e.to_string(),
        })?;
        found += 1;
        out.push_str(&one(&obj, scaler_address, standalone));
    }
    if found == 0 {
        return Err(MigrateError::Nothing);
    }
    Ok(out)
}

fn one(obj: &HTTPScaledObject, scaler_address: &str, standalone: bool) -> String {
    let name = obj.metadata.name.clone().unwrap_or_default();
    let ns = obj.metadata.namespace.clone();
    let ns_flag = ns
        .as_deref()
        .map(|n| format!(" -n {n}"))
        .unwrap_or_default();
    let spec = &obj.spec;
    let target = &spec.scale_target_ref;
    let api_version = target
        .api_version
        .clone()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "apps/v1".into());
    let kind = target
        .kind
        .clone()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "Deployment".into());
    let replicas = spec.replicas.clone().unwrap_or_default();
    let (min, max) = (
        replicas.min.unwrap_or(0),
        replicas.max.unwrap_or(wakegate_crds::DEFAULT_MAX_REPLICAS),
    );
    let cooldown = spec
        .scaledown_period
        .unwrap_or(wakegate_crds::DEFAULT_SCALEDOWN_PERIOD_SECONDS);

    let mut route_meta = Map::new();
    route_meta.insert("name".into(), json!(name));
    if let Some(ns) = &ns {
        route_meta.insert("namespace".into(), json!(ns));
    }
    if let Some(labels) = obj.metadata.labels.as_ref().filter(|l| !l.is_empty()) {
        route_meta.insert("labels".into(), json!(labels));
    }
    // Wakegate's own options carry over; the add-on's HTTPScaledObject annotations and
    // kubectl's bookkeeping do not.
    let mut annotations: BTreeMap<String, String> = obj
        .metadata
        .annotations
        .iter()
        .flatten()
        .filter(|(k, _)| k.starts_with(options::PREFIX))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if standalone {
        annotations.insert(
            options::SCALE_TARGET_REF.into(),
            format!("{api_version}/{kind}/{}", target.name),
        );
        annotations.insert(options::MIN_REPLICAS.into(), min.to_string());
        annotations.insert(options::MAX_REPLICAS.into(), max.to_string());
        annotations.insert(options::SCALEDOWN_PERIOD.into(), cooldown.to_string());
        if let Some(initial) = spec.initial_cooldown_period {
            annotations.insert(options::INITIAL_COOLDOWN_PERIOD.into(), initial.to_string());
        }
    }
    if !annotations.is_empty() {
        route_meta.insert("annotations".into(), json!(annotations));
    }

    let mut route_spec = Map::new();
    let mut target_ref = Map::new();
    target_ref.insert("service".into(), json!(target.service));
    port_fields(&mut target_ref, target.port, target.port_name.as_deref());
    route_spec.insert("target".into(), Value::Object(target_ref));
    if !(spec.hosts.is_empty() && spec.path_prefixes.is_empty() && spec.headers.is_empty()) {
        let mut rule = Map::new();
        if !spec.hosts.is_empty() {
            rule.insert("hosts".into(), json!(spec.hosts));
        }
        if !spec.path_prefixes.is_empty() {
            let paths: Vec<Value> = spec
                .path_prefixes
                .iter()
                .map(|p| json!({"value": p}))
                .collect();
            rule.insert("paths".into(), json!(paths));
        }
        if !spec.headers.is_empty() {
            rule.insert("headers".into(), json!(spec.headers));
        }
        route_spec.insert("rules".into(), json!([rule]));
    }
    let default_target = |v: Option<i64>| v.unwrap_or(wakegate_crds::DEFAULT_TARGET_VALUE);
    let metric = match &spec.scaling_metric {
        Some(m) if m.request_rate.is_some() => {
            let rate = m.request_rate.clone().unwrap_or_default();
            let mut r = Map::new();
            r.insert(
                "targetValue".into(),
                json!(default_target(rate.target_value)),
            );
            if let Some(w) = rate.window {
                r.insert("window".into(), json!(w));
            }
            if let Some(g) = rate.granularity {
                r.insert("granularity".into(), json!(g));
            }
            json!({"requestRate": r})
        }
        Some(m) if m.concurrency.is_some() => json!({"concurrency": {
            "targetValue": default_target(m.concurrency.as_ref().and_then(|c| c.target_value)),
        }}),
        _ => json!({"concurrency": {
            "targetValue": default_target(spec.target_pending_requests.map(i64::from)),
        }}),
    };
    route_spec.insert("scalingMetric".into(), metric);
    let mut timeouts = Map::new();
    let t = spec.timeouts.clone().unwrap_or_default();
    if let Some(f) = &spec.cold_start_timeout_failover_ref {
        let mut service = Map::new();
        service.insert("name".into(), json!(f.service));
        port_fields(&mut service, f.port, f.port_name.as_deref());
        route_spec.insert(
            "coldStart".into(),
            json!({"fallback": {"service": service}}),
        );
        // The failover's timeout is the route's readiness timeout.
        timeouts.insert(
            "readiness".into(),
            json!(format!("{}s", f.timeout_seconds.unwrap_or(30))),
        );
    } else if let Some(wait) = t.condition_wait {
        timeouts.insert("readiness".into(), json!(wait));
    }
    if let Some(header) = t.response_header {
        timeouts.insert("responseHeader".into(), json!(header));
    }
    if !timeouts.is_empty() {
        route_spec.insert("timeouts".into(), Value::Object(timeouts));
    }
    let route = json!({
        "apiVersion": "http.keda.sh/v1beta1",
        "kind": "InterceptorRoute",
        "metadata": route_meta,
        "spec": route_spec,
    });

    let mut text = format!(
        "# HTTPScaledObject {name}{}\n",
        ns.as_deref()
            .map(|n| format!(" in {n}"))
            .unwrap_or_default()
    );
    if standalone {
        text.push_str(&format!(
            "# 1. Apply the InterceptorRoute below: it takes over routing and, through its\n\
             #    wakegate.dev/* annotations, scaling (it wins over the HTTPScaledObject of its name).\n\
             # 2. Once its status is Ready, delete the HTTPScaledObject:\n\
             #    kubectl delete httpscaledobject {name}{ns_flag}\n"
        ));
    } else {
        text.push_str(&format!(
            "# 1. Keep the ScaledObject when the HTTPScaledObject goes:\n\
             #    kubectl annotate httpscaledobject {name}{ns_flag} {ORPHAN_SCALEDOBJECT_ANNOTATION}=true\n\
             # 2. Apply the InterceptorRoute and the ScaledObject below (the ScaledObject's trigger\n\
             #    now names interceptorRoute instead of httpScaledObject; replicas, scaledownPeriod\n\
             #    and initialCooldownPeriod live in it).\n\
             # 3. Once the InterceptorRoute is Ready, delete the HTTPScaledObject:\n\
             #    kubectl delete httpscaledobject {name}{ns_flag}\n"
        ));
    }
    text.push_str("---\n");
    text.push_str(&yaml(&route));
    if !standalone {
        let mut so_meta = Map::new();
        so_meta.insert("name".into(), json!(name));
        if let Some(ns) = &ns {
            so_meta.insert("namespace".into(), json!(ns));
        }
        if let Some(labels) = obj.metadata.labels.as_ref().filter(|l| !l.is_empty()) {
            so_meta.insert("labels".into(), json!(labels));
        }
        let mut so_spec = json!({
            "scaleTargetRef": {"apiVersion": api_version, "kind": kind, "name": target.name},
            "minReplicaCount": min,
            "maxReplicaCount": max,
            "cooldownPeriod": cooldown,
            "advanced": {"restoreToOriginalReplicaCount": true},
            "triggers": [{
                "type": "external-push",
                "metadata": {"scalerAddress": scaler_address, "interceptorRoute": name},
            }],
        });
        if let (Some(initial), Some(map)) = (spec.initial_cooldown_period, so_spec.as_object_mut())
        {
            map.insert("initialCooldownPeriod".into(), json!(initial));
        }
        let so = json!({
            "apiVersion": "keda.sh/v1alpha1",
            "kind": "ScaledObject",
            "metadata": so_meta,
            "spec": so_spec,
        });
        text.push_str("---\n");
        text.push_str(&yaml(&so));
    }
    text
}

fn port_fields(map: &mut Map<String, Value>, port: Option<i32>, name: Option<&str>) {
    match (port, name.filter(|n| !n.is_empty())) {
        (Some(p), _) => {
            map.insert("port".into(), json!(p));
        }
        (None, Some(n)) => {
            map.insert("portName".into(), json!(n));
        }
        (None, None) => {}
    }
}

fn yaml(value: &Value) -> String {
    // A JSON value always serializes as YAML.
    serde_yaml::to_string(value).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use wakegate_crds::InterceptorRoute;

    const ADDON_EXAMPLE: &str = include_str!("../../examples/httpscaledobject.yaml");
    const OUR_EXAMPLE: &str = include_str!("../../deploy/example/app.yaml");

    fn docs(text: &str) -> Vec<Value> {
        use serde::Deserialize;
        serde_yaml::Deserializer::from_str(text)
            .map(|d| serde_json::to_value(serde_yaml::Value::deserialize(d).unwrap()).unwrap())
            .filter(|v| !v.is_null())
            .collect()
    }

    fn httpsos(text: &str) -> Vec<HTTPScaledObject> {
        docs(text)
            .into_iter()
            .filter(|v| v["kind"] == "HTTPScaledObject")
            .map(|v| serde_json::from_value(v).unwrap())
            .collect()
    }

    /// The route the InterceptorRoute makes is the route the HTTPScaledObject made.
    fn assert_equivalent(before: &HTTPScaledObject, route: &InterceptorRoute) {
        let old = before.validate().unwrap();
        let new = route.validate().unwrap();
        assert_eq!(new.rules, old.rules);
        assert_eq!(
            (new.service.as_str(), &new.port),
            (old.service.as_str(), &old.port)
        );
        assert_eq!(new.metrics, old.metrics);
        assert_eq!(new.cold_start.fallback, old.cold_start.fallback);
        assert_eq!(new.timeouts, old.timeouts);
        assert_eq!(new.options, old.options);
    }

    #[test]
    fn the_addon_example_becomes_a_route_and_a_scaled_object() {
        let out = migrate(ADDON_EXAMPLE, "wakegate-controller.wakegate:9090", false).unwrap();
        assert!(out.contains(
            "kubectl annotate httpscaledobject xkcd httpscaledobject.keda.sh/orphan-scaledobject=true"
        ));
        assert!(out.contains("kubectl delete httpscaledobject xkcd\n"));
        let docs = docs(&out);
        assert_eq!(docs.len(), 2);
        let route: InterceptorRoute = serde_json::from_value(docs[0].clone()).unwrap();
        assert_equivalent(&httpsos(ADDON_EXAMPLE)[0], &route);
        let so = &docs[1];
        assert_eq!(so["kind"], "ScaledObject");
        assert_eq!(
            so["spec"]["scaleTargetRef"],
            json!({"apiVersion": "apps/v1", "kind": "Deployment", "name": "xkcd"})
        );
        assert_eq!(
            (
                &so["spec"]["minReplicaCount"],
                &so["spec"]["maxReplicaCount"]
            ),
            (&json!(5), &json!(10))
        );
        assert_eq!(so["spec"]["cooldownPeriod"], 300);
        assert_eq!(
            so["spec"]["triggers"],
            json!([{"type": "external-push", "metadata": {
                "scalerAddress": "wakegate-controller.wakegate:9090",
                "interceptorRoute": "xkcd",
            }}])
        );
    }

    #[test]
    fn our_example_migrates_for_the_standalone_scaler_keeping_wakegate_options() {
        let before = httpsos(OUR_EXAMPLE);
        assert!(
            !before.is_empty(),
            "deploy/example/app.yaml has an HTTPScaledObject"
        );
        let out = migrate(OUR_EXAMPLE, "x:1", true).unwrap();
        assert!(!out.contains("ScaledObject\n"), "{out}");
        assert!(!out.contains("orphan"), "no ScaledObject to keep: {out}");
        let routes: Vec<InterceptorRoute> = docs(&out)
            .into_iter()
            .map(|v| serde_json::from_value(v).unwrap())
            .collect();
        assert_eq!(routes.len(), before.len());
        for (old, new) in before.iter().zip(&routes) {
            assert_equivalent(old, new);
            let w_old = old.validate().unwrap().workload.unwrap();
            let w_new = new.validate().unwrap().workload.unwrap();
            assert_eq!(w_new, w_old);
        }
    }

    #[test]
    fn failover_and_timeouts_carry_over_and_mistakes_are_named() {
        let hso = r#"apiVersion: http.keda.sh/v1alpha1
kind: HTTPScaledObject
metadata: {name: a, namespace: apps, annotations: {kubectl.kubernetes.io/last-applied-configuration: "{}"}}
spec:
  scaleTargetRef: {name: a, service: a, portName: http}
  coldStartTimeoutFailoverRef: {service: sorry, port: 8080, timeoutSeconds: 12}
  timeouts: {responseHeader: 5s}
  targetPendingRequests: 7
"#;
        let out = migrate(hso, "x:1", false).unwrap();
        assert!(out.contains(" -n apps "), "{out}");
        assert!(!out.contains("last-applied"), "{out}");
        let route: InterceptorRoute = serde_json::from_value(docs(&out)[0].clone()).unwrap();
        assert_equivalent(&httpsos(hso)[0], &route);
        assert_eq!(route.spec.rules, vec![], "no matchers: still a catch-all");

        let err = migrate(
            &hso.replace("portName: http", "port: 80, portName: http"),
            "x:1",
            false,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("HTTPScaledObject a (document 1) is invalid: spec.scaleTargetRef"),
            "{err}"
        );
        assert_eq!(
            migrate("kind: ConfigMap\napiVersion: v1\n", "x:1", false)
                .unwrap_err()
                .to_string(),
            "no HTTPScaledObject (http.keda.sh/v1alpha1) in the input"
        );
        assert!(migrate("a: [", "x:1", false)
            .unwrap_err()
            .to_string()
            .starts_with("document 1:"));
    }
}
