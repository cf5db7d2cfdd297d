//! Who is who and who may see what: the institutions of the network and the
//! AE titles they call from, and the records of consent (`records`: patient
//! ID links, disclosures, break-glass grants). The visibility rule itself is
//! one SQL filter, `index::search::Scope`. Default deny: an AE title not
//! configured belongs to no one.

pub mod records;

use std::collections::HashMap;
use std::sync::Arc;

use crate::config::InstitutionConfig;

/// A hospital of the network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Institution {
    pub code: String,
    pub name: String,
    /// The namespace of its patient IDs (Issuer of Patient ID).
    pub issuer_of_patient_id: String,
    /// Its users see other institutions' objects under their own patient IDs.
    pub coerce_patient_ids: bool,
    /// Fingerprints (SHA-256, lower-case hex) of the client certificates its
    /// senders must present; empty: calling AE title alone, TLS or not.
    pub tls_certificates: Vec<String>,
    /// Networks its senders connect from; empty: any.
    pub networks: Vec<ipnet::IpNet>,
}

/// The configured institutions, looked up by code or calling AE title.
#[derive(Debug, Default)]
pub struct Institutions {
    by_code: HashMap<String, Arc<Institution>>,
    by_ae: HashMap<String, Arc<Institution>>,
}

impl Institutions {
    pub fn from_config(cfg: &[InstitutionConfig]) -> Self {
        let mut me = Self::default();
        for c in cfg {
            let inst = Arc::new(Institution {
                code: c.code.clone(),
                name: c.name.clone(),
                issuer_of_patient_id: c.issuer_of_patient_id.clone(),
                coerce_patient_ids: c.coerce_patient_ids,
                tls_certificates: c
                    .tls_certificate_sha256
                    .iter()
                    .map(|f| f.replace(':', "").to_ascii_lowercase())
                    .collect(),
                networks: c.networks.clone(),
            });
            for ae in &c.ae_titles {
                me.by_ae.insert(ae.trim().to_string(), inst.clone());
            }
            me.by_code.insert(c.code.clone(), inst);
        }
        me
    }

    /// The institution a calling AE title belongs to (AE titles compare
    /// without their space padding, case-sensitively as PS3.5 §6.2 says).
    pub fn by_calling_ae(&self, calling: &str) -> Option<Arc<Institution>> {
        self.by_ae.get(calling.trim()).cloned()
    }

    /// The institution whose senders present the certificate with this
    /// fingerprint (lower-case hex), if one named it.
    pub fn by_certificate(&self, fingerprint: &str) -> Option<Arc<Institution>> {
        self.by_code
            .values()
            .find(|i| i.tls_certificates.iter().any(|f| f == fingerprint))
            .cloned()
    }

    pub fn by_code(&self, code: &str) -> Option<Arc<Institution>> {
        self.by_code.get(code).cloned()
    }

    /// Every institution, in code order.
    pub fn all(&self) -> Vec<Arc<Institution>> {
        let mut v: Vec<_> = self.by_code.values().cloned().collect();
        v.sort_by(|a, b| a.code.cmp(&b.code));
        v
    }

    pub fn is_empty(&self) -> bool {
        self.by_code.is_empty()
    }
}
