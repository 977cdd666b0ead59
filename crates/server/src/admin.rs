//! The admin token and the audit trail of admin actions.
//!
//! Admin RPCs (an ANN host's LoadVersion and Rollback) need `authorization: Bearer <token>`.
//! The token must not be empty (an empty token would authorise an empty header), is compared in
//! constant time, and can come from a file so it never appears in `ps`. Every admin action is
//! logged with the peer address, the action and the result (target `tandem::audit`).

use std::path::Path;

use tonic::{Request, Status};

#[derive(Clone)]
pub struct AdminToken {
    token: Vec<u8>,
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(…)")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AdminTokenError {
    #[error("the admin token is empty: give a non-empty --admin-token or --admin-token-file")]
    Empty,
    #[error("the admin token must be printable ASCII (it travels in an HTTP header)")]
    NotHeaderText,
    #[error("{path}: {source}")]
    File {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl AdminToken {
    pub fn new(token: &str) -> Result<Self, AdminTokenError> {
        let t = token.trim();
        if t.is_empty() {
            return Err(AdminTokenError::Empty);
        }
        if !t.bytes().all(|b| (0x21..0x7f).contains(&b)) {
            return Err(AdminTokenError::NotHeaderText);
        }
        Ok(AdminToken {
            token: t.as_bytes().to_vec(),
        })
    }

    /// The token in a file (surrounding whitespace ignored).
    pub fn from_file(path: &Path) -> Result<Self, AdminTokenError> {
        let text = std::fs::read_to_string(path).map_err(|source| AdminTokenError::File {
            path: path.display().to_string(),
            source,
        })?;
        Self::new(&text)
    }

    /// Whether `given` is the token, in time independent of where they differ.
    pub fn matches(&self, given: &[u8]) -> bool {
        let mut diff = (self.token.len() ^ given.len()) as u8;
        for (k, &b) in self.token.iter().enumerate() {
            diff |= b ^ given.get(k).copied().unwrap_or(0);
        }
        diff == 0
    }

    /// Checks a request's bearer token: UNAUTHENTICATED when missing or wrong.
    pub fn check<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let given = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if self.matches(given.as_bytes()) {
            Ok(())
        } else {
            Err(Status::unauthenticated("missing or wrong admin token"))
        }
    }
}

/// The peer address of a request, for the audit log.
pub fn peer<T>(req: &Request<T>) -> String {
    req.remote_addr()
        .map_or_else(|| "unknown".to_string(), |a| a.to_string())
}

/// Logs one admin action and its result.
pub fn audit(peer: &str, action: &str, result: &Result<String, Status>) {
    match result {
        Ok(outcome) => {
            tracing::info!(target: "tandem::audit", %peer, action, outcome = %outcome, "admin action")
        }
        Err(s) => {
            tracing::warn!(target: "tandem::audit", %peer, action, code = ?s.code(), error = %s.message(), "admin action refused or failed")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_or_blank_tokens_are_refused_and_matching_is_exact() {
        assert!(matches!(AdminToken::new(""), Err(AdminTokenError::Empty)));
        assert!(matches!(
            AdminToken::new("  \n"),
            Err(AdminTokenError::Empty)
        ));
        let t = AdminToken::new("s3cret\n").unwrap();
        assert!(t.matches(b"s3cret"));
        assert!(!t.matches(b"s3cre"));
        assert!(!t.matches(b"s3cret!"));
        assert!(!t.matches(b""));
        assert!(!t.matches(b"S3cret"));
    }
}
