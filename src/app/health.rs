//! The health service's view of the database: its own probe connection
//! (a pool merely busy at peak load must not read as a database that is
//! down), pinged every 2 s, and the status of the whole server and of each
//! service name kept in step with it: NOT_SERVING while the database is
//! away, SERVING again when it returns, without a restart. Each status is
//! shown on `/metrics` too (`identity_health_serving`).

use std::time::Duration;

use tonic::server::NamedService;
use tonic_health::{ServingStatus, server::HealthReporter};

use crate::error::Error;
use crate::grpc::{
    AccountsGrpc, ApiKeysGrpc, AuthGrpc, ChangesGrpc, EnvoyGrpc, GroupsGrpc, UsersGrpc,
};
use crate::proto::identity::v1 as pb;

/// How often the health service looks at the database.
const HEALTH_INTERVAL: Duration = Duration::from_secs(2);

/// The names the health service answers for, beside "" (the whole server).
fn service_names() -> [&'static str; 7] {
    [
        <pb::api_key_service_server::ApiKeyServiceServer<ApiKeysGrpc> as NamedService>::NAME,
        <pb::change_service_server::ChangeServiceServer<ChangesGrpc> as NamedService>::NAME,
        <envoy_types::ext_authz::v3::pb::AuthorizationServer<EnvoyGrpc> as NamedService>::NAME,
        <pb::account_service_server::AccountServiceServer<AccountsGrpc> as NamedService>::NAME,
        <pb::user_service_server::UserServiceServer<UsersGrpc> as NamedService>::NAME,
        <pb::group_service_server::GroupServiceServer<GroupsGrpc> as NamedService>::NAME,
        <pb::auth_service_server::AuthServiceServer<AuthGrpc> as NamedService>::NAME,
    ]
}

/// The health service's status of every name, and its gauge on `/metrics`,
/// set together.
#[derive(Clone)]
pub(super) struct Health {
    reporter: HealthReporter,
    gauge: prometheus::IntGaugeVec,
}

impl Health {
    pub(super) fn new(reporter: HealthReporter, gauge: prometheus::IntGaugeVec) -> Self {
        Self { reporter, gauge }
    }

    /// Publishes `status` for the whole server ("") and every service name.
    pub(super) async fn set(&self, status: ServingStatus) {
        // The gauge first: whoever hears the new status from the health
        // service finds it on /metrics already.
        let serving = i64::from(status == ServingStatus::Serving);
        for name in std::iter::once("").chain(service_names()) {
            self.gauge.with_label_values(&[name]).set(serving);
        }
        self.reporter.set_service_status("", status).await;
        for name in service_names() {
            self.reporter.set_service_status(name, status).await;
        }
    }
}

/// Keeps the health status in step with the database: NOT_SERVING while it
/// cannot be reached, SERVING again when it returns, without a restart.
pub(super) async fn watch_database(
    mut prober: Prober,
    health: Health,
    mut last: ServingStatus,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(HEALTH_INTERVAL) => {}
            _ = stopped.changed() => return,
        }
        last = report_database(&mut prober, &health, Some(last)).await;
    }
}

/// The health check's own connection: a pool that is merely busy (every
/// connection in use at peak load) must not read as a database that is down.
pub(super) struct Prober {
    url: String,
    conn: Option<diesel_async::AsyncPgConnection>,
}

impl Prober {
    pub(super) fn new(url: String) -> Self {
        Self { url, conn: None }
    }

    async fn ping(&mut self) -> Result<(), Error> {
        use diesel_async::SimpleAsyncConnection;
        const PATIENCE: Duration = Duration::from_secs(2);
        let unavailable = |e: Box<dyn std::error::Error + Send + Sync>| Error::Unavailable(e);
        if self.conn.is_none() {
            let conn = tokio::time::timeout(PATIENCE, crate::db::connect::establish(&self.url))
                .await
                .map_err(|e| unavailable(Box::new(e)))?
                .map_err(|e| unavailable(Box::new(e)))?;
            self.conn = Some(conn);
        }
        let conn = self
            .conn
            .as_mut()
            .ok_or_else(|| Error::internal("no probe connection"))?;
        let result = tokio::time::timeout(PATIENCE, conn.batch_execute("SELECT 1")).await;
        match result {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                self.conn = None;
                Err(unavailable(Box::new(e)))
            }
            Err(e) => {
                self.conn = None;
                Err(unavailable(Box::new(e)))
            }
        }
    }
}

/// Pings the database and publishes the result when it changed from `last`.
pub(super) async fn report_database(
    prober: &mut Prober,
    health: &Health,
    last: Option<ServingStatus>,
) -> ServingStatus {
    let status = match prober.ping().await {
        Ok(()) => ServingStatus::Serving,
        Err(e) => {
            if last != Some(ServingStatus::NotServing) {
                tracing::warn!(error = %e, "database unreachable: health is NOT_SERVING");
            }
            ServingStatus::NotServing
        }
    };
    if last != Some(status) {
        if last.is_some() && status == ServingStatus::Serving {
            tracing::info!("database reachable again: health is SERVING");
        }
        health.set(status).await;
    }
    status
}
