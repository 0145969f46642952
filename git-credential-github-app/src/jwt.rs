//! The App's JSON Web Token, as GitHub's "Generating a JSON Web Token (JWT) for a GitHub App"
//! asks: RS256, `iat` 60 seconds in the past (against clock drift), `exp` no more than 10 minutes
//! ahead, `iss` the App's client ID or App ID.
//!
//! Why not the `jsonwebtoken` crate: since version 10 its RSA signing is either the `rsa` crate
//! (RUSTSEC-2023-0071, a timing side channel on private-key operations, with no fixed release)
//! or aws-lc-rs (a second C crypto library beside ring, and minutes of build). A JWT is two
//! base64url JSON parts and one RSA signature, which ring (constant-time, what rustls already
//! uses here) makes.

use std::path::Path;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ring::rand::SystemRandom;
use ring::signature::{RsaKeyPair, RSA_PKCS1_SHA256};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::PrivateKeyDer;
use serde_json::json;

use crate::error::HelperError;

/// `iat` this far in the past: GitHub's advice against clock drift.
pub const ISSUED_BEFORE_SECS: u64 = 60;
/// `exp` this far ahead, under GitHub's limit of 10 minutes with a minute to spare.
pub const EXPIRES_AFTER_SECS: u64 = 9 * 60;

/// The App's RSA private key.
pub struct AppKey(RsaKeyPair);

impl AppKey {
    pub fn read(path: &Path) -> Result<AppKey, HelperError> {
        let pem = std::fs::read(path).map_err(|source| HelperError::Unreadable {
            what: "the App's private key",
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_pem(&pem).map_err(|why| HelperError::KeyInvalid {
            path: path.to_path_buf(),
            why: why.to_string(),
        })
    }

    /// GitHub generates PKCS#1 (`BEGIN RSA PRIVATE KEY`); PKCS#8 (`BEGIN PRIVATE KEY`, what
    /// `openssl` converts it to) works too. The reasons are fixed words: a parser's message
    /// could quote the key.
    fn from_pem(pem: &[u8]) -> Result<AppKey, &'static str> {
        let pair = match PrivateKeyDer::from_pem_slice(pem) {
            Ok(PrivateKeyDer::Pkcs1(key)) => RsaKeyPair::from_der(key.secret_pkcs1_der()),
            Ok(PrivateKeyDer::Pkcs8(key)) => RsaKeyPair::from_pkcs8(key.secret_pkcs8_der()),
            Ok(_) => return Err("an EC key, where GitHub App keys are RSA"),
            Err(_) => return Err("no private key in PEM"),
        };
        pair.map(AppKey)
            .map_err(|_| "not an RSA key of 2048 to 4096 bits")
    }

    /// A JWT for App `issuer`, issued at `now` (seconds since the epoch).
    pub fn jwt(&self, issuer: &str, now: u64) -> Result<String, HelperError> {
        // A numeric App ID as a number, as GitHub's examples send it; a client ID as a string.
        let iss = issuer
            .parse::<u64>()
            .map_or_else(|_| json!(issuer), |id| json!(id));
        let claims = json!({
            "iat": now - ISSUED_BEFORE_SECS,
            "exp": now + EXPIRES_AFTER_SECS,
            "iss": iss,
        });
        let header = json!({"alg": "RS256", "typ": "JWT"});
        let signed = format!("{}.{}", part(&header), part(&claims));
        let mut signature = vec![0; self.0.public().modulus_len()];
        self.0
            .sign(
                &RSA_PKCS1_SHA256,
                &SystemRandom::new(),
                signed.as_bytes(),
                &mut signature,
            )
            .map_err(|e| HelperError::Sign(e.to_string()))?;
        Ok(format!("{signed}.{}", URL_SAFE_NO_PAD.encode(signature)))
    }
}

fn part(value: &serde_json::Value) -> String {
    URL_SAFE_NO_PAD.encode(value.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_not_an_rsa_key_in_pem_is_refused_without_quoting_it() {
        let not_pem = AppKey::from_pem(b"s3cret").err().unwrap();
        assert_eq!(not_pem, "no private key in PEM");
        let garbled = b"-----BEGIN RSA PRIVATE KEY-----\nczNjcmV0\n-----END RSA PRIVATE KEY-----\n";
        let refused = AppKey::from_pem(garbled).err().unwrap();
        assert_eq!(refused, "not an RSA key of 2048 to 4096 bits");
    }
}
