//! RBAC as the real API server enforces it, for requests that impersonate a service account.
//!
//! A request with an `Impersonate-User: system:serviceaccount:<ns>:<name>` header (what kube's
//! client sends for a kubeconfig user with `as:`) is authorised against the Roles,
//! ClusterRoles, RoleBindings and ClusterRoleBindings in the store, exactly as written: verbs,
//! API groups, resources and `resource/subresource`, resource names, namespaces. Anything else
//! is the test's own admin and may do anything. Discovery (`/api`, `/apis`, `/version`) is open
//! to everyone, as `system:discovery` makes it.
//!
//! So a component can be run under precisely the permissions `deploy/` grants it, and a test
//! sees the same 403 a cluster would give.

use serde_json::Value;

use crate::resources::ResourceDef;
use crate::store::{ApiError, Store};

/// What a request asks to do, in RBAC's terms.
#[derive(Debug)]
pub struct Attributes<'a> {
    /// `get`, `list`, `watch`, `create`, `update`, `patch` or `delete`.
    pub verb: &'static str,
    /// The resource.
    pub def: &'a ResourceDef,
    /// `status`, `scale`, ...
    pub subresource: Option<&'a str>,
    /// The namespace, for namespaced requests.
    pub namespace: Option<&'a str>,
    /// The object's name, when the request names one.
    pub name: Option<&'a str>,
}

/// A service account a request impersonates.
#[derive(Debug, PartialEq, Eq)]
pub struct ServiceAccount {
    namespace: String,
    name: String,
}

impl ServiceAccount {
    /// Parses `system:serviceaccount:<ns>:<name>`; other users are not service accounts.
    pub fn parse(user: &str) -> Option<Self> {
        let rest = user.strip_prefix("system:serviceaccount:")?;
        let (namespace, name) = rest.split_once(':')?;
        Some(Self {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        })
    }

    fn user(&self) -> String {
        format!("system:serviceaccount:{}:{}", self.namespace, self.name)
    }
}

fn rbac_def(kind: &str, plural: &str, namespaced: bool) -> ResourceDef {
    ResourceDef::new("rbac.authorization.k8s.io", "v1", kind, plural, namespaced)
}

/// The RBAC kinds, served like any resource.
pub fn defs() -> Vec<ResourceDef> {
    vec![
        rbac_def("Role", "roles", true),
        rbac_def("ClusterRole", "clusterroles", false),
        rbac_def("RoleBinding", "rolebindings", true),
        rbac_def("ClusterRoleBinding", "clusterrolebindings", false),
        ResourceDef::new("", "v1", "ServiceAccount", "serviceaccounts", true),
    ]
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// Whether one rule allows the request.
fn rule_allows(rule: &Value, attrs: &Attributes<'_>) -> bool {
    let any = |list: &[&str], want: &str| list.iter().any(|x| *x == "*" || *x == want);
    let resource = match attrs.subresource {
        Some(sub) => format!("{}/{sub}", attrs.def.plural),
        None => attrs.def.plural.clone(),
    };
    let names = strings(&rule["resourceNames"]);
    any(&strings(&rule["verbs"]), attrs.verb)
        && any(&strings(&rule["apiGroups"]), &attrs.def.group)
        && any(&strings(&rule["resources"]), &resource)
        && (names.is_empty() || attrs.name.is_some_and(|n| names.contains(&n)))
}

fn binds(binding: &Value, sa: &ServiceAccount, binding_ns: Option<&str>) -> bool {
    binding["subjects"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|s| {
            s["kind"] == "ServiceAccount"
                && s["name"].as_str() == Some(sa.name.as_str())
                && s["namespace"].as_str().or(binding_ns) == Some(sa.namespace.as_str())
        })
}

/// Whether `sa` may do what `attrs` says, by the RBAC objects in `store`; if not, the 403 a
/// real API server answers.
pub fn authorize(
    store: &Store,
    defs: &[ResourceDef],
    sa: &ServiceAccount,
    attrs: &Attributes<'_>,
) -> Result<(), ApiError> {
    let find = |kind: &str| {
        defs.iter()
            .find(|d| d.group == "rbac.authorization.k8s.io" && d.kind == kind)
    };
    let (Some(roles), Some(cluster_roles), Some(bindings), Some(cluster_bindings)) = (
        find("Role"),
        find("ClusterRole"),
        find("RoleBinding"),
        find("ClusterRoleBinding"),
    ) else {
        return Err(forbidden(sa, attrs));
    };
    let rules_of = |role_ref: &Value, namespace: Option<&str>| -> Vec<Value> {
        let name = role_ref["name"].as_str().unwrap_or("");
        let role = match (role_ref["kind"].as_str(), namespace) {
            (Some("ClusterRole"), _) => store.get(cluster_roles, "", name).ok(),
            (Some("Role"), Some(ns)) => store.get(roles, ns, name).ok(),
            _ => None,
        };
        role.and_then(|r| r["rules"].as_array().cloned())
            .unwrap_or_default()
    };
    let (cluster, _) = store.list(cluster_bindings, None, |b| binds(b, sa, None));
    for binding in cluster {
        if rules_of(&binding["roleRef"], None)
            .iter()
            .any(|r| rule_allows(r, attrs))
        {
            return Ok(());
        }
    }
    if let Some(ns) = attrs.namespace {
        let (local, _) = store.list(bindings, Some(ns), |b| binds(b, sa, Some(ns)));
        for binding in local {
            if rules_of(&binding["roleRef"], Some(ns))
                .iter()
                .any(|r| rule_allows(r, attrs))
            {
                return Ok(());
            }
        }
    }
    Err(forbidden(sa, attrs))
}

fn forbidden(sa: &ServiceAccount, attrs: &Attributes<'_>) -> ApiError {
    let resource = match attrs.subresource {
        Some(sub) => format!("{}/{sub}", attrs.def.plural),
        None => attrs.def.plural.clone(),
    };
    let scope = match attrs.namespace {
        Some(ns) => format!("in the namespace \"{ns}\""),
        None => "at the cluster scope".to_owned(),
    };
    let qualified = if attrs.def.group.is_empty() {
        attrs.def.plural.clone()
    } else {
        format!("{}.{}", attrs.def.plural, attrs.def.group)
    };
    ApiError::new(
        403,
        "Forbidden",
        format!(
            "{qualified}{} is forbidden: User \"{}\" cannot {} resource \"{resource}\" in API group \"{}\" {scope}",
            attrs.name.map(|n| format!(" \"{n}\"")).unwrap_or_default(),
            sa.user(),
            attrs.verb,
            attrs.def.group,
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn rules_match_verbs_groups_subresources_and_names() {
        let deploy = ResourceDef::new("apps", "v1", "Deployment", "deployments", true);
        let attrs = |verb, sub, name| Attributes {
            verb,
            def: &deploy,
            subresource: sub,
            namespace: Some("apps"),
            name,
        };
        let scale = json!({"apiGroups": ["apps"], "resources": ["deployments/scale"], "verbs": ["get", "patch"]});
        assert!(rule_allows(
            &scale,
            &attrs("patch", Some("scale"), Some("x"))
        ));
        assert!(
            !rule_allows(&scale, &attrs("patch", None, Some("x"))),
            "the subresource only"
        );
        assert!(!rule_allows(
            &scale,
            &attrs("delete", Some("scale"), Some("x"))
        ));
        let named = json!({"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["*"], "resourceNames": ["a"]});
        assert!(rule_allows(&named, &attrs("get", None, Some("a"))));
        assert!(!rule_allows(&named, &attrs("get", None, Some("b"))));
        assert!(!rule_allows(&named, &attrs("list", None, None)));
        assert_eq!(
            ServiceAccount::parse("system:serviceaccount:wakegate:ctl"),
            Some(ServiceAccount {
                namespace: "wakegate".into(),
                name: "ctl".into()
            })
        );
        assert_eq!(ServiceAccount::parse("admin"), None);
    }
}
