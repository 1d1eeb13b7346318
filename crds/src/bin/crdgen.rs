//! Writes the CRD YAML files generated from the Rust types.
//!
//! `cargo run -p wakegate-crds --bin crdgen` rewrites the committed files under `crds/`; `-- -`
//! prints them instead.

use std::process::ExitCode;

fn main() -> ExitCode {
    let files = match wakegate_crds::crd_files() {
        Ok(files) => files,
        Err(err) => {
            eprintln!("crdgen: cannot serialize the CRDs: {err}");
            return ExitCode::FAILURE;
        }
    };
    let print = std::env::args().nth(1).as_deref() == Some("-");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    for (name, yaml) in files {
        if print {
            print!("---\n{yaml}");
            continue;
        }
        let path = dir.join(name);
        if let Err(err) = std::fs::write(&path, yaml) {
            eprintln!("crdgen: cannot write {}: {err}", path.display());
            return ExitCode::FAILURE;
        }
        println!("wrote crds/{name}");
    }
    ExitCode::SUCCESS
}
