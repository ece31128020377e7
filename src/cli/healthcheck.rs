//! `identity healthcheck`: asks the local service's gRPC health service and
//! exits 0 when it answers SERVING, 1 otherwise, so that a Dockerfile
//! `HEALTHCHECK` or an exec probe needs no other binary.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use clap::Args;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

#[derive(Debug, Args)]
pub(super) struct HealthcheckArgs {
    /// The service's address; an unspecified IP (0.0.0.0, [::]) means this
    /// host's loopback.
    #[arg(long, env = "LISTEN_ADDR", default_value = "127.0.0.1:50051")]
    addr: SocketAddr,
    /// The service to ask about; empty: the whole server.
    #[arg(long, default_value = "")]
    service: String,
    /// With TLS on the port: the certificate to trust (the server's own,
    /// TLS_CERT, when set; a chain's CA otherwise).
    #[arg(long, env = "TLS_CERT", value_name = "PEM")]
    ca: Option<PathBuf>,
    /// With TLS: the name the certificate must carry.
    #[arg(long, default_value = "localhost")]
    domain: String,
    /// How long to wait for the answer.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

pub(super) async fn healthcheck(args: HealthcheckArgs) -> ExitCode {
    match check(&args).await {
        Ok(ServingStatus::Serving) => ExitCode::SUCCESS,
        Ok(status) => {
            eprintln!("identity: {}", status.as_str_name());
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("identity: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn check(args: &HealthcheckArgs) -> Result<ServingStatus, String> {
    let mut addr = args.addr;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let scheme = if args.ca.is_some() { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))
        .map_err(|e| format!("{addr}: {e}"))?
        .connect_timeout(args.timeout)
        .timeout(args.timeout);
    if let Some(ca) = &args.ca {
        let pem = std::fs::read(ca).map_err(|e| format!("{}: {e}", ca.display()))?;
        endpoint = endpoint
            .tls_config(
                ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(pem))
                    .domain_name(&args.domain),
            )
            .map_err(|e| format!("TLS: {e}"))?;
    }
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| format!("cannot reach {addr}: {e}"))?;
    let answer = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: args.service.clone(),
        })
        .await
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?;
    Ok(answer.into_inner().status())
}
