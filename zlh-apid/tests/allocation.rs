//! vmid and port allocation under concurrency, on both backends: 100 servers provisioning at once
//! get 100 different vmids and ports.

use std::collections::HashSet;

use zlh_apid::db::testing;
use zlh_apid::servers::alloc::{allocate_port, allocate_vmid, GAME_VMIDS};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hundred_concurrent_allocations_never_share_a_number() {
    for (name, t) in testing::both().await {
        let tasks: Vec<_> = (0..100)
            .map(|i| {
                let db = t.db.clone();
                tokio::spawn(async move {
                    let server = format!("server-{i}");
                    let vmid = allocate_vmid(&db, GAME_VMIDS, &server).await.unwrap();
                    let port = allocate_port(&db, 30000..=39999, &server).await.unwrap();
                    (vmid, port)
                })
            })
            .collect();
        let mut vmids = HashSet::new();
        let mut ports = HashSet::new();
        for t in tasks {
            let (v, p) = t.await.unwrap();
            assert!(GAME_VMIDS.contains(&v));
            assert!(vmids.insert(v), "{name}: vmid {v} handed out twice");
            assert!(ports.insert(p), "{name}: port {p} handed out twice");
        }
        // Racers spread out over free numbers; a later allocation fills the lowest gap.
        let lowest_free = (5000..).find(|v| !vmids.contains(v)).unwrap();
        assert_eq!(allocate_vmid(&t.db, GAME_VMIDS, "late").await.unwrap(), lowest_free, "{name}");
    }
}
