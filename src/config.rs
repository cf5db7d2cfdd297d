//! Typed configuration, layered: built-in defaults < TOML file < `TSUNAGU_*`
//! environment (`TSUNAGU_SERVER__HTTP_PORT=9090`). Validated once at startup
//! with errors that name the offending key.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0}")]
    Load(#[from] Box<figment::Error>),
    #[error("invalid configuration: {key}: {reason}")]
    Invalid { key: String, reason: String },
    #[error("configuration file {0} does not exist")]
    Missing(PathBuf),
}

fn invalid(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        reason: reason.into(),
    }
}

/// The whole configuration.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
#[derive(Default)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub storage: StorageConfig,
    #[serde(default)]
    pub index: IndexConfig,
    #[serde(default)]
    pub auth: AuthConfig,
    #[serde(default)]
    pub dicomweb: DicomWebConfig,
    #[serde(default)]
    pub access: AccessConfig,
    #[serde(default)]
    pub audit: AuditConfig,
    /// The hospitals whose modalities may send to us.
    #[serde(default, rename = "institution")]
    pub institutions: Vec<InstitutionConfig>,
}

/// `[server]`: network endpoints and limits.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Our AE title: the called AE title associations must use.
    pub ae_title: String,
    /// DICOM upper-layer port.
    pub dicom_port: u16,
    /// HTTP port (DICOMweb, admin API, health, metrics).
    pub http_port: u16,
    /// Address both listeners bind to.
    pub bind: IpAddr,
    /// Most associations served at once; further ones are rejected (transient).
    pub max_associations: usize,
    /// Most associations served at once from one peer address, so that one
    /// sender pushing on many associations cannot take every slot from the
    /// others; further ones are rejected (transient). Off when absent.
    pub max_associations_per_peer: Option<usize>,
    /// Largest P-DATA PDU we accept (and announce), in bytes.
    pub max_pdu_length: u32,
    /// Seconds an association may stay silent before it is aborted.
    pub association_timeout_secs: u64,
    /// DICOM over TLS (PS3.15 Annex B) on a port of its own; off when absent.
    pub tls: Option<DicomTlsConfig>,
    /// HTTPS on `http_port` instead of plain HTTP; off when absent.
    pub http_tls: Option<HttpTlsConfig>,
}

/// `[server.http_tls]`: the HTTP listener speaks TLS 1.2/1.3 only.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HttpTlsConfig {
    /// The server's certificate chain, PEM.
    pub certificate_file: std::path::PathBuf,
    /// Its private key, PEM.
    pub private_key_file: std::path::PathBuf,
}

/// `[server.tls]`: the DICOM TLS listener (BCP 195: TLS 1.2 and 1.3 only).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DicomTlsConfig {
    /// Port of the TLS listener (2762 is DICOM's registered TLS port).
    #[serde(default = "dicom_tls_port")]
    pub port: u16,
    /// The server's certificate chain, PEM.
    pub certificate_file: std::path::PathBuf,
    /// Its private key, PEM (PKCS#8, PKCS#1 or SEC1).
    pub private_key_file: std::path::PathBuf,
    /// CA certificates (PEM) that issue the senders' client certificates:
    /// when set, every TLS association must present one (mutual TLS).
    pub client_ca_file: Option<std::path::PathBuf>,
}

fn dicom_tls_port() -> u16 {
    2762
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            ae_title: "TSUNAGU".into(),
            dicom_port: 11112,
            http_port: 8080,
            bind: IpAddr::from([127, 0, 0, 1]),
            max_associations: 64,
            max_associations_per_peer: None,
            max_pdu_length: 131_072,
            association_timeout_secs: 60,
            tls: None,
            http_tls: None,
        }
    }
}

/// `[storage]`: where objects are kept.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// `file://DIR` (local directory, fsync'ed) or `s3://bucket/prefix`.
    pub url: String,
    /// S3 endpoint for S3-compatible servers (e.g. `http://127.0.0.1:9000`).
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    /// Allow plain HTTP to the S3 endpoint (test servers only).
    pub allow_http: bool,
    /// Where incoming objects are spooled before upload (S3 only; local
    /// storage spools inside its own directory so the final rename is atomic).
    pub spool_dir: Option<PathBuf>,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            url: "file://./tsunagu-data".into(),
            endpoint: None,
            region: None,
            access_key_id: None,
            secret_access_key: None,
            allow_http: false,
            spool_dir: None,
        }
    }
}

/// `[index]`: the search index database.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct IndexConfig {
    /// `sqlite://FILE` or `postgres://user@host:port/db`.
    pub url: String,
    /// Most connections of each pool (PostgreSQL has two: reads, and the rest).
    pub max_connections: u32,
}

impl Default for IndexConfig {
    fn default() -> Self {
        Self {
            url: "sqlite://./tsunagu-data/index.sqlite".into(),
            max_connections: 8,
        }
    }
}

/// `[auth]`: bearer tokens (JWT) for the HTTP APIs.
#[derive(Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Expected (and, for `tsunagu token`, issued) `iss` claim.
    pub issuer: String,
    /// Expected (and issued) `aud` claim.
    pub audience: String,
    /// HS256 shared secret for local setups; `tsunagu token` signs with it.
    pub hs256_secret: Option<String>,
    /// PEM files of an identity provider's public keys (RSA for RS256, EC
    /// P-256 for ES256), for tokens that carry no `kid` or a `kid` no JWKS names.
    pub public_key_files: Vec<PathBuf>,
    /// A JWKS file (RFC 7517) of the identity provider's signing keys.
    pub jwks_file: Option<PathBuf>,
    /// Clock skew tolerated on `exp` and `nbf`, in seconds (at most
    /// `LEEWAY_MAX_SECS`).
    pub leeway_secs: u64,
}

/// Longest break-glass grant: an emergency, not a standing permission.
pub const BREAK_GLASS_HOURS_MAX: u32 = 72;

/// Most clock skew accepted: more would keep expired tokens valid.
pub const LEEWAY_MAX_SECS: u64 = 300;

// By hand: the secret never reaches a log or a panic message.
impl std::fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthConfig")
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field(
                "hs256_secret",
                &self.hs256_secret.as_ref().map(|_| "********"),
            )
            .field("public_key_files", &self.public_key_files)
            .field("jwks_file", &self.jwks_file)
            .field("leeway_secs", &self.leeway_secs)
            .finish()
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            issuer: "tsunagu".into(),
            audience: "tsunagu".into(),
            hs256_secret: None,
            public_key_files: Vec::new(),
            jwks_file: None,
            leeway_secs: 30,
        }
    }
}

/// What QIDO-RS answers when nothing matches.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum EmptySearch {
    /// 204 No Content (PS3.18 as published).
    NoContent,
    /// 200 with `[]` (as CP-2473 proposes).
    EmptyArray,
}

/// `[dicomweb]`: the DICOMweb services under `/dicom-web`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DicomWebConfig {
    /// Origins (e.g. `https://viewer.example`) whose browsers may call us
    /// (CORS); empty: no cross-origin access.
    pub cors_origins: Vec<String>,
    /// Largest STOW-RS request body, in bytes.
    pub stow_max_bytes: u64,
    /// STOW-RS requests stored at once; more are answered 503 (retry later).
    pub stow_max_concurrent: usize,
    /// Most results one QIDO-RS answer returns (`limit` is capped to it).
    pub qido_max_results: u32,
    /// QIDO-RS answer when nothing matches.
    pub qido_empty: EmptySearch,
    /// Public base URL of the service root (e.g.
    /// `https://pacs.example/dicom-web`) for RetrieveURL; by default taken from
    /// the request's Host header.
    pub base_url: Option<String>,
}

impl Default for DicomWebConfig {
    fn default() -> Self {
        Self {
            cors_origins: Vec::new(),
            stow_max_bytes: 4 << 30,
            stow_max_concurrent: 16,
            qido_max_results: 1000,
            qido_empty: EmptySearch::NoContent,
            base_url: None,
        }
    }
}

/// `[access]`: the consent rules' options.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AccessConfig {
    /// Whether clinicians may open emergency (break-glass) access.
    pub break_glass: bool,
    /// How long one break-glass grant lasts.
    pub break_glass_hours: u32,
}

impl Default for AccessConfig {
    fn default() -> Self {
        Self {
            break_glass: false,
            break_glass_hours: 4,
        }
    }
}

/// `[audit]`: where audit events go besides the database.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// A syslog collector for PS3.15 A.5 audit messages:
    /// `udp://host:port` (RFC 5426) or `tls://host:port` (RFC 5425).
    pub syslog: Option<String>,
    /// CA certificate (PEM) that the TLS collector's certificate must chain to.
    pub syslog_ca_file: Option<PathBuf>,
    /// A file holding the secret (at least 32 bytes, e.g. `openssl rand
    /// -hex 32`) that keys the trail's hash chain: each event is then chained
    /// with HMAC-SHA-256, which whoever can write the database but has not
    /// this file cannot recompute after changing an event. Keep it off the
    /// database's machine and its backups.
    pub chain_key_file: Option<PathBuf>,
}

/// `[[institution]]`: a hospital of the network.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct InstitutionConfig {
    /// Short code, e.g. a medical institution code; used in storage keys.
    pub code: String,
    pub name: String,
    /// Namespace of its patient IDs (Issuer of Patient ID, 0010,0021).
    pub issuer_of_patient_id: String,
    /// Calling AE titles of its modalities and PACS.
    #[serde(default)]
    pub ae_titles: Vec<String>,
    /// Whether its users retrieve other institutions' instances coerced to
    /// their own patient ID (off: exactly as stored). Searches and metadata
    /// show the requester's ID either way (PS3.4 matching needs it).
    #[serde(default = "yes")]
    pub coerce_patient_ids: bool,
    /// SHA-256 fingerprints (hex) of the client certificates its senders
    /// present over DICOM TLS. When set, its AE titles are accepted only
    /// over TLS with one of these certificates (needs
    /// `server.tls.client_ca_file`).
    #[serde(default)]
    pub tls_certificate_sha256: Vec<String>,
    /// Networks (CIDR: `10.1.0.0/16`, `10.1.2.3/32`, `2001:db8::/32`) its
    /// senders connect from; empty: any address. Applies to DICOM
    /// associations.
    #[serde(default)]
    pub networks: Vec<ipnet::IpNet>,
}

fn yes() -> bool {
    true
}

/// `TSUNAGU_` environment variables that are not configuration keys: the
/// configuration file, the log format (read before the configuration) and
/// the benchmarks' corpus directory (`TSUNAGU_TEST_*` too, below). Any other
/// is a key, and an unknown one an error: a misspelt override is reported,
/// not ignored.
const RESERVED_ENV: &[&str] = &["CONFIG", "LOG_FORMAT", "BENCH_DIR"];

impl Config {
    /// Load defaults, then `path` (if given), then the environment.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        if let Some(p) = path {
            if !p.exists() {
                return Err(ConfigError::Missing(p.to_path_buf()));
            }
            fig = fig.merge(Toml::file(p));
        }
        let env = Env::prefixed("TSUNAGU_")
            .filter(|k| {
                let k = k.as_str().to_ascii_uppercase();
                !RESERVED_ENV.contains(&k.as_str()) && !k.starts_with("TEST_")
            })
            .split("__");
        let cfg: Config = fig.merge(env).extract().map_err(Box::new)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Check cross-field rules serde cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_ae("server.ae_title", &self.server.ae_title)?;
        if self.server.max_associations == 0 {
            return Err(invalid("server.max_associations", "must be at least 1"));
        }
        if let Some(n) = self.server.max_associations_per_peer
            && !(1..=self.server.max_associations).contains(&n)
        {
            return Err(invalid(
                "server.max_associations_per_peer",
                "must be between 1 and server.max_associations",
            ));
        }
        if self.server.association_timeout_secs == 0 {
            // It is also a STOW-RS upload's idle timeout: 0 fails them all.
            return Err(invalid(
                "server.association_timeout_secs",
                "must be at least 1",
            ));
        }
        if let Some(tls) = &self.server.tls {
            for (key, file) in [
                ("server.tls.certificate_file", Some(&tls.certificate_file)),
                ("server.tls.private_key_file", Some(&tls.private_key_file)),
                ("server.tls.client_ca_file", tls.client_ca_file.as_ref()),
            ] {
                if let Some(f) = file
                    && !f.is_file()
                {
                    return Err(invalid(
                        key,
                        format!("{} is not a readable file", f.display()),
                    ));
                }
            }
        }
        if let Some(tls) = &self.server.http_tls {
            for (key, f) in [
                ("server.http_tls.certificate_file", &tls.certificate_file),
                ("server.http_tls.private_key_file", &tls.private_key_file),
            ] {
                if !f.is_file() {
                    return Err(invalid(
                        key,
                        format!("{} is not a readable file", f.display()),
                    ));
                }
            }
        }
        if let Some(tls) = &self.server.tls
            && tls.port != 0
            && (tls.port == self.server.dicom_port || tls.port == self.server.http_port)
        {
            return Err(invalid(
                "server.tls.port",
                "must differ from server.dicom_port and server.http_port",
            ));
        }
        for (i, inst) in self.institutions.iter().enumerate() {
            for n in &inst.networks {
                let key = format!("institution[{i}].networks");
                if *n != n.trunc() {
                    return Err(invalid(
                        key,
                        format!("{n} has host bits set: write {} (or a /32)", n.trunc()),
                    ));
                }
                if let ipnet::IpNet::V6(v6) = n
                    && v6.addr().to_ipv4_mapped().is_some()
                {
                    return Err(invalid(
                        key,
                        format!("{n}: write IPv4-mapped networks as IPv4"),
                    ));
                }
            }
        }
        let mut pinned: std::collections::HashMap<String, &str> = Default::default();
        for (i, inst) in self.institutions.iter().enumerate() {
            for f in &inst.tls_certificate_sha256 {
                let f = f.replace(':', "").to_ascii_lowercase();
                if let Some(other) = pinned.insert(f.clone(), &inst.code)
                    && other != inst.code
                {
                    return Err(invalid(
                        format!("institution[{i}].tls_certificate_sha256"),
                        format!("{f} is already the certificate of institution {other}"),
                    ));
                }
            }
            if inst.tls_certificate_sha256.is_empty() {
                continue;
            }
            let key = format!("institution[{i}].tls_certificate_sha256");
            if self
                .server
                .tls
                .as_ref()
                .is_none_or(|t| t.client_ca_file.is_none())
            {
                return Err(invalid(
                    key,
                    "needs DICOM TLS with client certificates (server.tls.client_ca_file)",
                ));
            }
            if let Some(bad) = inst.tls_certificate_sha256.iter().find(|f| {
                let f = f.replace(':', "");
                f.len() != 64 || !f.chars().all(|c| c.is_ascii_hexdigit())
            }) {
                return Err(invalid(
                    key,
                    format!("{bad:?} is not a SHA-256 fingerprint (64 hex digits, colons allowed)"),
                ));
            }
        }
        if !(4096..=16 << 20).contains(&self.server.max_pdu_length) {
            return Err(invalid(
                "server.max_pdu_length",
                "must be between 4096 and 16777216 bytes",
            ));
        }
        if !(self.storage.url.starts_with("file://") || self.storage.url.starts_with("s3://")) {
            return Err(invalid("storage.url", "must start with file:// or s3://"));
        }
        if !(self.index.url.starts_with("sqlite:")
            || self.index.url.starts_with("postgres://")
            || self.index.url.starts_with("postgresql://"))
        {
            return Err(invalid(
                "index.url",
                "must start with sqlite:// or postgres://",
            ));
        }
        if let Some(s) = &self.auth.hs256_secret
            && s.len() < 16
        {
            return Err(invalid(
                "auth.hs256_secret",
                "must be at least 16 characters",
            ));
        }
        if self.auth.leeway_secs > LEEWAY_MAX_SECS {
            return Err(invalid(
                "auth.leeway_secs",
                format!("must be at most {LEEWAY_MAX_SECS} seconds"),
            ));
        }
        if !(1..=BREAK_GLASS_HOURS_MAX).contains(&self.access.break_glass_hours) {
            return Err(invalid(
                "access.break_glass_hours",
                format!("must be 1 to {BREAK_GLASS_HOURS_MAX} hours"),
            ));
        }
        if !(1..=4096).contains(&self.dicomweb.stow_max_concurrent) {
            return Err(invalid("dicomweb.stow_max_concurrent", "must be 1 to 4096"));
        }
        if self.dicomweb.qido_max_results == 0 {
            return Err(invalid("dicomweb.qido_max_results", "must be at least 1"));
        }
        for (i, o) in self.dicomweb.cors_origins.iter().enumerate() {
            if o.parse::<axum::http::HeaderValue>().is_err() || !o.contains("://") {
                return Err(invalid(
                    format!("dicomweb.cors_origins[{i}]"),
                    "an origin is scheme://host[:port]",
                ));
            }
        }
        let mut codes = std::collections::HashSet::new();
        let mut aes = std::collections::HashMap::new();
        for (i, inst) in self.institutions.iter().enumerate() {
            let key = format!("institution[{i}]");
            if inst.code.is_empty()
                || inst.code.len() > 32
                || !inst
                    .code
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(invalid(
                    format!("{key}.code"),
                    "1-32 characters of A-Z, a-z, 0-9, '-' or '_' (it is part of storage keys)",
                ));
            }
            if !codes.insert(inst.code.clone()) {
                return Err(invalid(
                    format!("{key}.code"),
                    format!("duplicate code {}", inst.code),
                ));
            }
            if inst.issuer_of_patient_id.trim().is_empty() {
                return Err(invalid(
                    format!("{key}.issuer_of_patient_id"),
                    "must not be empty",
                ));
            }
            for (j, ae) in inst.ae_titles.iter().enumerate() {
                check_ae(&format!("{key}.ae_titles[{j}]"), ae)?;
                if let Some(other) = aes.insert(ae.clone(), inst.code.clone()) {
                    return Err(invalid(
                        format!("{key}.ae_titles[{j}]"),
                        format!("AE title {ae} is already used by institution {other}"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The configuration as TOML with secrets masked, for `config check`.
    pub fn to_masked_toml(&self) -> String {
        let mut c = self.clone();
        if c.storage.secret_access_key.is_some() {
            c.storage.secret_access_key = Some("********".into());
        }
        if c.auth.hs256_secret.is_some() {
            c.auth.hs256_secret = Some("********".into());
        }
        // postgres://user:password@host/db: hide the password.
        if let Ok(mut u) = url::Url::parse(&c.index.url)
            && u.password().is_some()
            && u.set_password(Some("********")).is_ok()
        {
            c.index.url = u.to_string();
        }
        toml_string(&c)
    }
}

fn toml_string(c: &Config) -> String {
    toml::to_string_pretty(c).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
}

fn check_ae(key: &str, ae: &str) -> Result<(), ConfigError> {
    let t = ae.trim();
    if t.is_empty() || t.len() > 16 || t.chars().any(|c| c == '\\' || c.is_control()) {
        return Err(invalid(
            key,
            "an AE title is 1-16 characters, no backslash or control characters",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn a_network_that_is_not_cidr_names_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("t.toml");
        std::fs::write(
            &file,
            "[[institution]]\ncode = \"A\"\nname = \"A\"\nissuer_of_patient_id = \"A\"\n\
             networks = [\"10.0.0/8\"]\n",
        )
        .unwrap();
        let e = Config::load(Some(&file)).unwrap_err().to_string();
        assert!(e.contains("networks"), "{e}");
        std::fs::write(
            &file,
            "[[institution]]\ncode = \"A\"\nname = \"A\"\nissuer_of_patient_id = \"A\"\n\
             networks = [\"10.0.0.0/8\", \"2001:db8::/32\"]\n",
        )
        .unwrap();
        let c = Config::load(Some(&file)).unwrap();
        assert_eq!(c.institutions[0].networks.len(), 2);
        for bad in ["10.1.2.3/16", "::ffff:10.0.0.0/104"] {
            let mut c = c.clone();
            c.institutions[0].networks = vec![bad.parse().unwrap()];
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains("institution[0].networks"), "{bad}: {e}");
        }
    }

    #[test]
    fn the_per_peer_limit_lies_within_the_whole() {
        let mut c = Config::default();
        for bad in [0, c.server.max_associations + 1] {
            c.server.max_associations_per_peer = Some(bad);
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains("server.max_associations_per_peer"), "{e}");
        }
        c.server.max_associations_per_peer = Some(c.server.max_associations);
        c.validate().unwrap();
    }

    #[test]
    fn duplicate_ae_title_names_the_key() {
        let mut c = Config::default();
        for code in ["A", "B"] {
            c.institutions.push(InstitutionConfig {
                code: code.into(),
                name: code.into(),
                issuer_of_patient_id: code.into(),
                ae_titles: vec!["SAME".into()],
                coerce_patient_ids: true,
                tls_certificate_sha256: Vec::new(),
                networks: Vec::new(),
            });
        }
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("institution[1].ae_titles[0]"), "{e}");
    }

    #[test]
    fn a_zero_association_timeout_names_the_key() {
        let mut c = Config::default();
        c.server.association_timeout_secs = 0;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("server.association_timeout_secs"), "{e}");
    }

    #[test]
    fn masked_toml_hides_secrets() {
        let mut c = Config::default();
        c.storage.secret_access_key = Some("topsecret".into());
        c.index.url = "postgres://u:pw@127.0.0.1:5432/db".into();
        let t = c.to_masked_toml();
        assert!(!t.contains("topsecret") && !t.contains(":pw@"), "{t}");
        assert!(t.contains("[server]"), "{t}");
    }
}
