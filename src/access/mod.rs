//! Who is who: the institutions of the network and the AE titles they call
//! from. (Links, disclosures and the visibility rule join this module with
//! the consent work.) Default deny: an AE title not configured belongs to no one.

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

    pub fn by_code(&self, code: &str) -> Option<Arc<Institution>> {
        self.by_code.get(code).cloned()
    }

    pub fn is_empty(&self) -> bool {
        self.by_code.is_empty()
    }
}
