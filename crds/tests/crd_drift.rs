//! The committed CRD YAML must be exactly what the Rust types generate.

#[test]
fn committed_crds_match_the_types() {
    for (name, generated) in wakegate_crds::crd_files().expect("the CRDs serialize") {
        let path = format!("{}/{name}", env!("CARGO_MANIFEST_DIR"));
        let committed = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("the committed CRD file {path} exists: {e}"));
        assert!(
            committed == generated,
            "crds/{name} is stale: run `cargo run -p wakegate-crds --bin crdgen` and commit the result"
        );
    }
}
