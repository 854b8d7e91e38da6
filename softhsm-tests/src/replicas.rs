//! Replicas of custodyd for tests: several processes on one etcd cluster
//! ([`crate::etcd::Cluster`]) and one token, each with its own port, data
//! directory and `[store] replica_id` (`r0`, `r1`, ...).

use std::path::PathBuf;

use crate::TestToken;
use crate::etcd::Cluster;
use crate::process::{Daemon, Pki, free_port, prepare, ready, spawn};

/// Replicas on one cluster and one token: their ports and processes.
pub struct Replicas {
    /// The PKI every replica's certificates come from.
    pub pki: Pki,
    /// Each replica's gRPC port.
    pub ports: Vec<u16>,
    /// Killed when dropped.
    pub daemons: Vec<Daemon>,
    /// Each replica's config.
    pub configs: Vec<PathBuf>,
    /// The config every replica's is made from (no `[store]` section).
    pub base: PathBuf,
}

/// `count` replicas of `custodyd` on `cluster` and `token`, each ready.
pub async fn start_replicas(
    custodyd: &str,
    token: &TestToken,
    cluster: &Cluster,
    count: usize,
) -> Replicas {
    let first_port = free_port();
    let (pki, first) = prepare(token, first_port);
    start_replicas_from(custodyd, cluster, count, pki, first, first_port).await
}

/// Replicas whose first config (PKI, officers) is made already, each
/// ready.
pub async fn start_replicas_from(
    custodyd: &str,
    cluster: &Cluster,
    count: usize,
    pki: Pki,
    first: PathBuf,
    first_port: u16,
) -> Replicas {
    let mut ports = Vec::new();
    let mut configs = Vec::new();
    for i in 0..count {
        let port = if i == 0 { first_port } else { free_port() };
        let id = format!("r{i}");
        configs.push(crate::process::replica_config(
            &first,
            port,
            &id,
            &cluster.store_section(&id, None),
        ));
        ports.push(port);
    }
    let mut daemons = Vec::new();
    for (config, port) in configs.iter().zip(&ports) {
        let mut daemon = spawn(custodyd, config);
        ready(&pki, *port, &mut daemon).await;
        daemons.push(daemon);
    }
    Replicas {
        pki,
        ports,
        daemons,
        configs,
        base: first,
    }
}
