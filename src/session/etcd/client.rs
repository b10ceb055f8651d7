//! The retrying client: one request on the current member within the request timeout,
//! the classification of its failure, and retries across members until a deadline.

use std::future::Future;
use std::time::{Duration, Instant};

use etcd_client::{KvClient, LeaseClient};

use crate::etcd::{Connector, EtcdAccessError, REJECTED_GRPC_CODES};

use super::super::StoreError;
use super::Inner;

/// The clients of one member (made on its first use, shared by every request to it).
#[derive(Clone)]
pub(super) struct Member {
    pub(super) kv: KvClient,
    pub(super) lease: LeaseClient,
}

/// Why one request failed.
pub(super) enum Failure {
    /// Transport error, timeout, no leader...: may have applied; retry.
    Transient(String),
    /// The lease of a put no longer exists: grant another.
    LeaseNotFound,
    /// etcd says the request exceeds its limit.
    TooLarge(String),
    /// etcd refused the request (bad argument, ...): retrying will not help.
    Rejected(String),
    /// TLS settings, credentials or the user's permission: retrying will not help.
    Access(EtcdAccessError),
}

fn classify(e: etcd_client::Error, connector: &Connector, url: &str) -> Failure {
    if let Some(access) = connector.access_failure(&e, url) {
        return Failure::Access(access);
    }
    match e {
        etcd_client::Error::GRpcStatus(status) => {
            // gRPC status codes (fixed by the gRPC spec).
            const INVALID_ARGUMENT: i32 = 3;
            const NOT_FOUND: i32 = 5;
            const RESOURCE_EXHAUSTED: i32 = 8;
            let msg = status.message().to_string();
            let code = status.code();
            match i32::from(code) {
                NOT_FOUND if msg.contains("lease not found") => Failure::LeaseNotFound,
                // etcd: "request is too large"; gRPC: "received message larger than max".
                INVALID_ARGUMENT | RESOURCE_EXHAUSTED
                    if msg.contains("too large") || msg.contains("larger than max") =>
                {
                    Failure::TooLarge(msg)
                }
                c if REJECTED_GRPC_CODES.contains(&c) => Failure::Rejected(format!("{code:?}: {msg}")),
                _ => Failure::Transient(format!("{code:?}: {msg}")),
            }
        }
        other => Failure::Transient(other.to_string()),
    }
}

impl Inner {
    /// One request on the current member, bounded by the request timeout and `deadline`.
    pub(super) async fn request<R, Fut>(
        &self,
        deadline: Instant,
        f: impl FnOnce(KvClient, LeaseClient) -> Fut,
    ) -> Result<R, Failure>
    where
        Fut: Future<Output = Result<R, etcd_client::Error>>,
    {
        let i = self.members.current();
        let limit = self
            .etcd
            .request_timeout
            .min(deadline.saturating_duration_since(Instant::now()))
            .max(Duration::from_millis(1));
        let url = &self.members.urls()[i];
        // Connecting (on first use of the member) counts against the same limit.
        let attempt = async {
            let m = self.members.client(i).await?;
            f(m.kv, m.lease).await
        };
        let outcome = match tokio::time::timeout(limit, attempt).await {
            Ok(Ok(r)) => return Ok(r),
            Ok(Err(e)) => classify(e, self.members.connector(), url),
            Err(_) => Failure::Transient(format!("no answer within {limit:?}")),
        };
        match outcome {
            Failure::Transient(reason) => {
                self.members.rotate(i);
                Err(Failure::Transient(format!("{url}: {reason}")))
            }
            other => Err(other),
        }
    }

    /// Waits before retrying after the `attempt`-th failure; `false` when `deadline` has passed.
    pub(super) async fn backoff(attempt: u32, deadline: Instant) -> bool {
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        let wait = Duration::from_millis(20u64 << attempt.min(4)).min(deadline - now);
        tokio::time::sleep(wait).await;
        true
    }

    /// A request retried (on other members) until it succeeds or `deadline` passes: for
    /// reads, and for writes that are safe to repeat.
    pub(super) async fn retrying<R, Fut>(
        &self,
        what: &str,
        deadline: Instant,
        f: impl Fn(KvClient, LeaseClient) -> Fut,
    ) -> Result<R, StoreError>
    where
        Fut: Future<Output = Result<R, etcd_client::Error>>,
    {
        let mut attempt = 0;
        loop {
            match self.request(deadline, &f).await {
                Ok(r) => return Ok(r),
                Err(Failure::Transient(reason)) => {
                    attempt += 1;
                    if !Self::backoff(attempt, deadline).await {
                        return Err(self.unavailable(what, format!("gave up after {attempt} attempts: {reason}")));
                    }
                }
                Err(Failure::Rejected(reason) | Failure::TooLarge(reason)) => {
                    return Err(self.unavailable(what, format!("rejected: {reason}")))
                }
                Err(Failure::LeaseNotFound) => return Err(self.unavailable(what, "lease not found")),
                Err(Failure::Access(e)) => return Err(self.denied(what, e)),
            }
        }
    }
}
