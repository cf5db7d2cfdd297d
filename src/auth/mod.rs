//! Bearer tokens (JWT, RFC 7519) for the HTTP APIs: the claims we issue and
//! accept, their verification against the configured keys (an HS256 secret
//! for local setups; an identity provider's RS256/ES256 keys as PEM files or
//! a JWKS, in the spirit of IHE IUA), and `tsunagu token`.

use std::time::Duration;

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use std::str::FromStr;

use crate::config::AuthConfig;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("auth.hs256_secret is not configured; `tsunagu token` needs it")]
    NoSecret,
    #[error("cannot sign the token: {0}")]
    Sign(#[from] jsonwebtoken::errors::Error),
    #[error("cannot read the key file {path}: {reason}")]
    KeyFile {
        path: std::path::PathBuf,
        reason: String,
    },
}

/// Why a presented token is refused. The detail goes to the audit trail and
/// the log; the client only learns that it was refused and which kind.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("no bearer token")]
    Missing,
    #[error("the token is not a well-formed JWT")]
    Malformed,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet")]
    NotYetValid,
    #[error("the token's signature or algorithm is not accepted")]
    BadSignature,
    #[error("the token's issuer or audience is not ours")]
    WrongParty,
    #[error("the token's claims are incomplete: {0}")]
    Claims(String),
}

/// One key a token may be signed with.
struct VerifyKey {
    kid: Option<String>,
    algorithms: Vec<Algorithm>,
    key: DecodingKey,
}

/// Verifies bearer tokens against every configured key.
pub struct Verifier {
    keys: Vec<VerifyKey>,
    issuer: String,
    audience: String,
    leeway: u64,
    /// Tokens already verified, with their claims: a viewer sends the same
    /// token with every request, and checking it again (two JSON parses,
    /// base64, the signature, the validation sets) took more of a short
    /// search's time than rendering its answer. The keys never change while
    /// the server runs, so the same bytes verify the same way; only expiry
    /// is checked again.
    verified: std::sync::Mutex<std::collections::HashMap<String, Claims>>,
}

/// Verified tokens remembered at most (the map is emptied when full).
const VERIFIED_KEPT: usize = 4096;

impl Verifier {
    /// Load the keys named in `[auth]`. No key at all is allowed (every
    /// request is then refused), so a hub with no HTTP users still starts.
    pub fn from_config(cfg: &AuthConfig) -> Result<Self, AuthError> {
        let mut keys = Vec::new();
        if let Some(secret) = &cfg.hs256_secret {
            keys.push(VerifyKey {
                kid: None,
                algorithms: vec![Algorithm::HS256],
                key: DecodingKey::from_secret(secret.as_bytes()),
            });
        }
        let read = |path: &std::path::Path| {
            std::fs::read(path).map_err(|e| AuthError::KeyFile {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })
        };
        for path in &cfg.public_key_files {
            let pem = read(path)?;
            let (key, algorithms) = if let Ok(k) = DecodingKey::from_rsa_pem(&pem) {
                (
                    k,
                    vec![Algorithm::RS256, Algorithm::RS384, Algorithm::RS512],
                )
            } else if let Ok(k) = DecodingKey::from_ec_pem(&pem) {
                (k, vec![Algorithm::ES256, Algorithm::ES384])
            } else {
                return Err(AuthError::KeyFile {
                    path: path.clone(),
                    reason: "neither an RSA nor an EC public key in PEM".into(),
                });
            };
            keys.push(VerifyKey {
                kid: None,
                algorithms,
                key,
            });
        }
        if let Some(path) = &cfg.jwks_file {
            let set: JwkSet =
                serde_json::from_slice(&read(path)?).map_err(|e| AuthError::KeyFile {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
            for jwk in &set.keys {
                // Keys published for encryption, or for operations other than
                // verifying, never verify a token.
                use jsonwebtoken::jwk::{KeyOperations, PublicKeyUse};
                let for_signatures = !matches!(
                    jwk.common.public_key_use,
                    Some(PublicKeyUse::Encryption | PublicKeyUse::Other(_))
                ) && jwk
                    .common
                    .key_operations
                    .as_ref()
                    .is_none_or(|ops| ops.contains(&KeyOperations::Verify));
                if !for_signatures {
                    continue;
                }
                let key = DecodingKey::from_jwk(jwk).map_err(|e| AuthError::KeyFile {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
                let algorithms = match jwk.common.key_algorithm {
                    Some(a) => match Algorithm::from_str(&a.to_string()) {
                        Ok(a) => vec![a],
                        Err(_) => continue,
                    },
                    None => match &jwk.algorithm {
                        jsonwebtoken::jwk::AlgorithmParameters::RSA(_) => {
                            vec![Algorithm::RS256, Algorithm::RS384, Algorithm::RS512]
                        }
                        jsonwebtoken::jwk::AlgorithmParameters::EllipticCurve(_) => {
                            vec![Algorithm::ES256, Algorithm::ES384]
                        }
                        _ => continue,
                    },
                };
                keys.push(VerifyKey {
                    kid: jwk.common.key_id.clone(),
                    algorithms,
                    key,
                });
            }
        }
        Ok(Self {
            keys,
            issuer: cfg.issuer.clone(),
            audience: cfg.audience.clone(),
            leeway: cfg.leeway_secs,
            verified: std::sync::Mutex::new(std::collections::HashMap::new()),
        })
    }

    /// Check signature, algorithm, `exp`, `iss` and `aud`; return the claims.
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        let now = jsonwebtoken::get_current_timestamp();
        let mut verified = self.verified.lock().expect("verified tokens lock");
        if let Some(claims) = verified.get(token) {
            // As jsonwebtoken judges expiry.
            if claims.exp < now.saturating_sub(self.leeway) {
                verified.remove(token);
                return Err(TokenError::Expired);
            }
            return Ok(claims.clone());
        }
        drop(verified);
        let claims = self.verify_signed(token)?;
        let mut verified = self.verified.lock().expect("verified tokens lock");
        if verified.len() >= VERIFIED_KEPT {
            verified.clear();
        }
        verified.insert(token.to_string(), claims.clone());
        Ok(claims)
    }

    fn verify_signed(&self, token: &str) -> Result<Claims, TokenError> {
        use jsonwebtoken::errors::ErrorKind;
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Malformed)?;
        // A token naming a key id is checked against the keys of that id
        // only; against keys without an id (PEM files) only when no key has
        // it.
        let named = header
            .kid
            .as_ref()
            .filter(|want| self.keys.iter().any(|k| k.kid.as_ref() == Some(want)));
        let candidates = self.keys.iter().filter(|k| {
            k.algorithms.contains(&header.alg)
                && match named {
                    Some(want) => k.kid.as_ref() == Some(want),
                    None => header.kid.is_none() || k.kid.is_none(),
                }
        });
        let mut last = TokenError::BadSignature;
        for k in candidates {
            let mut v = Validation::new(header.alg);
            v.set_issuer(&[&self.issuer]);
            v.set_audience(&[&self.audience]);
            v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
            v.leeway = self.leeway;
            // Not valid before `nbf` either (jsonwebtoken checks only `exp` by default).
            v.validate_nbf = true;
            match jsonwebtoken::decode::<Claims>(token, &k.key, &v) {
                Ok(data) => return Ok(data.claims),
                Err(e) => {
                    last = match e.kind() {
                        // This key does not verify it (a wrong signature, or a key
                        // of another curve or kind): another may.
                        ErrorKind::InvalidSignature
                        | ErrorKind::InvalidKeyFormat
                        | ErrorKind::InvalidAlgorithm
                        | ErrorKind::InvalidEcdsaKey
                        | ErrorKind::InvalidRsaKey(_) => continue,
                        ErrorKind::ImmatureSignature => TokenError::NotYetValid,
                        ErrorKind::ExpiredSignature => TokenError::Expired,
                        ErrorKind::InvalidIssuer | ErrorKind::InvalidAudience => {
                            TokenError::WrongParty
                        }
                        ErrorKind::MissingRequiredClaim(c) => TokenError::Claims(c.clone()),
                        ErrorKind::Json(e) => TokenError::Claims(e.to_string()),
                        ErrorKind::InvalidToken | ErrorKind::Base64(_) | ErrorKind::Utf8(_) => {
                            TokenError::Malformed
                        }
                        _ => TokenError::BadSignature,
                    };
                    // The signature held: the token itself is refused.
                    return Err(last);
                }
            }
        }
        Err(last)
    }
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
    #[serde(default)]
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

    /// A configuration with a test secret, and a clinician's token valid for an hour.
    fn config_and_token(institution: &str, user: &str) -> (AuthConfig, String) {
        let cfg = AuthConfig {
            hs256_secret: Some("s3cret-for-tests-only".into()),
            ..AuthConfig::default()
        };
        let t = mint(
            &cfg,
            institution,
            user,
            Role::Clinician,
            Duration::from_secs(3600),
            std::time::SystemTime::now(),
        )
        .unwrap();
        (cfg, t)
    }

    #[test]
    fn a_remembered_token_still_expires() {
        let (cfg, t) = config_and_token("HOSP1", "dr.ito");
        let verifier = Verifier::from_config(&cfg).unwrap();
        let first = verifier.verify(&t).unwrap();
        assert_eq!(verifier.verify(&t).unwrap(), first, "remembered");
        // The same token once its expiry (and the leeway) has passed.
        let mut old = first.clone();
        old.exp = jsonwebtoken::get_current_timestamp() - cfg.leeway_secs - 1;
        verifier.verified.lock().unwrap().insert(t.clone(), old);
        assert_eq!(verifier.verify(&t), Err(TokenError::Expired));
        // Forgotten, and checked in full again (it is in fact still valid).
        assert_eq!(verifier.verify(&t).unwrap(), first);
        // A token differing in one byte of its signature is not taken for it.
        let at = t.len() - 10;
        let swapped = if &t[at..at + 1] == "A" { "B" } else { "A" };
        let forged = format!("{}{swapped}{}", &t[..at], &t[at + 1..]);
        assert_eq!(verifier.verify(&forged), Err(TokenError::BadSignature));
    }

    #[test]
    fn minted_token_carries_the_claims_and_verifies() {
        let (cfg, t) = config_and_token("HOSP3", "dr.sato");
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
