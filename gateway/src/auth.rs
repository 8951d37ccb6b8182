//! Webhook authentication: Hana's secret in the URL or a header, Pipedrive's Basic auth. Secrets
//! are compared in constant time and never logged.

use base64::Engine;
use secrecy::{ExposeSecret, SecretString};
use subtle::ConstantTimeEq;

/// Header that may carry the Hana webhook secret instead of `?token=`.
pub const TOKEN_HEADER: &str = "x-leadrelay-token";

/// Compares a presented secret with the expected one without leaking where they differ.
pub(crate) fn secret_matches(presented: &str, expected: &SecretString) -> bool {
    presented
        .as_bytes()
        .ct_eq(expected.expose_secret().as_bytes())
        .into()
}

/// The user and password Pipedrive must send with every webhook.
#[derive(Clone, Debug)]
pub struct BasicCredentials {
    user: String,
    password: SecretString,
}

impl BasicCredentials {
    /// Credentials for `user` with `password`.
    pub fn new(user: String, password: SecretString) -> Self {
        Self { user, password }
    }

    /// Whether an `Authorization` header value carries exactly these credentials.
    pub(crate) fn matches_header(&self, authorization: &str) -> bool {
        let Some(encoded) = authorization
            .strip_prefix("Basic ")
            .or_else(|| authorization.strip_prefix("basic "))
        else {
            return false;
        };
        let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded.trim()) else {
            return false;
        };
        let Ok(decoded) = String::from_utf8(decoded) else {
            return false;
        };
        let Some((user, password)) = decoded.split_once(':') else {
            return false;
        };
        // Both halves are always compared, so timing says nothing about which one differs.
        let user_ok: bool = user.as_bytes().ct_eq(self.user.as_bytes()).into();
        let password_ok = secret_matches(password, &self.password);
        user_ok & password_ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_credentials_match_only_exactly() {
        let credentials =
            BasicCredentials::new("pipedrive".to_owned(), SecretString::from("s3cret"));
        let header = |pair: &str| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(pair)
            )
        };
        assert!(credentials.matches_header(&header("pipedrive:s3cret")));
        assert!(!credentials.matches_header(&header("pipedrive:s3cre")));
        assert!(!credentials.matches_header(&header("pipedriv:s3cret")));
        assert!(!credentials.matches_header("Bearer s3cret"));
        assert!(!credentials.matches_header("Basic !!!"));
    }

    #[test]
    fn secrets_compare_by_value() {
        let expected = SecretString::from("abc123");
        assert!(secret_matches("abc123", &expected));
        assert!(!secret_matches("abc12", &expected));
        assert!(!secret_matches("", &expected));
    }
}
