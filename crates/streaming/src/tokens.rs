//! Single-use, expiring tokens that stand for a validated request between the
//! CRI call that returned the URL and the client's connection to it.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use base64::Engine;
use tokio::time::Instant;

use crate::{AttachRequest, ExecRequest, PortForwardRequest};

/// Kubelet caps its request cache at 1000 entries too: enough for any real
/// burst of exec calls, small enough that a runaway caller cannot grow memory.
pub(crate) const MAX_PENDING: usize = 1000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Pending {
    Exec(ExecRequest),
    Attach(AttachRequest),
    PortForward(PortForwardRequest),
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum TokenError {
    #[error("too many pending streaming requests ({MAX_PENDING})")]
    Full,
    #[error("cannot generate a random token: {0}")]
    Random(String),
}

pub(crate) struct TokenCache {
    ttl: Duration,
    entries: Mutex<HashMap<String, (Instant, Pending)>>,
}

impl TokenCache {
    pub(crate) fn new(ttl: Duration) -> Self {
        TokenCache {
            ttl,
            entries: Mutex::new(HashMap::new()),
        }
    }

    pub(crate) fn insert(&self, pending: Pending) -> Result<String, TokenError> {
        // 256 bits: unguessable, and base64url keeps it a single path segment.
        let mut raw = [0u8; 32];
        getrandom::getrandom(&mut raw).map_err(|e| TokenError::Random(e.to_string()))?;
        let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw);
        let now = Instant::now();
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries.retain(|_, (expiry, _)| *expiry > now);
        if entries.len() >= MAX_PENDING {
            return Err(TokenError::Full);
        }
        entries.insert(token.clone(), (now + self.ttl, pending));
        Ok(token)
    }

    /// Removes and returns the request; `None` for unknown, used or expired
    /// tokens alike, so a client learns nothing from the difference.
    pub(crate) fn take(&self, token: &str) -> Option<Pending> {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let (expiry, pending) = entries.remove(token)?;
        (expiry > Instant::now()).then_some(pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pf() -> Pending {
        Pending::PortForward(PortForwardRequest {
            pod_sandbox_id: "p".into(),
            ports: vec![],
        })
    }

    #[test]
    fn single_use() {
        let cache = TokenCache::new(Duration::from_secs(60));
        let t = cache.insert(pf()).unwrap();
        assert!(t.len() >= 22 && !t.contains('/') && !t.contains('+'));
        assert_eq!(cache.take(&t), Some(pf()));
        assert_eq!(cache.take(&t), None);
        assert_eq!(cache.take("nope"), None);
    }

    #[test]
    fn expires() {
        let cache = TokenCache::new(Duration::from_millis(10));
        let t = cache.insert(pf()).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(cache.take(&t), None);
    }

    #[test]
    fn bounded() {
        let cache = TokenCache::new(Duration::from_secs(60));
        for _ in 0..MAX_PENDING {
            cache.insert(pf()).unwrap();
        }
        assert!(matches!(cache.insert(pf()), Err(TokenError::Full)));
    }
}
