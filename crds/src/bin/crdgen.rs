//! Writes the HTTPScaledObject CRD YAML generated from the Rust types.
//!
//! `cargo run -p wakegate-crds --bin crdgen` rewrites the committed file; `-- -` prints it.

use std::process::ExitCode;

/// Where the CRD lives in the repo, relative to the workspace root.
const OUTPUT: &str = "crds/httpscaledobjects.http.keda.sh.yaml";

fn main() -> ExitCode {
    let yaml = match wakegate_crds::crd_yaml() {
        Ok(yaml) => yaml,
        Err(err) => {
            eprintln!("crdgen: cannot serialize the CRD: {err}");
            return ExitCode::FAILURE;
        }
    };
    if std::env::args().nth(1).as_deref() == Some("-") {
        print!("{yaml}");
        return ExitCode::SUCCESS;
    }
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(OUTPUT);
    match std::fs::write(&path, yaml) {
        Ok(()) => {
            println!("wrote {OUTPUT}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("crdgen: cannot write {}: {err}", path.display());
            ExitCode::FAILURE
        }
    }
}
