//! Optional TLS and mutual TLS, with certificates made in the test.

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use crate::helpers::{TempDir, TestDb, TestUser, UserServiceClient, test_config};
use identity::app::Application;

struct Pki {
    ca_pem: String,
    server: (String, String),
    client: (String, String),
}

/// A CA, a server certificate for localhost/127.0.0.1, and a client
/// certificate, all signed by the CA.
fn pki() -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf = |names: Vec<String>| {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    };
    Pki {
        ca_pem: ca_cert.pem(),
        server: leaf(vec!["localhost".into(), "127.0.0.1".into()]),
        client: leaf(vec!["a-client".into()]),
    }
}

/// Starts a server with TLS (and mutual TLS when `mutual`); returns its
/// address and what keeps it alive.
async fn tls_app(
    pki: &Pki,
    mutual: bool,
) -> (
    std::net::SocketAddr,
    TempDir,
    TestDb,
    tokio::sync::oneshot::Sender<()>,
) {
    let dir = TempDir::new("identity-tls");
    let write = |name: &str, text: &str| {
        let path = dir.0.join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let db = TestDb::migrated().await;
    let mut config = test_config(&db.url);
    config.keys_dir = dir.0.join("keys");
    config.tls_cert = Some(write("server.pem", &pki.server.0));
    config.tls_key = Some(write("server.key", &pki.server.1));
    if mutual {
        config.tls_client_ca = Some(write("ca.pem", &pki.ca_pem));
    }
    let app = Application::build(&config).await.unwrap();
    let addr = app.local_addr();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(app.run_until_stopped(async {
        let _ = stopped.await;
    }));
    (addr, dir, db, stop)
}

async fn tls_channel(
    addr: std::net::SocketAddr,
    pki: &Pki,
    with_client_cert: bool,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&pki.ca_pem))
        .domain_name("localhost");
    if with_client_cert {
        tls = tls.identity(Identity::from_pem(&pki.client.0, &pki.client.1));
    }
    Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)?
        .connect()
        .await
}

#[tokio::test]
async fn tls_serves_clients_that_trust_the_certificate_and_refuses_plaintext() {
    let pki = pki();
    let (addr, _dir, _db, _stop) = tls_app(&pki, false).await;
    let channel = tls_channel(addr, &pki, false).await.unwrap();
    UserServiceClient::new(channel)
        .create_user(TestUser::named("secure").request())
        .await
        .unwrap();

    let plaintext = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await;
    let refused = match plaintext {
        Err(_) => true,
        Ok(ch) => UserServiceClient::new(ch)
            .create_user(TestUser::named("insecure").request())
            .await
            .is_err(),
    };
    assert!(refused, "plaintext must not get through a TLS listener");
}

#[tokio::test]
async fn mutual_tls_needs_a_client_certificate_from_the_ca() {
    let pki = pki();
    let (addr, _dir, _db, _stop) = tls_app(&pki, true).await;

    let with_cert = tls_channel(addr, &pki, true).await.unwrap();
    UserServiceClient::new(with_cert)
        .create_user(TestUser::named("mutual").request())
        .await
        .unwrap();

    let without = match tls_channel(addr, &pki, false).await {
        Err(_) => true,
        Ok(ch) => UserServiceClient::new(ch)
            .create_user(TestUser::named("anonymous").request())
            .await
            .is_err(),
    };
    assert!(without, "a client without a certificate is refused");
}
