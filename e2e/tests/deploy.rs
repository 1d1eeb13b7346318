//! The `deploy/` kustomizations, rendered with `kubectl kustomize` and checked: every overlay
//! and the example render; the objects are the expected kinds, typed as Kubernetes reads them;
//! references resolve (service accounts, role bindings, Service selectors and ports, probes,
//! the PDB, the Ingress backend, the example's HTTPScaledObject); images carry tags; RBAC has no
//! wildcard; pods run as non-root with a read-only root filesystem, no capabilities and the
//! RuntimeDefault seccomp profile; the interceptor has no CPU limit; the CRD is the generated
//! one.

#![allow(clippy::unwrap_used)] // a panic is how a test reports failure

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{PodSpec, Service};
use k8s_openapi::api::networking::v1::Ingress;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding};
use serde::Deserialize;
use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// Renders a kustomization into its objects.
fn render(dir: &str) -> Vec<Value> {
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(repo().join(dir))
        .output()
        .unwrap_or_else(|e| panic!("cannot run kubectl (needed to render deploy/): {e}"));
    assert!(
        out.status.success(),
        "kubectl kustomize {dir} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_yaml::Deserializer::from_slice(&out.stdout)
        .map(|doc| Value::deserialize(doc).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

fn of_kind<'a>(objs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    objs.iter().filter(|o| o["kind"] == kind).collect()
}

fn typed<T: serde::de::DeserializeOwned>(v: &Value) -> T {
    serde_json::from_value(v.clone()).unwrap_or_else(|e| {
        panic!(
            "{} {} does not read as its Kubernetes type: {e}",
            v["kind"], v["metadata"]["name"]
        )
    })
}

fn name(v: &Value) -> (String, String) {
    (
        v["metadata"]["namespace"].as_str().unwrap_or("").to_owned(),
        v["metadata"]["name"].as_str().unwrap().to_owned(),
    )
}

/// Numbers as floats, so `0` and `0.0` compare equal.
fn normalized(v: &Value) -> Value {
    match v {
        Value::Number(n) => n.as_f64().map_or(Value::Null, |f| serde_json::json!(f)),
        Value::Array(a) => Value::Array(a.iter().map(normalized).collect()),
        Value::Object(o) => {
            Value::Object(o.iter().map(|(k, v)| (k.clone(), normalized(v))).collect())
        }
        other => other.clone(),
    }
}

fn no_wildcards(rules: &[PolicyRule], who: &str) {
    assert!(!rules.is_empty(), "{who} grants nothing");
    for rule in rules {
        let all = rule
            .verbs
            .iter()
            .chain(rule.resources.iter().flatten())
            .chain(rule.api_groups.iter().flatten());
        for item in all {
            assert!(!item.contains('*'), "{who} has a wildcard: {rule:?}");
        }
    }
}

fn check_pod(pod: &PodSpec, who: &str, cpu_limit_allowed: bool) {
    let sc = pod.security_context.as_ref().unwrap();
    assert_eq!(sc.run_as_non_root, Some(true), "{who}: runAsNonRoot");
    assert!(
        sc.run_as_user.is_some_and(|u| u != 0),
        "{who}: a non-root uid"
    );
    assert_eq!(
        sc.seccomp_profile.as_ref().map(|p| p.type_.as_str()),
        Some("RuntimeDefault"),
        "{who}: seccomp"
    );
    for c in &pod.containers {
        let image = c.image.as_deref().unwrap();
        let tag = image.rsplit('/').next().unwrap();
        assert!(
            tag.contains(':') && !tag.ends_with(":latest"),
            "{who}: image {image} has no pinned tag"
        );
        let csc = c.security_context.as_ref().unwrap();
        assert_eq!(
            csc.read_only_root_filesystem,
            Some(true),
            "{who}: read-only root"
        );
        assert_eq!(
            csc.allow_privilege_escalation,
            Some(false),
            "{who}: no escalation"
        );
        assert_eq!(
            csc.capabilities.as_ref().and_then(|c| c.drop.clone()),
            Some(vec!["ALL".to_owned()]),
            "{who}: drop all capabilities"
        );
        let resources = c.resources.as_ref().unwrap();
        let requests = resources.requests.as_ref().unwrap();
        assert!(
            requests.contains_key("cpu") && requests.contains_key("memory"),
            "{who}: requests"
        );
        let cpu_limit = resources
            .limits
            .as_ref()
            .is_some_and(|l| l.contains_key("cpu"));
        assert!(
            cpu_limit_allowed || !cpu_limit,
            "{who}: no CPU limit (throttling hurts latency)"
        );
        // Probes name ports the container has.
        let ports: BTreeSet<String> = c
            .ports
            .iter()
            .flatten()
            .filter_map(|p| p.name.clone())
            .collect();
        for probe in [&c.readiness_probe, &c.liveness_probe]
            .into_iter()
            .flatten()
        {
            let port = &probe.http_get.as_ref().unwrap().port;
            if let k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(p) = port {
                assert!(
                    ports.contains(p),
                    "{who}: probe port {p} is not a container port"
                );
            }
        }
    }
}

/// Services select some Deployment's pods, and their target ports are that pod's port names.
fn check_services(objs: &[Value]) {
    let deployments: Vec<Deployment> = of_kind(objs, "Deployment").into_iter().map(typed).collect();
    for svc in of_kind(objs, "Service") {
        let (ns, svc_name) = name(svc);
        let svc: Service = typed(svc);
        let spec = svc.spec.unwrap();
        let selector = spec.selector.unwrap();
        let target = deployments
            .iter()
            .find(|d| {
                d.metadata.namespace.as_deref().unwrap_or("") == ns
                    && d.spec
                        .as_ref()
                        .unwrap()
                        .template
                        .metadata
                        .as_ref()
                        .unwrap()
                        .labels
                        .as_ref()
                        .is_some_and(|labels| {
                            selector.iter().all(|(k, v)| labels.get(k) == Some(v))
                        })
            })
            .unwrap_or_else(|| panic!("Service {ns}/{svc_name} selects no Deployment's pods"));
        let pod_ports: BTreeSet<String> = target
            .spec
            .as_ref()
            .unwrap()
            .template
            .spec
            .as_ref()
            .unwrap()
            .containers
            .iter()
            .flat_map(|c| c.ports.iter().flatten())
            .filter_map(|p| p.name.clone())
            .collect();
        for port in spec.ports.unwrap() {
            if let Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(p)) =
                port.target_port
            {
                assert!(
                    pod_ports.contains(&p),
                    "Service {ns}/{svc_name}: targetPort {p} is not a pod port"
                );
            }
        }
    }
}

fn check_overlay(dir: &str, scaler: &str) -> Vec<Value> {
    let objs = render(dir);
    let kinds: BTreeSet<&str> = objs.iter().map(|o| o["kind"].as_str().unwrap()).collect();
    for kind in [
        "Namespace",
        "CustomResourceDefinition",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
    ] {
        assert!(kinds.contains(kind), "{dir}: no {kind}");
    }

    // The CRDs are the generated ones, both of them.
    let crds = of_kind(&objs, "CustomResourceDefinition");
    assert_eq!(
        crds.len(),
        2,
        "{dir}: HTTPScaledObject and InterceptorRoute CRDs"
    );
    for file in [
        "httpscaledobjects.http.keda.sh.yaml",
        "interceptorroutes.http.keda.sh.yaml",
    ] {
        let generated: Value =
            serde_yaml::from_str(&std::fs::read_to_string(repo().join("crds").join(file)).unwrap())
                .unwrap();
        let crd = crds
            .iter()
            .find(|c| c["metadata"]["name"] == generated["metadata"]["name"])
            .unwrap_or_else(|| panic!("{dir}: no CRD from crds/{file}"));
        let mut crd = (*crd).clone();
        // kustomize adds the common labels, and writes 0 where the generator wrote 0.0.
        if let Some(meta) = crd["metadata"].as_object_mut() {
            meta.remove("labels");
        }
        assert!(
            normalized(&crd) == normalized(&generated),
            "{dir}: the CRD differs from crds/{file}"
        );
    }

    // RBAC: no wildcards, and every binding names a role and a service account that exist.
    let accounts: BTreeSet<(String, String)> = of_kind(&objs, "ServiceAccount")
        .into_iter()
        .map(name)
        .collect();
    let cluster_roles: BTreeSet<String> = of_kind(&objs, "ClusterRole")
        .into_iter()
        .map(|r| name(r).1)
        .collect();
    for r in of_kind(&objs, "ClusterRole") {
        let role: ClusterRole = typed(r);
        no_wildcards(
            role.rules.as_deref().unwrap_or_default(),
            &format!("ClusterRole {}", name(r).1),
        );
    }
    // What each component reads and writes of the add-on's kinds, exactly.
    let grants = |role: &str, group: &str, resource: &str| -> BTreeSet<String> {
        of_kind(&objs, "ClusterRole")
            .into_iter()
            .filter(|r| name(r).1 == role)
            .flat_map(|r| typed::<ClusterRole>(r).rules.unwrap_or_default())
            .filter(|rule| {
                rule.api_groups
                    .as_deref()
                    .unwrap_or_default()
                    .iter()
                    .any(|g| g == group)
                    && rule
                        .resources
                        .as_deref()
                        .unwrap_or_default()
                        .iter()
                        .any(|r| r == resource)
            })
            .flat_map(|rule| rule.verbs)
            .collect()
    };
    let read: BTreeSet<String> = ["get", "list", "watch"].map(String::from).into();
    for resource in ["httpscaledobjects", "interceptorroutes"] {
        assert_eq!(
            grants("wakegate-interceptor", "http.keda.sh", resource),
            read,
            "{dir}: interceptor {resource}"
        );
    }
    assert_eq!(
        grants("wakegate-interceptor", "", "configmaps"),
        read,
        "{dir}: interceptor configmaps"
    );
    assert_eq!(
        grants("wakegate-controller", "http.keda.sh", "interceptorroutes"),
        read,
        "{dir}: controller interceptorroutes"
    );
    assert_eq!(
        grants(
            "wakegate-controller",
            "http.keda.sh",
            "interceptorroutes/status"
        ),
        ["get", "patch", "update"].map(String::from).into(),
        "{dir}: controller interceptorroutes/status"
    );
    for r in of_kind(&objs, "Role") {
        let role: Role = typed(r);
        no_wildcards(
            role.rules.as_deref().unwrap_or_default(),
            &format!("Role {:?}", name(r)),
        );
    }
    for b in of_kind(&objs, "ClusterRoleBinding") {
        let binding: ClusterRoleBinding = typed(b);
        assert!(
            cluster_roles.contains(&binding.role_ref.name),
            "{:?} names a missing ClusterRole",
            name(b)
        );
        for s in binding.subjects.unwrap() {
            let key = (s.namespace.clone().unwrap_or_default(), s.name.clone());
            assert!(
                accounts.contains(&key),
                "{:?} binds a missing ServiceAccount {key:?}",
                name(b)
            );
        }
    }
    for b in of_kind(&objs, "RoleBinding") {
        let binding: RoleBinding = typed(b);
        let (ns, _) = name(b);
        assert!(
            of_kind(&objs, "Role")
                .into_iter()
                .any(|r| name(r) == (ns.clone(), binding.role_ref.name.clone())),
            "{:?} names a missing Role",
            name(b)
        );
        for s in binding.subjects.unwrap() {
            assert!(
                accounts.contains(&(s.namespace.unwrap_or(ns.clone()), s.name)),
                "{:?} binds a missing ServiceAccount",
                name(b)
            );
        }
    }

    // Workloads.
    for d in of_kind(&objs, "Deployment") {
        let (ns, dname) = name(d);
        let deployment: Deployment = typed(d);
        let pod = deployment
            .spec
            .as_ref()
            .unwrap()
            .template
            .spec
            .clone()
            .unwrap();
        let sa = pod.service_account_name.clone().unwrap();
        assert!(
            accounts.contains(&(ns.clone(), sa.clone())),
            "{dname} runs as a missing ServiceAccount {sa}"
        );
        check_pod(&pod, &dname, dname != "wakegate-interceptor");
        if dname == "wakegate-interceptor" {
            assert_eq!(deployment.spec.as_ref().unwrap().replicas, Some(2));
            assert!(
                pod.topology_spread_constraints
                    .is_some_and(|t| !t.is_empty()),
                "topology spread"
            );
            let env = pod.containers[0].env.clone().unwrap();
            assert!(
                env.iter().any(|e| e.name == "WAKEGATE_SHUTDOWN_DELAY"),
                "shutdown delay set"
            );
        }
        if dname == "wakegate-controller" {
            let env = pod.containers[0].env.clone().unwrap();
            let chosen = env
                .iter()
                .find(|e| e.name == "WAKEGATE_SCALER")
                .and_then(|e| e.value.clone());
            assert_eq!(
                chosen.as_deref(),
                Some(scaler),
                "{dir}: the controller's scaler"
            );
        }
    }
    check_services(&objs);
    let pdb: PodDisruptionBudget = typed(of_kind(&objs, "PodDisruptionBudget")[0]);
    let labels = pdb.spec.unwrap().selector.unwrap().match_labels.unwrap();
    assert_eq!(labels["app.kubernetes.io/name"], "wakegate-interceptor");

    // The names the controller looks for by default.
    let services: BTreeSet<String> = of_kind(&objs, "Service")
        .into_iter()
        .map(|s| name(s).1)
        .collect();
    for svc in [
        "wakegate-interceptor-admin",
        "wakegate-interceptor-proxy",
        "wakegate-controller",
    ] {
        assert!(services.contains(svc), "{dir}: no Service {svc}");
    }
    let admin: Service = typed(
        of_kind(&objs, "Service")
            .into_iter()
            .find(|s| name(s).1 == "wakegate-interceptor-admin")
            .unwrap(),
    );
    assert_eq!(
        admin.spec.unwrap().ports.unwrap()[0].name.as_deref(),
        Some("admin")
    );
    objs
}

#[test]
fn the_keda_overlay_renders_and_is_consistent() {
    let objs = check_overlay("deploy/overlays/keda", "keda");
    let keda_rules = of_kind(&objs, "ClusterRole")
        .into_iter()
        .any(|r| serde_json::to_string(r).unwrap().contains("scaledobjects"));
    assert!(keda_rules, "the controller may write ScaledObjects");
}

#[test]
fn the_standalone_overlay_renders_and_is_consistent() {
    let objs = check_overlay("deploy/overlays/standalone", "standalone");
    let text = serde_json::to_string(&objs).unwrap();
    assert!(
        text.contains("deployments/scale"),
        "the controller may scale Deployments"
    );
    assert!(
        !text.contains("keda.sh\",\"resources\":[\"scaledobjects"),
        "no KEDA rights without KEDA"
    );
}

#[test]
fn the_example_renders_and_routes_to_the_interceptor() {
    let objs = render("deploy/example");
    let deployment: Deployment = typed(of_kind(&objs, "Deployment")[0]);
    assert_eq!(
        deployment.spec.as_ref().unwrap().replicas,
        Some(0),
        "the app starts at zero"
    );
    check_pod(
        &deployment
            .spec
            .as_ref()
            .unwrap()
            .template
            .spec
            .clone()
            .unwrap(),
        "hello",
        true,
    );
    check_services(&objs);
    let hso = of_kind(&objs, "HTTPScaledObject")[0];
    let parsed: wakegate_crds::HTTPScaledObject = typed(hso);
    let spec = parsed.validate().unwrap();
    assert!(of_kind(&objs, "Deployment")
        .into_iter()
        .any(|d| name(d) == ("demo".into(), spec.workload.clone().unwrap().name)));
    assert!(of_kind(&objs, "Service")
        .into_iter()
        .any(|s| name(s) == ("demo".into(), spec.service.clone())));
    let ingress: Ingress = typed(of_kind(&objs, "Ingress")[0]);
    assert_eq!(
        ingress.metadata.namespace.as_deref(),
        Some("wakegate"),
        "beside the proxy Service"
    );
    let spec_ing = ingress.spec.unwrap();
    assert_eq!(spec_ing.ingress_class_name.as_deref(), Some("traefik"));
    let rule = &spec_ing.rules.unwrap()[0];
    assert_eq!(
        rule.host.as_deref(),
        Some(spec.rules[0].hosts[0].as_str()),
        "the Ingress host is the route's"
    );
    let backend = rule.http.as_ref().unwrap().paths[0]
        .backend
        .service
        .clone()
        .unwrap();
    assert_eq!(backend.name, "wakegate-interceptor-proxy");
    assert_eq!(backend.port.unwrap().name.as_deref(), Some("http"));
}

/// There is no Docker engine here, so the images are checked against what CI does build: the
/// Dockerfile runs the cross-build script, has a non-root stage per binary the script builds,
/// names the platforms the script knows, and every image the manifests use is one of its stages.
#[test]
fn the_dockerfile_matches_the_cross_build_and_the_manifests() {
    let dockerfile = std::fs::read_to_string(repo().join("deploy/images/Dockerfile")).unwrap();
    let script = std::fs::read_to_string(repo().join("deploy/cross-build.sh")).unwrap();
    assert!(dockerfile.contains("deploy/cross-build.sh install"));
    assert!(dockerfile.contains("deploy/cross-build.sh build"));
    let binaries: Vec<&str> = script
        .lines()
        .find_map(|l| l.strip_prefix("BINARIES=("))
        .unwrap()
        .trim_end_matches(')')
        .split_whitespace()
        .collect();
    assert_eq!(binaries.len(), 3, "{binaries:?}");
    let stages: Vec<String> = dockerfile
        .split("\nFROM ")
        .skip(1)
        .filter_map(|stage| {
            let first = stage.lines().next()?;
            first.split(" AS ").nth(1).map(|s| s.trim().to_owned())
        })
        .collect();
    for bin in &binaries {
        let stage = bin.trim_start_matches("wakegate-");
        assert!(
            stages.iter().any(|s| s == stage),
            "no image stage for {bin}"
        );
        let body = dockerfile
            .split(&format!(" AS {stage}\n"))
            .nth(1)
            .unwrap()
            .split("\nFROM ")
            .next()
            .unwrap();
        assert!(
            body.contains(&format!("/out/bin/{bin}")),
            "{stage} copies {bin}"
        );
        assert!(
            body.contains("USER 65532:65532"),
            "{stage} runs as non-root"
        );
        assert!(body.contains(&format!("ENTRYPOINT [\"/usr/local/bin/{bin}\"]")));
    }
    for (platform, arch) in [
        ("linux/amd64", "amd64"),
        ("linux/arm64", "arm64"),
        ("linux/arm/v7", "armv7"),
    ] {
        assert!(dockerfile.contains(platform), "buildx builds {platform}");
        assert!(
            script.contains(&format!("{arch}) echo")),
            "the script builds {arch}"
        );
    }
    for dir in [
        "deploy/overlays/keda",
        "deploy/overlays/standalone",
        "deploy/example",
    ] {
        for obj in of_kind(&render(dir), "Deployment") {
            let d: Deployment = typed(obj);
            for c in d.spec.unwrap().template.spec.unwrap().containers {
                let image = c.image.unwrap();
                let repo_name = image.rsplit('/').next().unwrap().split(':').next().unwrap();
                let stage = repo_name.trim_start_matches("wakegate-");
                assert!(
                    image.starts_with("ghcr.io/wakegate/wakegate-")
                        && stages.iter().any(|s| s == stage),
                    "{dir}: image {image} is not built by deploy/images/Dockerfile"
                );
            }
        }
    }
}

#[test]
fn kubectl_apply_f_crds_finds_only_custom_resource_definitions() {
    // `kubectl apply -f crds/` reads every .yaml, .yml and .json file in the directory (not
    // below it): each must be a CRD, so the kustomization there has no such extension.
    let dir = repo().join("crds");
    let mut applied = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        if !path.is_file() || !["yaml", "yml", "json"].contains(&ext) {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let v = Value::deserialize(doc).unwrap();
            assert_eq!(
                v["kind"],
                "CustomResourceDefinition",
                "{} would be applied by `kubectl apply -f crds/`",
                path.display()
            );
            applied += 1;
        }
    }
    assert!(applied >= 1);
    // kustomize still finds the directory's kustomization.
    assert!(dir.join("Kustomization").is_file());
}

#[test]
fn the_real_cluster_mode_runs_the_image_the_manifests_name() {
    // The e2e suite's backend pods, on a real cluster, use the interceptor image deploy/base
    // installs (its entrypoint is the binary, so they pass arguments only).
    let objs = render("deploy/overlays/standalone");
    let images: Vec<String> = of_kind(&objs, "Deployment")
        .iter()
        .map(|d| typed::<Deployment>(d))
        .flat_map(|d| d.spec.unwrap().template.spec.unwrap().containers)
        .filter_map(|c| c.image)
        .collect();
    if std::env::var("WAKEGATE_E2E_IMAGE").is_err() {
        assert!(
            images.contains(&wakegate_e2e::backend_image()),
            "{} is not among {images:?}",
            wakegate_e2e::backend_image()
        );
    }
    let cluster_yaml = std::fs::read_to_string(repo().join("e2e/src/lib.rs")).unwrap();
    assert!(
        cluster_yaml.contains(r#"args: ["backend""#),
        "the backend pods pass arguments to the image's entrypoint"
    );
}

#[test]
fn the_job_service_example_renders_scales_standalone_and_may_ask_to_be_kept_awake() {
    let objs = render("deploy/example");
    let jobs: Deployment = typed(
        of_kind(&objs, "Deployment")
            .into_iter()
            .find(|d| name(d) == ("demo".into(), "jobs".into()))
            .expect("the jobs Deployment"),
    );
    let spec = jobs.spec.unwrap();
    assert_eq!(spec.replicas, Some(0), "the job service starts at zero");
    let pod = spec.template.spec.unwrap();
    check_pod(&pod, "jobs", true);
    assert_eq!(
        pod.containers[0].args.as_ref().unwrap()[0],
        "jobs",
        "the example job service"
    );
    let route = of_kind(&objs, "InterceptorRoute")
        .into_iter()
        .find(|r| name(r) == ("demo".into(), "jobs".into()))
        .expect("the jobs InterceptorRoute");
    let parsed: wakegate_crds::interceptor_route::InterceptorRoute = typed(route);
    let valid = parsed.validate().unwrap();
    assert_eq!(
        valid.options.keep_awake_max,
        Some(std::time::Duration::from_secs(7200))
    );
    let workload = valid.workload.unwrap();
    assert_eq!(
        (
            workload.kind.as_str(),
            workload.name.as_str(),
            workload.max_replicas
        ),
        ("Deployment", "jobs", 1)
    );
    assert!(of_kind(&objs, "Service")
        .into_iter()
        .any(|s| name(s) == ("demo".into(), valid.service.clone())));
    let ingress: Ingress = typed(of_kind(&objs, "Ingress")[0]);
    let hosts: Vec<_> = ingress
        .spec
        .unwrap()
        .rules
        .unwrap()
        .into_iter()
        .filter_map(|r| r.host)
        .collect();
    assert!(hosts.contains(&valid.rules[0].hosts[0]), "{hosts:?}");
}
