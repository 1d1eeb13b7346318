//! The resource types the server serves, and the discovery documents that describe them.

use serde_json::{json, Value};

/// Where a `/scale` subresource reads and writes replicas.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScalePaths {
    /// JSON pointer to the desired replicas, e.g. `/spec/replicas`.
    pub spec_replicas: &'static str,
    /// JSON pointer to the observed replicas, e.g. `/status/replicas`.
    pub status_replicas: &'static str,
}

/// One resource type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResourceDef {
    /// API group; empty for the core group.
    pub group: String,
    /// Version, e.g. `v1`.
    pub version: String,
    /// Kind, e.g. `Deployment`.
    pub kind: String,
    /// Plural resource name, e.g. `deployments`.
    pub plural: String,
    /// Whether objects live in namespaces.
    pub namespaced: bool,
    /// Whether a `/status` subresource exists (status is then written only through it).
    pub status: bool,
    /// The `/scale` subresource, if any.
    pub scale: Option<ScalePaths>,
    /// Short names for discovery.
    pub short_names: Vec<String>,
}

impl ResourceDef {
    /// A resource with no subresources.
    pub fn new(group: &str, version: &str, kind: &str, plural: &str, namespaced: bool) -> Self {
        Self {
            group: group.into(),
            version: version.into(),
            kind: kind.into(),
            plural: plural.into(),
            namespaced,
            status: false,
            scale: None,
            short_names: Vec::new(),
        }
    }

    /// Adds a `/status` subresource.
    pub fn with_status(mut self) -> Self {
        self.status = true;
        self
    }

    /// Adds a `/scale` subresource at the usual paths.
    pub fn with_scale(mut self) -> Self {
        self.scale = Some(ScalePaths {
            spec_replicas: "/spec/replicas",
            status_replicas: "/status/replicas",
        });
        self
    }

    /// Adds a short name.
    pub fn short_name(mut self, name: &str) -> Self {
        self.short_names.push(name.into());
        self
    }

    /// `group/version`, or `version` for the core group.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// The built-in resources a Wakegate test needs, plus the HTTPScaledObject CRD.
    pub fn standard() -> Vec<Self> {
        vec![
            Self::new("", "v1", "Namespace", "namespaces", false),
            Self::new("", "v1", "Service", "services", true)
                .with_status()
                .short_name("svc"),
            Self::new("", "v1", "Pod", "pods", true).with_status(),
            Self::new("", "v1", "Event", "events", true),
            Self::new("", "v1", "ConfigMap", "configmaps", true).short_name("cm"),
            Self::new("apps", "v1", "Deployment", "deployments", true)
                .with_status()
                .with_scale()
                .short_name("deploy"),
            Self::new(
                "discovery.k8s.io",
                "v1",
                "EndpointSlice",
                "endpointslices",
                true,
            ),
            Self::new("coordination.k8s.io", "v1", "Lease", "leases", true),
            Self::new(
                "autoscaling",
                "v2",
                "HorizontalPodAutoscaler",
                "horizontalpodautoscalers",
                true,
            )
            .with_status()
            .short_name("hpa"),
            Self::new(
                "apiextensions.k8s.io",
                "v1",
                "CustomResourceDefinition",
                "customresourcedefinitions",
                false,
            ),
            Self::new(
                "http.keda.sh",
                "v1alpha1",
                "HTTPScaledObject",
                "httpscaledobjects",
                true,
            )
            .with_status()
            .short_name("httpso"),
            Self::new(
                "http.keda.sh",
                "v1beta1",
                "InterceptorRoute",
                "interceptorroutes",
                true,
            )
            .with_status(),
        ]
        .into_iter()
        .chain(crate::rbac::defs())
        .collect()
    }

    /// KEDA's ScaledObject, for tests of clusters that have KEDA.
    pub fn keda_scaled_object() -> Self {
        Self::new("keda.sh", "v1alpha1", "ScaledObject", "scaledobjects", true)
            .with_status()
            .short_name("so")
    }
}

const VERBS: [&str; 8] = [
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];

/// `GET /api`.
pub fn core_versions() -> Value {
    json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []})
}

/// `GET /apis`.
pub fn group_list(defs: &[ResourceDef]) -> Value {
    let mut groups: Vec<(String, Vec<String>)> = Vec::new();
    for def in defs.iter().filter(|d| !d.group.is_empty()) {
        match groups.iter_mut().find(|(g, _)| *g == def.group) {
            Some((_, versions)) if !versions.contains(&def.version) => {
                versions.push(def.version.clone())
            }
            Some(_) => {}
            None => groups.push((def.group.clone(), vec![def.version.clone()])),
        }
    }
    let groups: Vec<Value> = groups
        .into_iter()
        .map(|(name, versions)| {
            let versions: Vec<Value> = versions
                .iter()
                .map(|v| json!({"groupVersion": format!("{name}/{v}"), "version": v}))
                .collect();
            json!({"name": name, "versions": versions, "preferredVersion": versions[0]})
        })
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

/// `GET /api/v1` or `GET /apis/{group}/{version}`; `None` when nothing is served there.
pub fn resource_list(defs: &[ResourceDef], group: &str, version: &str) -> Option<Value> {
    let mut resources = Vec::new();
    for def in defs
        .iter()
        .filter(|d| d.group == group && d.version == version)
    {
        resources.push(json!({
            "name": def.plural,
            "singularName": def.kind.to_ascii_lowercase(),
            "namespaced": def.namespaced,
            "kind": def.kind,
            "verbs": VERBS,
            "shortNames": def.short_names,
        }));
        if def.status {
            resources.push(json!({"name": format!("{}/status", def.plural), "singularName": "", "namespaced": def.namespaced, "kind": def.kind, "verbs": ["get", "patch", "update"]}));
        }
        if def.scale.is_some() {
            resources.push(json!({"name": format!("{}/scale", def.plural), "singularName": "", "namespaced": def.namespaced, "group": "autoscaling", "version": "v1", "kind": "Scale", "verbs": ["get", "patch", "update"]}));
        }
    }
    if resources.is_empty() {
        return None;
    }
    let group_version = if group.is_empty() {
        version.to_owned()
    } else {
        format!("{group}/{version}")
    };
    Some(
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": resources}),
    )
}
