//! The committed CRD YAML must be exactly what the Rust types generate.

#[test]
fn committed_crd_matches_the_types() {
    let committed = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/httpscaledobjects.http.keda.sh.yaml"
    ))
    .expect("the committed CRD file exists");
    let generated = wakegate_crds::crd_yaml().expect("the CRD serializes");
    assert!(
        committed == generated,
        "crds/httpscaledobjects.http.keda.sh.yaml is stale: run `cargo run -p wakegate-crds --bin crdgen` and commit the result"
    );
}
