//! The route table: where each vmid's code-server listens. The only source of proxy targets —
//! nothing in a request ever names an address.
//!
//! Each route carries a watch channel, so a connection proxied to it (a WebSocket can stay open
//! for hours) can wait for the route to go away or move, and close then.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::RwLock;

use futures::future::BoxFuture;
use futures::FutureExt;
use tokio::sync::watch;

use crate::types::Vmid;

#[derive(Debug, Default)]
pub struct RouteTable {
    routes: RwLock<HashMap<Vmid, watch::Sender<SocketAddr>>>,
}

impl RouteTable {
    /// Routes `vmid` to `target`; true if that changed anything. Moving a route ends the
    /// connections made to the old address.
    pub fn register(&self, vmid: Vmid, target: SocketAddr) -> bool {
        // The API re-registers on every request; the common case only reads.
        if self.resolve(vmid) == Some(target) {
            return false;
        }
        let mut routes = self.routes.write().expect("route table lock");
        match routes.get(&vmid) {
            Some(tx) => tx.send_if_modified(|current| {
                let changed = *current != target;
                *current = target;
                changed
            }),
            None => {
                routes.insert(vmid, watch::channel(target).0);
                true
            }
        }
    }

    /// Removes `vmid`'s route; true if there was one. Its connections are told to close.
    pub fn unregister(&self, vmid: Vmid) -> bool {
        // Dropping the sender is the notification.
        self.routes.write().expect("route table lock").remove(&vmid).is_some()
    }

    pub fn resolve(&self, vmid: Vmid) -> Option<SocketAddr> {
        self.routes.read().expect("route table lock").get(&vmid).map(|tx| *tx.borrow())
    }

    /// Resolves once `vmid` no longer routes to `target` (at once if it does not now).
    pub fn closed(&self, vmid: Vmid, target: SocketAddr) -> BoxFuture<'static, ()> {
        let rx = self.routes.read().expect("route table lock").get(&vmid).map(|tx| tx.subscribe());
        async move {
            if let Some(mut rx) = rx {
                // Err means the route was removed: closed as well.
                let _ = rx.wait_for(|current| *current != target).await;
            }
        }
        .boxed()
    }

    pub fn len(&self) -> usize {
        self.routes.read().expect("route table lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    async fn settles(f: BoxFuture<'static, ()>) -> bool {
        tokio::time::timeout(Duration::from_secs(5), f).await.is_ok()
    }

    #[tokio::test(start_paused = true)]
    async fn removing_or_moving_a_route_closes_its_watchers_and_nothing_else() {
        let table = RouteTable::default();
        assert!(table.register(Vmid(1), addr(6000)));
        assert!(!table.register(Vmid(1), addr(6000)), "same target: no change");
        assert!(table.register(Vmid(2), addr(6001)));
        assert_eq!(table.resolve(Vmid(1)), Some(addr(6000)));
        assert_eq!(table.resolve(Vmid(3)), None);

        let one = table.closed(Vmid(1), addr(6000));
        let two = table.closed(Vmid(2), addr(6001));
        let two_again = table.closed(Vmid(2), addr(6001));
        assert!(table.unregister(Vmid(1)));
        assert!(!table.unregister(Vmid(1)));
        assert!(settles(one).await, "removed route closes");
        assert!(!settles(two).await, "other routes stay open");

        assert!(table.register(Vmid(2), addr(6002)));
        assert!(settles(two_again).await, "a moved route closes connections to the old address");
        assert!(!settles(table.closed(Vmid(2), addr(6002))).await);
        assert!(settles(table.closed(Vmid(9), addr(6000))).await, "no route: closed at once");
        assert_eq!(table.len(), 1);
    }
}
