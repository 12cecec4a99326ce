//! Identities from the SPIFFE Workload API, as SPIRE's agent hands them out: the pod's
//! X.509-SVID and its trust domain's bundle, streamed (`FetchX509SVID`) and put in force as
//! each update arrives. An update is checked exactly like a reload from files (a chain with
//! one SPIFFE ID, a key that matches it, a bundle for its trust domain); a bad one is
//! counted and logged and the identity in force keeps serving. When the stream ends or
//! breaks (the SPIRE agent restarts) the agent reconnects with backoff, still serving the
//! last good identity. The `spiffe` crate is the client.
//!
//! Federated bundles in an update are not trusted: the agent's verifier holds one trust
//! domain's anchors, and a federated CA must not be able to issue this domain's IDs.

use std::{path::Path, sync::Arc, time::Duration};

use futures_util::{Stream, StreamExt};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, TrustAnchor};
use spiffe::{WorkloadApiClient, X509Context};
use tracing::{info, warn};

use super::{Identity, IdentityError, IdentitySource, IdentityStore, SpiffeId};
use crate::types::PodName;

/// A pod's Workload API: where its socket is, and which SVID to take when it hands out
/// several.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct WorkloadApi {
    /// `unix:///run/spire/agent.sock` (or `unix:/path`, `tcp://host:port`).
    pub endpoint: String,
    /// The SVID with this ID; the API's default (its first) when unset.
    pub spiffe_id: Option<SpiffeId>,
}

/// The stream of updates, as the client gives it.
type Updates =
    std::pin::Pin<Box<dyn Stream<Item = Result<X509Context, spiffe::WorkloadApiError>> + Send>>;

/// How long enrolment waits for the first SVID.
pub const FIRST_SVID_WITHIN: Duration = Duration::from_secs(15);
/// The longest wait between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

impl WorkloadApi {
    fn error(&self, reason: impl std::fmt::Display) -> IdentityError {
        IdentityError::WorkloadApi {
            endpoint: self.endpoint.clone(),
            reason: reason.to_string(),
        }
    }

    /// The identity in one update: the SVID asked for, with its own trust domain's bundle.
    pub fn identity_of(&self, ctx: &X509Context) -> Result<Identity, IdentityError> {
        let svid = match &self.spiffe_id {
            None => ctx.default_svid(),
            Some(want) => ctx
                .svids()
                .iter()
                .find(|s| s.spiffe_id().to_string() == want.as_str()),
        };
        let Some(svid) = svid else {
            let offered: Vec<String> = ctx
                .svids()
                .iter()
                .map(|s| s.spiffe_id().to_string())
                .collect();
            return Err(self.error(format!(
                "no SVID {} in the update (it offered: {}); check the pod's registration entry",
                self.spiffe_id.as_ref().map_or("at all", SpiffeId::as_str),
                if offered.is_empty() {
                    "none".to_string()
                } else {
                    offered.join(", ")
                }
            )));
        };
        let td = svid.spiffe_id().trust_domain();
        let bundle = ctx.bundle_set().get(td).ok_or_else(|| {
            self.error(format!(
                "the update carries no bundle for trust domain {td}"
            ))
        })?;
        let anchors: Vec<TrustAnchor<'static>> = bundle
            .authorities()
            .iter()
            .map(|ca| {
                webpki::anchor_from_trusted_cert(&CertificateDer::from(ca.as_bytes()))
                    .map(|a| a.to_owned())
                    .map_err(|e| {
                        self.error(format!("unusable CA certificate in the bundle: {e:?}"))
                    })
            })
            .collect::<Result<_, _>>()?;
        if anchors.is_empty() {
            return Err(self.error(format!("the bundle for {td} is empty")));
        }
        let chain: Vec<CertificateDer<'static>> = svid
            .cert_chain()
            .iter()
            .map(|c| CertificateDer::from(c.as_bytes().to_vec()))
            .collect();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
            svid.private_key().as_bytes().to_vec(),
        ));
        // Errors name the endpoint where a file source names its files.
        let origin = Path::new(&self.endpoint);
        let id = Identity::from_parts(chain, key, anchors, origin, origin)?;
        if id.spiffe_id.as_str() != svid.spiffe_id().to_string() {
            return Err(self.error(format!(
                "the SVID is announced as {} but its certificate says {}",
                svid.spiffe_id(),
                id.spiffe_id
            )));
        }
        Ok(id)
    }

    async fn stream(&self) -> Result<Updates, IdentityError> {
        let client = WorkloadApiClient::connect_to(&self.endpoint)
            .await
            .map_err(|e| {
                self.error(format!(
                    "cannot connect: {e} (is the SPIRE agent running, and its socket mounted there?)"
                ))
            })?;
        let updates = client
            .stream_x509_contexts()
            .await
            .map_err(|e| self.error(format!("FetchX509SVID refused: {e}")))?;
        Ok(Box::pin(updates))
    }
}

/// Stops the stream's task when the pod goes.
#[derive(Debug)]
pub struct Feed(tokio::task::JoinHandle<()>);

impl Drop for Feed {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Connects, waits for the pod's first SVID (an enrolment fails if none comes in
/// [`FIRST_SVID_WITHIN`]), and keeps following the stream for as long as the returned
/// feed lives.
pub async fn start(
    pod: PodName,
    api: WorkloadApi,
) -> Result<(Arc<IdentityStore>, Feed), IdentityError> {
    let first = async {
        let mut stream = api.stream().await?;
        loop {
            match stream.next().await {
                Some(Ok(ctx)) => match api.identity_of(&ctx) {
                    Ok(id) => return Ok((id, stream)),
                    Err(e) => {
                        warn!(pod = %pod, error = %e, "first SVID update rejected; waiting for the next")
                    }
                },
                Some(Err(e)) => return Err(api.error(format!("the stream failed: {e}"))),
                None => return Err(api.error("the stream ended before any SVID")),
            }
        }
    };
    let (id, stream) = tokio::time::timeout(FIRST_SVID_WITHIN, first)
        .await
        .map_err(|_| {
            api.error(format!(
                "no SVID within {} s: does the pod have a registration entry?",
                FIRST_SVID_WITHIN.as_secs()
            ))
        })??;
    let store =
        IdentityStore::with_value(pod.clone(), IdentitySource::WorkloadApi(api.clone()), id);
    let weak = Arc::downgrade(&store);
    let task = tokio::spawn(follow(pod, api, weak, stream));
    Ok((store, Feed(task)))
}

/// Puts every update in force; reconnects with backoff when the stream ends.
async fn follow(
    pod: PodName,
    api: WorkloadApi,
    store: std::sync::Weak<IdentityStore>,
    mut stream: Updates,
) {
    let mut backoff = Duration::from_secs(1);
    loop {
        while let Some(update) = stream.next().await {
            let Some(store) = store.upgrade() else {
                return;
            };
            backoff = Duration::from_secs(1);
            let update = update
                .map_err(|e| api.error(format!("bad update: {e}")))
                .and_then(|ctx| api.identity_of(&ctx));
            store.push(update);
        }
        loop {
            warn!(pod = %pod, endpoint = %api.endpoint, retry_in_ms = backoff.as_millis() as u64,
                  "the Workload API stream ended; the current identity keeps serving");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
            match api.stream().await {
                Ok(s) => {
                    info!(pod = %pod, endpoint = %api.endpoint, "Workload API stream reconnected");
                    stream = s;
                    break;
                }
                Err(e) => warn!(pod = %pod, error = %e, "cannot reconnect to the Workload API"),
            }
        }
    }
}
