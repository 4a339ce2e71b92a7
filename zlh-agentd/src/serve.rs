//! `zlh-agentd serve`: the daemon. Loads the config, restores what was provisioned (adopting
//! processes that outlived the previous agent), serves HTTP, and on SIGTERM or SIGINT stops
//! accepting, lets requests in flight finish for a bounded time, and exits, leaving the game
//! server running for the next agent unless configured to stop it.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use tokio::signal::unix::{signal, SignalKind};

use zlh_core::net::AdmittingListener;

use crate::agent::Agent;
use crate::config::{AgentConfig, ServeArgs};

/// How long open requests and connections (consoles) may run on after a shutdown signal.
const DRAIN: Duration = Duration::from_secs(10);

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let config = AgentConfig::load(&args, std::env::var("ZLH_AGENT_TOKEN").ok())?;
    if let Some(vmid) = config.vmid {
        zlh_core::logging::set_vmid(vmid);
    }
    // The connection cap is sized by this limit.
    match zlh_core::net::open_files::raise_to_hard_limit() {
        Ok(open_files) => tracing::debug!(open_files, "open files limit"),
        Err(e) => tracing::warn!(error = %e, "could not raise the open files limit"),
    }
    let addr = SocketAddr::new(config.listen, config.port);
    let limits = config.connections.clone();
    let agent = Agent::open(config)?;
    if let Err(e) = agent.resume().await {
        // The agent still serves: /status shows the error and a new /config can repair it.
        tracing::error!(error = format!("{e:#}"), "restoring the provisioned services failed");
    }
    let listener = match zlh_core::container::oci::init::inherited_listener()? {
        // In an OCI container the init holds the port for every agent it starts, so nothing
        // else in the container can take it between two of them.
        Some(held) => tokio::net::TcpListener::from_std(held)?,
        None => tokio::net::TcpListener::bind(addr).await.with_context(|| format!("listening on {addr}"))?,
    };
    tracing::info!(%addr, version = env!("CARGO_PKG_VERSION"), "zlh-agentd listening");

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let app = crate::http::app(agent.clone())?;
    let metrics = agent.metrics.clone();
    let listener = AdmittingListener::new(listener, &limits).on_refused(move |r| metrics.connection_refused(r));
    let server = tokio::spawn(async move {
        crate::http::server::serve(listener, app, &limits, async {
            let _ = stop_rx.await;
        })
        .await
    });
    let which = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    tracing::info!(signal = which, "shutting down: no new connections");
    let _ = stop_tx.send(());
    match tokio::time::timeout(DRAIN, server).await {
        Ok(joined) => joined.context("server task")?.context("serving")?,
        Err(_) => tracing::warn!(?DRAIN, "connections still open after the drain time; closing them"),
    }
    agent.shutdown().await;
    tracing::info!("zlh-agentd stopped");
    Ok(())
}
