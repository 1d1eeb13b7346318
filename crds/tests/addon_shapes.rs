//! Add-on-shaped objects against the CRDs: every field they set is in the CRD's schema (a
//! structural schema prunes unknown fields silently, so a missing one would be dropped by the
//! API server without an error), and the CEL rules the add-on states are in the CRD.

#![allow(clippy::unwrap_used)] // a panic is how a test reports failure

use serde_json::Value;

fn crd(file: &str) -> Value {
    let text = std::fs::read_to_string(format!("{}/{file}", env!("CARGO_MANIFEST_DIR"))).unwrap();
    serde_yaml::from_str(&text).unwrap()
}

fn example(file: &str) -> Value {
    let text =
        std::fs::read_to_string(format!("{}/../examples/{file}", env!("CARGO_MANIFEST_DIR")))
            .unwrap();
    let first = text.split("\n---\n").next().unwrap();
    serde_yaml::from_str(first).unwrap()
}

/// Every path in `value` that the schema does not declare.
fn undeclared(value: &Value, schema: &Value, path: &str, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                let child = if let Some(p) = schema["properties"].get(k) {
                    p
                } else if schema["additionalProperties"].is_object() {
                    &schema["additionalProperties"]
                } else {
                    out.push(format!("{path}.{k}"));
                    continue;
                };
                undeclared(v, child, &format!("{path}.{k}"), out);
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                undeclared(v, &schema["items"], &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

fn rules_at<'a>(schema: &'a Value, path: &[&str]) -> Vec<&'a str> {
    let mut s = schema;
    for p in path {
        s = if *p == "[]" {
            &s["items"]
        } else {
            &s["properties"][p]
        };
    }
    s["x-kubernetes-validations"]
        .as_array()
        .map(|rules| rules.iter().filter_map(|r| r["rule"].as_str()).collect())
        .unwrap_or_default()
}

#[test]
fn every_field_of_a_full_interceptor_route_is_in_the_crd() {
    let crd = crd("interceptorroutes.http.keda.sh.yaml");
    let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
    let route = example("interceptorroute-full.yaml");
    let mut missing = Vec::new();
    undeclared(
        &route["spec"],
        &schema["properties"]["spec"],
        "spec",
        &mut missing,
    );
    assert!(missing.is_empty(), "not in the CRD: {missing:?}");
    // And the example does set every field the schema has under spec (so this checks them all).
    fn declared(schema: &Value, path: &str, out: &mut Vec<String>) {
        if let Some(props) = schema["properties"].as_object() {
            for (k, v) in props {
                declared(v, &format!("{path}.{k}"), out);
            }
        }
        if schema["items"].is_object() {
            declared(&schema["items"], &format!("{path}[]"), out);
        }
        if schema["properties"].is_null() && schema["items"].is_null() {
            out.push(path.to_owned());
        }
    }
    fn set(value: &Value, path: &str, out: &mut Vec<String>) {
        match value {
            Value::Object(map) => {
                for (k, v) in map {
                    set(v, &format!("{path}.{k}"), out);
                }
            }
            Value::Array(items) => items.iter().for_each(|v| set(v, &format!("{path}[]"), out)),
            _ => out.push(path.to_owned()),
        }
    }
    let (mut all, mut used) = (Vec::new(), Vec::new());
    declared(&schema["properties"]["spec"], "spec", &mut all);
    set(&route["spec"], "spec", &mut used);
    let unused: Vec<&String> = all
        .iter()
        .filter(|p| {
            !used
                .iter()
                .any(|u| u == *p || u.starts_with(&format!("{p}.")))
        })
        .collect();
    // Header maps have free keys; the body and bodyFromConfigMap exclude each other, and the
    // full example's two static routes use one each.
    let allowed = [
        "spec.coldStart.placeholder.response.bodyFromConfigMap.key",
        "spec.coldStart.placeholder.response.bodyFromConfigMap.name",
        "spec.coldStart.fallback.service.portName",
        "spec.target.port",
        "spec.staticRoutes[].response.bodyFromConfigMap.key",
        "spec.staticRoutes[].response.headers",
        "spec.staticRoutes[].response.statusCode",
        "spec.staticRoutes[].rules[].hosts[]",
        "spec.staticRoutes[].rules[].headers[].name",
        "spec.staticRoutes[].rules[].headers[].value",
    ];
    let unexpected: Vec<&&String> = unused
        .iter()
        .filter(|p| !allowed.contains(&p.as_str()))
        .collect();
    assert!(
        unexpected.is_empty(),
        "the full example leaves these out: {unexpected:?}"
    );
}

#[test]
fn the_interceptor_route_crd_states_the_addon_rules() {
    let crd = crd("interceptorroutes.http.keda.sh.yaml");
    let v = &crd["spec"]["versions"][0];
    let spec = &v["schema"]["openAPIV3Schema"]["properties"]["spec"];
    assert_eq!(v["name"], "v1beta1");
    assert_eq!(v["subresources"]["status"], serde_json::json!({}));
    let columns: Vec<&str> = v["additionalPrinterColumns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(columns, ["TargetService", "Ready", "Age"]);
    assert_eq!(
        rules_at(spec, &["target"]),
        ["has(self.port) != has(self.portName)"]
    );
    assert_eq!(
        rules_at(spec, &["scalingMetric"]),
        ["has(self.concurrency) || has(self.requestRate)"]
    );
    assert_eq!(rules_at(spec, &["coldStart"]).len(), 2);
    assert_eq!(
        rules_at(spec, &["staticRoutes", "[]", "response"]),
        ["!(has(self.body) && has(self.bodyFromConfigMap))"]
    );
    assert_eq!(
        rules_at(spec, &["coldStart", "placeholder", "response"]),
        ["!(has(self.body) && has(self.bodyFromConfigMap))"]
    );
    assert_eq!(
        rules_at(spec, &["coldStart", "fallback", "service"]),
        ["has(self.port) != has(self.portName)"]
    );
    assert_eq!(
        spec["required"],
        serde_json::json!(["scalingMetric", "target"])
    );
    assert_eq!(
        spec["properties"]["rules"]["x-kubernetes-list-type"],
        "atomic"
    );
    let rule = &spec["properties"]["rules"]["items"]["properties"];
    assert_eq!(rule["hosts"]["x-kubernetes-list-type"], "set");
    assert_eq!(rule["headers"]["x-kubernetes-list-type"], "map");
    let metric = &spec["properties"]["scalingMetric"]["properties"];
    assert_eq!(
        metric["requestRate"]["properties"]["window"]["default"],
        "1m"
    );
    assert_eq!(
        metric["concurrency"]["required"],
        serde_json::json!(["targetValue"])
    );
    assert_eq!(
        metric["concurrency"]["properties"]["targetValue"]["minimum"],
        1.0
    );
    let cold = &spec["properties"]["coldStart"]["properties"];
    assert_eq!(cold["overflow"]["default"], "Reject");
    assert_eq!(cold["maxPendingRequests"]["minimum"], 1.0);
    let response = &cold["placeholder"]["properties"]["response"]["properties"];
    assert_eq!(response["body"]["maxLength"], 32768);
    assert_eq!(response["statusCode"]["minimum"], 100.0);
    assert_eq!(response["statusCode"]["maximum"], 599.0);
}

#[test]
fn the_add_on_examples_read_as_their_types() {
    let full: wakegate_crds::InterceptorRoute =
        serde_json::from_value(example("interceptorroute-full.yaml")).unwrap();
    full.validate().unwrap();
    let small: wakegate_crds::InterceptorRoute =
        serde_json::from_value(example("interceptorroute.yaml")).unwrap();
    assert_eq!(small.validate().unwrap().target_service(), "xkcd:8080");
}
