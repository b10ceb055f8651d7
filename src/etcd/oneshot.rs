//! One-shot requests: a request any member may answer, tried on the members in turn
//! within one timeout, each attempt on a fresh connection (flag push and read, the
//! rollout controller's state and lock). Long-lived clients (the session store, the
//! watchers) keep their connections in [`Members`](super::Members) instead.

use std::time::Duration;

use etcd_client::Client;

use super::connect::{Connector, Dial};
use super::{EtcdAccessError, EtcdSecurity};

/// Why a one-shot request got no answer (the request's own refusals aside). The texts
/// are the ones operators see from `flags push` and `rollout`: keep them stable.
#[derive(Debug, thiserror::Error)]
pub(crate) enum OneShotError {
    /// No endpoint was given, or one is malformed; nothing was tried.
    #[error("etcd endpoint {endpoint:?}: {reason}")]
    Endpoint { endpoint: String, reason: String },
    /// The TLS settings, the credentials or the user's permission refused the request
    /// (or a file they name is unreadable); not retried.
    #[error(transparent)]
    Access(#[from] EtcdAccessError),
    /// No member answered within the timeout: a write may or may not have been applied.
    #[error("etcd at [{endpoints}] unavailable: {reason}")]
    Unavailable { endpoints: String, reason: String },
}

impl Connector {
    /// The connector of `security` and `endpoints` as URLs.
    pub(crate) fn with_urls(
        endpoints: &[String],
        security: &EtcdSecurity,
    ) -> Result<(Connector, Vec<String>), OneShotError> {
        let connector = Connector::new(security)?;
        let urls = connector.urls(endpoints).map_err(|e| OneShotError::Endpoint {
            endpoint: e.endpoint,
            reason: e.reason,
        })?;
        Ok((connector, urls))
    }

    /// A connection to the member at `url` (its TLS and user, a leader required), made
    /// within `timeout`.
    pub(crate) async fn connect_within(&self, url: &str, timeout: Duration) -> Result<Client, etcd_client::Error> {
        self.connect(url, &Dial::new(timeout)).await
    }
}

/// Runs `op` against the members in turn until one answers, within `timeout` overall.
/// A transport error moves on to the next member; a refusal of the TLS settings, the
/// credentials or the user's permission is final ([`OneShotError::Access`], saying it
/// happened while `doing`), as is `op`'s own `Err(E)`.
pub(crate) fn with_member<T, E, F, Fut>(
    connector: &Connector,
    urls: &[String],
    timeout: Duration,
    doing: &str,
    mut op: F,
) -> Result<T, E>
where
    E: From<OneShotError>,
    F: FnMut(Client) -> Fut,
    Fut: std::future::Future<Output = Result<Result<T, E>, etcd_client::Error>>,
{
    let unavailable = |reason: String| {
        E::from(OneShotError::Unavailable {
            endpoints: urls.join(", "),
            reason,
        })
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| unavailable(format!("cannot start a runtime: {e}")))?;
    let deadline = tokio::time::Instant::now() + timeout;
    rt.block_on(async {
        let mut last = String::from("no attempt");
        let mut i = 0usize;
        while tokio::time::Instant::now() < deadline {
            let url = &urls[i % urls.len()];
            i += 1;
            let attempt = tokio::time::timeout_at(deadline, async {
                let client = connector.connect_within(url, timeout).await?;
                op(client).await
            })
            .await;
            match attempt {
                Ok(Ok(result)) => return result,
                Ok(Err(e)) => match connector.access_failure(&e, url) {
                    Some(denied) => return Err(E::from(OneShotError::Access(denied.doing(doing)))),
                    None => last = format!("{url}: {e}"),
                },
                Err(_) => last = format!("{url}: no answer within {timeout:?}"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(unavailable(last))
    })
}
