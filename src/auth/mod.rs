//! Bearer tokens (JWT, RFC 7519) for the HTTP APIs: the claims we issue and
//! accept, and `tsunagu token`, which mints one from the configured HS256
//! secret for local setups. (Verification joins with the DICOMweb routes.)

use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::{Deserialize, Serialize};

use crate::config::AuthConfig;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("auth.hs256_secret is not configured; `tsunagu token` needs it")]
    NoSecret,
    #[error("cannot sign the token: {0}")]
    Sign(#[from] jsonwebtoken::errors::Error),
}

/// What a token holder may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads images (of its institution and those disclosed to it); may STOW.
    Clinician,
    /// Stores only (STOW-RS).
    Modality,
    /// Manages its institution's links, disclosures and audit; reads no images.
    Admin,
}

/// The claims of our tokens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The user.
    pub sub: String,
    /// The user's institution code.
    pub inst: String,
    pub role: Role,
    pub iss: String,
    pub aud: String,
    /// Expiry, seconds since the epoch.
    pub exp: u64,
    /// Issued at, seconds since the epoch.
    pub iat: u64,
}

/// Sign a token for `user` of `institution` with `role`, valid for `ttl` from `now`.
pub fn mint(
    cfg: &AuthConfig,
    institution: &str,
    user: &str,
    role: Role,
    ttl: Duration,
    now: std::time::SystemTime,
) -> Result<String, AuthError> {
    let secret = cfg.hs256_secret.as_deref().ok_or(AuthError::NoSecret)?;
    let iat = now
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let claims = Claims {
        sub: user.to_string(),
        inst: institution.to_string(),
        role,
        iss: cfg.issuer.clone(),
        aud: cfg.audience.clone(),
        exp: iat + ttl.as_secs(),
        iat,
    };
    Ok(jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{DecodingKey, Validation};

    #[test]
    fn minted_token_carries_the_claims_and_verifies() {
        let cfg = AuthConfig {
            hs256_secret: Some("s3cret-for-tests-only".into()),
            ..AuthConfig::default()
        };
        let t = mint(
            &cfg,
            "HOSP3",
            "dr.sato",
            Role::Clinician,
            Duration::from_secs(3600),
            std::time::SystemTime::now(),
        )
        .unwrap();
        let mut v = Validation::new(Algorithm::HS256);
        v.set_issuer(&[&cfg.issuer]);
        v.set_audience(&[&cfg.audience]);
        let back = jsonwebtoken::decode::<Claims>(
            &t,
            &DecodingKey::from_secret(b"s3cret-for-tests-only"),
            &v,
        )
        .unwrap()
        .claims;
        assert_eq!(
            (back.sub.as_str(), back.inst.as_str(), back.role),
            ("dr.sato", "HOSP3", Role::Clinician)
        );
        assert_eq!(back.exp - back.iat, 3600);
        assert!(
            jsonwebtoken::decode::<Claims>(&t, &DecodingKey::from_secret(b"wrong"), &v).is_err()
        );
    }

    #[test]
    fn no_secret_is_a_clear_error() {
        let e = mint(
            &AuthConfig::default(),
            "H",
            "u",
            Role::Admin,
            Duration::from_secs(1),
            std::time::SystemTime::now(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("auth.hs256_secret"));
    }
}
