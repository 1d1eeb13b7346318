//! TLS with rustls on ring: certificates for the TLS listener, picked by SNI and reloaded when
//! their files change, and the client side for routes whose upstream speaks TLS ([`upstream`]).
//!
//! The certificate set is an immutable snapshot behind `ArcSwap`, read on every handshake and
//! replaced whole by the reloader; a handshake in progress keeps the snapshot it started with,
//! and established connections never look at it again, so a reload drops nothing.

pub mod upstream;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_util::sync::CancellationToken;

/// File extensions taken as certificates in a certificate store directory.
const CERT_EXTENSIONS: [&str; 2] = ["crt", "pem"];

/// How deep a certificate store is walked (one secret per subdirectory is common).
const MAX_STORE_DEPTH: usize = 4;

/// Why a certificate or key could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A certificate file holds no PEM certificate, or a broken one.
    #[error("{path} holds no PEM certificate{}", detail.as_deref().map(|d| format!(" ({d})")).unwrap_or_default())]
    NoCertificate {
        /// The file.
        path: PathBuf,
        /// The PEM parser's complaint, if it had one.
        detail: Option<String>,
    },
    /// A key file holds no PEM private key, or one of an unsupported type.
    #[error("{path} holds no usable PEM private key (PKCS#8, PKCS#1 or SEC1): {detail}")]
    NoKey {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        detail: String,
    },
    /// The key does not belong to the certificate.
    #[error("the private key in {key} does not match the certificate in {cert}: {detail}")]
    Mismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// What rustls said.
        detail: String,
    },
    /// A certificate in a store directory has no key file beside it.
    #[error("{cert} has no key beside it (looked for {})", tried.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "))]
    MissingKey {
        /// The certificate file.
        cert: PathBuf,
        /// The key file names tried.
        tried: Vec<PathBuf>,
    },
    /// A certificate names no DNS name, so SNI can never pick it.
    #[error("{path} names no DNS subject alternative name, so SNI cannot select it (use it as --tls-cert instead)")]
    NoNames {
        /// The certificate file.
        path: PathBuf,
    },
    /// Neither a default certificate nor any store certificate was found.
    #[error("no TLS certificate found: give --tls-cert and --tls-key, or a --tls-cert-store directory holding <name>.crt with <name>.key")]
    Empty,
    /// rustls refused the configuration (a bug: the versions and provider are fixed).
    #[error("building the TLS configuration: {0}")]
    Config(#[source] rustls::Error),
}

/// Where the listener's certificates come from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CertSources {
    /// The certificate for clients without SNI, or with a name no store certificate covers.
    pub default: Option<(PathBuf, PathBuf)>,
    /// Directories walked for `<name>.crt` / `<name>.pem` with `<name>.key` beside them; each
    /// certificate serves the DNS names in its subject alternative names.
    pub stores: Vec<PathBuf>,
}

/// The certificates in use: an index from SNI name to certificate.
#[derive(Debug, Default)]
pub struct Certificates {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// `*.example.com` is keyed by `example.com`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Option<Arc<CertifiedKey>>,
    /// Every file the set was loaded from, with what it looked like then.
    files: Fingerprint,
}

/// The files a certificate set came from, as (path, length, modified time); a change to any of
/// them, or a file added to or removed from a store, changes the fingerprint.
type Fingerprint = Vec<(PathBuf, u64, Option<SystemTime>)>;

impl Certificates {
    /// Loads every certificate `sources` name. Any unreadable, unmatched or mismatched file is
    /// an error naming it.
    pub fn load(sources: &CertSources) -> Result<Self, TlsError> {
        let provider = rustls::crypto::ring::default_provider();
        let mut set = Self::default();
        if let Some((cert, key)) = &sources.default {
            set.default = Some(Arc::new(load_pair(cert, key, &provider)?));
        }
        for store in &sources.stores {
            let mut pairs = Vec::new();
            walk_store(store, 0, &mut pairs)?;
            pairs.sort();
            for (cert, key) in pairs {
                let certified = Arc::new(load_pair(&cert, &key, &provider)?);
                let names = dns_names(&certified, &cert)?;
                for name in names {
                    let name = name.to_ascii_lowercase();
                    // The first certificate to claim a name keeps it: stores are walked in
                    // the order given, files in name order, so the choice is stable.
                    match name.strip_prefix("*.") {
                        Some(parent) => set.wildcard.entry(parent.to_owned()),
                        None => set.exact.entry(name),
                    }
                    .or_insert_with(|| certified.clone());
                }
            }
        }
        if set.default.is_none() && set.exact.is_empty() && set.wildcard.is_empty() {
            return Err(TlsError::Empty);
        }
        set.files = fingerprint(sources);
        Ok(set)
    }

    /// The certificate for a client hello naming `sni` (or none).
    pub fn pick(&self, sni: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let by_name = sni.and_then(|name| {
            let name = name.to_ascii_lowercase();
            self.exact.get(&name).cloned().or_else(|| {
                let (_, parent) = name.split_once('.')?;
                self.wildcard.get(parent).cloned()
            })
        });
        by_name.or_else(|| self.default.clone())
    }

    /// The DNS names served, for logs and `/status`.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .exact
            .keys()
            .cloned()
            .chain(self.wildcard.keys().map(|p| format!("*.{p}")))
            .collect();
        names.sort();
        names
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Parses a certificate chain and its key, and checks they belong together.
fn load_pair(
    cert: &Path,
    key: &Path,
    provider: &rustls::crypto::CryptoProvider,
) -> Result<CertifiedKey, TlsError> {
    let chain = parse_certs(&read(cert)?, cert)?;
    let key_pem = read(key)?;
    let private = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::NoKey {
        path: key.to_owned(),
        detail: e.to_string(),
    })?;
    let certified = CertifiedKey::from_der(chain, private, provider).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => TlsError::Mismatch {
            cert: cert.to_owned(),
            key: key.to_owned(),
            detail: e.to_string(),
        },
        other => TlsError::NoKey {
            path: key.to_owned(),
            detail: other.to_string(),
        },
    })?;
    Ok(certified)
}

/// Every PEM certificate in `pem`, in order.
pub(crate) fn parse_certs(
    pem: &[u8],
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let chain = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::NoCertificate {
            path: path.to_owned(),
            detail: Some(e.to_string()),
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
            detail: None,
        });
    }
    Ok(chain)
}

/// The DNS names a certificate's subject alternative names carry.
fn dns_names(certified: &CertifiedKey, path: &Path) -> Result<Vec<String>, TlsError> {
    let leaf = certified
        .end_entity_cert()
        .map_err(|_| TlsError::NoCertificate {
            path: path.to_owned(),
            detail: None,
        })?;
    let parsed = webpki::EndEntityCert::try_from(leaf).map_err(|e| TlsError::NoCertificate {
        path: path.to_owned(),
        detail: Some(format!("{e:?}")),
    })?;
    let names: Vec<String> = parsed.valid_dns_names().map(str::to_owned).collect();
    if names.is_empty() {
        return Err(TlsError::NoNames {
            path: path.to_owned(),
        });
    }
    Ok(names)
}

/// Whether a directory entry is Kubernetes' secret-volume bookkeeping (`..data`,
/// `..2024_01_01...`) or otherwise hidden; the visible names are symlinks into it.
fn hidden(name: &std::ffi::OsStr) -> bool {
    name.to_string_lossy().starts_with('.')
}

/// Collects (certificate, key) pairs under `dir`.
fn walk_store(
    dir: &Path,
    depth: usize,
    pairs: &mut Vec<(PathBuf, PathBuf)>,
) -> Result<(), TlsError> {
    let entries = std::fs::read_dir(dir).map_err(|source| TlsError::Read {
        path: dir.to_owned(),
        source,
    })?;
    for entry in entries {
        let entry = entry.map_err(|source| TlsError::Read {
            path: dir.to_owned(),
            source,
        })?;
        let path = entry.path();
        if hidden(&entry.file_name()) {
            continue;
        }
        // Follows symlinks, as secret volumes need.
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        if meta.is_dir() {
            if depth < MAX_STORE_DEPTH {
                walk_store(&path, depth + 1, pairs)?;
            }
            continue;
        }
        let Some(stem) = cert_stem(&path) else {
            continue;
        };
        let tried = key_candidates(&path, &stem);
        match tried.iter().find(|k| k.is_file()) {
            Some(key) => pairs.push((path.clone(), key.clone())),
            None => return Err(TlsError::MissingKey { cert: path, tried }),
        }
    }
    Ok(())
}

/// The stem of a certificate file (`site` for `site.crt`), or `None` for any other file,
/// including keys written as `.pem` (`site-key.pem`, `site.key.pem`).
fn cert_stem(path: &Path) -> Option<String> {
    let ext = path.extension()?.to_str()?;
    if !CERT_EXTENSIONS.contains(&ext) {
        return None;
    }
    let stem = path.file_stem()?.to_str()?;
    if stem.ends_with("-key") || stem.ends_with(".key") || stem == "key" || stem == "ca" {
        return None;
    }
    Some(stem.to_owned())
}

/// The key files a certificate may be paired with, in order of preference.
fn key_candidates(cert: &Path, stem: &str) -> Vec<PathBuf> {
    let dir = cert.parent().unwrap_or_else(|| Path::new("."));
    vec![
        dir.join(format!("{stem}.key")),
        dir.join(format!("{stem}-key.pem")),
        dir.join(format!("{stem}.key.pem")),
    ]
}

/// What the files behind `sources` look like now.
fn fingerprint(sources: &CertSources) -> Fingerprint {
    fn add(path: &Path, depth: usize, out: &mut Fingerprint) {
        let Ok(meta) = std::fs::metadata(path) else {
            out.push((path.to_owned(), 0, None));
            return;
        };
        if meta.is_dir() {
            if depth > MAX_STORE_DEPTH {
                return;
            }
            let Ok(entries) = std::fs::read_dir(path) else {
                return;
            };
            let mut children: Vec<PathBuf> = entries
                .filter_map(Result::ok)
                .filter(|e| !hidden(&e.file_name()))
                .map(|e| e.path())
                .collect();
            children.sort();
            for child in children {
                add(&child, depth + 1, out);
            }
        } else {
            out.push((path.to_owned(), meta.len(), meta.modified().ok()));
        }
    }
    let mut out = Vec::new();
    if let Some((cert, key)) = &sources.default {
        add(cert, 0, &mut out);
        add(key, 0, &mut out);
    }
    for store in &sources.stores {
        add(store, 0, &mut out);
    }
    out
}

/// Picks a certificate by SNI from the current set. A name no certificate covers gets the
/// default certificate; with no default, the handshake is refused.
#[derive(Debug)]
pub struct SniResolver {
    current: ArcSwap<Certificates>,
}

impl SniResolver {
    /// A resolver serving `certs`.
    pub fn new(certs: Certificates) -> Arc<Self> {
        Arc::new(Self {
            current: ArcSwap::from_pointee(certs),
        })
    }

    /// The set in use.
    pub fn current(&self) -> Arc<Certificates> {
        self.current.load_full()
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let picked = self.current.load().pick(hello.server_name());
        if picked.is_none() {
            tracing::debug!(sni = ?hello.server_name(), "TLS handshake refused: no certificate for this name");
        }
        picked
    }
}

/// The listener's rustls configuration: TLS 1.3 and 1.2 only, ALPN `h2` then `http/1.1`.
pub fn server_config(resolver: Arc<SniResolver>) -> Result<Arc<ServerConfig>, TlsError> {
    let mut config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(TlsError::Config)?
            .with_no_client_auth()
            .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Reloads the certificates whenever their files change, checking every `interval`, until
/// `stop`. A set that fails to load (a certificate written before its key, say) is logged and
/// the previous set kept; the next change tries again.
pub async fn reload_on_change(
    resolver: Arc<SniResolver>,
    sources: CertSources,
    interval: Duration,
    stop: CancellationToken,
) {
    let mut seen = resolver.current().files.clone();
    let mut failed: Option<Fingerprint> = None;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
        let probe = sources.clone();
        let Ok(now) = tokio::task::spawn_blocking(move || fingerprint(&probe)).await else {
            continue;
        };
        if now == seen || failed.as_ref() == Some(&now) {
            continue;
        }
        let load = sources.clone();
        match tokio::task::spawn_blocking(move || Certificates::load(&load)).await {
            Ok(Ok(certs)) => {
                tracing::info!(names = ?certs.names(), default = certs.default.is_some(), "TLS certificates reloaded");
                seen = certs.files.clone();
                failed = None;
                resolver.current.store(Arc::new(certs));
            }
            Ok(Err(err)) => {
                tracing::warn!(error = %err, "TLS certificates changed but cannot be loaded; keeping the previous ones");
                failed = Some(now);
            }
            Err(err) => tracing::error!(error = %err, "TLS reload task failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_pair(dir: &Path, stem: &str, names: &[&str]) -> rcgen::CertifiedKey<rcgen::KeyPair> {
        let certified = rcgen::generate_simple_self_signed(
            names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>(),
        )
        .unwrap();
        std::fs::write(dir.join(format!("{stem}.crt")), certified.cert.pem()).unwrap();
        std::fs::write(
            dir.join(format!("{stem}.key")),
            certified.signing_key.serialize_pem(),
        )
        .unwrap();
        certified
    }

    fn leaf(certs: &Certificates, sni: Option<&str>) -> Option<Vec<u8>> {
        certs.pick(sni).map(|c| c.cert[0].to_vec())
    }

    #[test]
    fn store_certificates_are_picked_by_exact_then_wildcard_name_then_default() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("store");
        std::fs::create_dir_all(store.join("nested")).unwrap();
        let a = write_pair(&store, "a", &["a.example"]);
        let wild = write_pair(&store.join("nested"), "tls", &["*.apps.example"]);
        let default = write_pair(dir.path(), "default", &["default.example"]);
        let certs = Certificates::load(&CertSources {
            default: Some((
                dir.path().join("default.crt"),
                dir.path().join("default.key"),
            )),
            stores: vec![store],
        })
        .unwrap();
        assert_eq!(
            leaf(&certs, Some("A.Example")).unwrap(),
            a.cert.der().to_vec()
        );
        assert_eq!(
            leaf(&certs, Some("x.apps.example")).unwrap(),
            wild.cert.der().to_vec()
        );
        // A wildcard covers one label only.
        assert_eq!(
            leaf(&certs, Some("y.x.apps.example")).unwrap(),
            default.cert.der().to_vec()
        );
        assert_eq!(leaf(&certs, None).unwrap(), default.cert.der().to_vec());
        assert_eq!(certs.names(), vec!["*.apps.example", "a.example"]);
    }

    #[test]
    fn without_a_default_an_unknown_name_gets_nothing() {
        let dir = tempfile::tempdir().unwrap();
        write_pair(dir.path(), "a", &["a.example"]);
        let certs = Certificates::load(&CertSources {
            default: None,
            stores: vec![dir.path().to_owned()],
        })
        .unwrap();
        assert!(leaf(&certs, Some("b.example")).is_none());
        assert!(leaf(&certs, None).is_none());
    }

    #[test]
    fn bad_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let a = write_pair(dir.path(), "a", &["a.example"]);
        let b = write_pair(dir.path(), "b", &["b.example"]);
        drop((a, b));
        let p = |n: &str| dir.path().join(n);
        let load = |cert: &str, key: &str| {
            Certificates::load(&CertSources {
                default: Some((p(cert), p(key))),
                stores: vec![],
            })
            .unwrap_err()
            .to_string()
        };
        let err = load("a.crt", "b.key");
        assert!(
            err.contains("does not match") && err.contains("a.crt"),
            "{err}"
        );
        let err = load("missing.crt", "a.key");
        assert!(
            err.contains("cannot read") && err.contains("missing.crt"),
            "{err}"
        );
        let err = load("a.key", "a.key");
        assert!(
            err.contains("no PEM certificate") && err.contains("a.key"),
            "{err}"
        );
        let err = load("a.crt", "a.crt");
        assert!(err.contains("no usable PEM private key"), "{err}");

        std::fs::remove_file(p("b.key")).unwrap();
        let err = Certificates::load(&CertSources {
            default: None,
            stores: vec![dir.path().to_owned()],
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("b.crt has no key beside it"), "{err}");
        let empty = tempfile::tempdir().unwrap();
        assert!(matches!(
            Certificates::load(&CertSources {
                default: None,
                stores: vec![empty.path().to_owned()],
            }),
            Err(TlsError::Empty)
        ));
    }

    #[test]
    fn the_fingerprint_changes_when_a_file_is_rewritten_or_added() {
        let dir = tempfile::tempdir().unwrap();
        write_pair(dir.path(), "a", &["a.example"]);
        let sources = CertSources {
            default: None,
            stores: vec![dir.path().to_owned()],
        };
        let before = fingerprint(&sources);
        assert_eq!(before, fingerprint(&sources));
        write_pair(dir.path(), "b", &["b.example"]);
        assert_ne!(before, fingerprint(&sources));
    }
}
