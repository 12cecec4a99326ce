//! The live address set of a pod's network namespace, from rtnetlink.
//!
//! A netlink socket created inside the namespace (it stays bound to it for life) is
//! subscribed to IPv4 and IPv6 address events. Every event is only a trigger: the whole
//! set is then dumped again and compared, so the order in which events and dump replies
//! interleave can never leave a stale address behind. The subscription is made before the
//! first dump, so no change between enrolment and the watch is missed.

use std::{collections::BTreeSet, net::IpAddr};

use futures_util::{StreamExt, TryStreamExt};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::MulticastGroup;

use super::{Netns, NetnsError};

/// Every non-loopback address of the namespace, v4 and v6, any scope.
pub type Addresses = BTreeSet<IpAddr>;

pub struct AddressWatch {
    handle: rtnetlink::Handle,
    /// Unsolicited messages (the address events), reduced to "something changed".
    events: futures_util::stream::BoxStream<'static, ()>,
    connection: tokio::task::JoinHandle<()>,
    path: std::path::PathBuf,
}

impl Netns {
    /// Subscribes to the namespace's address changes. Must run inside a tokio runtime.
    pub fn watch_addresses(&self) -> Result<AddressWatch, NetnsError> {
        let err = |source| NetnsError::Netlink {
            path: self.path.clone(),
            source,
        };
        let (connection, handle, events) = self
            .run(|| {
                rtnetlink::new_multicast_connection(&[
                    MulticastGroup::Ipv4Ifaddr,
                    MulticastGroup::Ipv6Ifaddr,
                ])
            })?
            .map_err(err)?;
        Ok(AddressWatch {
            handle,
            events: events.map(|_| ()).boxed(),
            connection: tokio::spawn(connection),
            path: self.path.clone(),
        })
    }
}

impl AddressWatch {
    /// The addresses the namespace has now.
    pub async fn current(&self) -> Result<Addresses, NetnsError> {
        dump(self.handle.clone(), self.path.clone()).await
    }

    /// Waits for the next change (several quick ones count as one) and returns the
    /// addresses after it; `None` once the netlink connection is gone.
    pub async fn changed(&mut self) -> Option<Result<Addresses, NetnsError>> {
        self.events.next().await?;
        // Coalesce a burst (an interface going up adds several addresses at once).
        while let Some(Some(())) = futures_util::FutureExt::now_or_never(self.events.next()) {}
        Some(dump(self.handle.clone(), self.path.clone()).await)
    }
}

/// One RTM_GETADDR dump. Owns what it uses, so the watch itself is not borrowed across
/// the await (its event stream is `Send` but not `Sync`).
async fn dump(
    handle: rtnetlink::Handle,
    path: std::path::PathBuf,
) -> Result<Addresses, NetnsError> {
    let messages: Vec<AddressMessage> = handle
        .address()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(|e| NetnsError::Netlink {
            path,
            source: std::io::Error::other(e.to_string()),
        })?;
    Ok(messages.iter().filter_map(address_of).collect())
}

impl Drop for AddressWatch {
    fn drop(&mut self) {
        // The connection task owns the socket (and so a reference on the namespace).
        self.connection.abort();
    }
}

/// The address an RTM_NEWADDR message is about: IFA_LOCAL where present (IPv4, and
/// point-to-point links, where IFA_ADDRESS is the peer), else IFA_ADDRESS.
fn address_of(m: &AddressMessage) -> Option<IpAddr> {
    let mut address = None;
    for a in &m.attributes {
        match a {
            AddressAttribute::Local(ip) => return keep(*ip),
            AddressAttribute::Address(ip) => address = Some(*ip),
            _ => {}
        }
    }
    keep(address?)
}

fn keep(ip: IpAddr) -> Option<IpAddr> {
    let ip = ip.to_canonical();
    (!ip.is_loopback()).then_some(ip)
}
