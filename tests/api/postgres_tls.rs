//! TLS to PostgreSQL: a real server started here with `ssl=on` and a
//! certificate made for the test (rcgen), which accepts TCP connections over
//! TLS only (`hostssl`), and a second one without TLS. Each `sslmode` is
//! tried through the `identity` binary (`migrate --status` connects and
//! exits), and one server runs on the TLS database end to end: its pool,
//! health prober and change-feed listener all connect, or the calls below
//! would fail.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, OnceLock};

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use crate::auth::http1_get;
use crate::cli::identity;
use crate::helpers::{TempDir, TestDb, spawn_app_on};
use crate::metrics::sample;
use identity::proto::identity::v1 as pb;

/// A PostgreSQL server on 127.0.0.1 of this test binary.
struct Server {
    port: u16,
    /// The socket folder, for the superuser's set-up connection.
    socket_dir: PathBuf,
    /// The CA that signed the server's certificate (PEM file), when TLS.
    ca: Option<PathBuf>,
    /// A CA that signed nothing here (PEM file).
    other_ca: PathBuf,
    _dir: TempDir,
}

static RUNNING: Mutex<Vec<(PathBuf, PathBuf)>> = Mutex::new(Vec::new());

extern "C" fn stop_servers() {
    for (pg_ctl, pgdata) in RUNNING.lock().map(|v| v.clone()).unwrap_or_default() {
        let _ = as_postgres(&pg_ctl)
            .arg("-D")
            .arg(&pgdata)
            .args(["stop", "-m", "immediate", "-w"])
            .output();
    }
}

fn owner() -> Option<(u32, u32)> {
    nix::unistd::geteuid().is_root().then(|| {
        let user = nix::unistd::User::from_name("postgres")
            .unwrap()
            .expect("a postgres OS user");
        (user.uid.as_raw(), user.gid.as_raw())
    })
}

fn as_postgres(tool: &Path) -> Command {
    let mut cmd = Command::new(tool);
    cmd.current_dir("/").env("LC_ALL", "C").env_remove("PGDATA");
    if let Some((uid, gid)) = owner() {
        use std::os::unix::process::CommandExt;
        cmd.uid(uid).gid(gid);
    }
    cmd
}

fn give(path: &Path) {
    if let Some((uid, gid)) = owner() {
        std::os::unix::fs::chown(path, Some(uid), Some(gid)).unwrap();
    }
}

fn ok(out: Output, what: &str) {
    assert!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A self-signed CA: its PEM and what signs with it.
fn ca(name: &str) -> (String, Issuer<'static, KeyPair>) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), Issuer::new(params, key))
}

impl Server {
    fn start(tls: bool) -> Self {
        let bin = std::env::var_os("PG_BIN_DIR")
            .filter(|d| !d.is_empty())
            .map(PathBuf::from)
            .or_else(identity::db::embedded::find_binaries)
            .expect("PostgreSQL server binaries");
        let dir = TempDir::new("identity-pgtls");
        let pgdata = dir.0.join("pg");
        let socket_dir = dir.0.join("run");
        for d in [&pgdata, &socket_dir] {
            std::fs::create_dir(d).unwrap();
            give(d);
        }
        ok(
            as_postgres(&bin.join("initdb"))
                .arg("-D")
                .arg(&pgdata)
                .args(["-U", "postgres", "-A", "trust", "-E", "UTF8"])
                .args(["--locale=C", "--no-instructions", "--no-sync"])
                .output()
                .unwrap(),
            "initdb",
        );
        // A free port: bound, read, released for the server.
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut conf = format!(
            "listen_addresses = '127.0.0.1'\nport = {port}\n\
             unix_socket_directories = '{}'\nfsync = off\n",
            socket_dir.display()
        );
        let (other_ca_pem, _) = ca("a CA that signed nothing here");
        let other_ca = dir.0.join("other-ca.pem");
        std::fs::write(&other_ca, other_ca_pem).unwrap();
        let mut hba = "local all all trust\n".to_owned();
        let ca_file = if tls {
            let (ca_pem, issuer) = ca("identity test CA");
            let key = KeyPair::generate().unwrap();
            // Made for "localhost" only: 127.0.0.1 is the wrong name.
            let cert = CertificateParams::new(vec!["localhost".to_owned()])
                .unwrap()
                .signed_by(&key, &issuer)
                .unwrap();
            for (name, text) in [
                ("server.crt", cert.pem()),
                ("server.key", key.serialize_pem()),
            ] {
                let path = pgdata.join(name);
                std::fs::write(&path, text).unwrap();
                std::fs::set_permissions(
                    &path,
                    std::os::unix::fs::PermissionsExt::from_mode(0o600),
                )
                .unwrap();
                give(&path);
            }
            conf.push_str("ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n");
            // TCP over TLS only: a plaintext connection is refused.
            hba.push_str("hostssl all all 127.0.0.1/32 trust\n");
            let ca_file = dir.0.join("ca.pem");
            std::fs::write(&ca_file, ca_pem).unwrap();
            Some(ca_file)
        } else {
            hba.push_str("host all all 127.0.0.1/32 trust\n");
            None
        };
        let conf_path = pgdata.join("postgresql.conf");
        let text = std::fs::read_to_string(&conf_path).unwrap();
        std::fs::write(&conf_path, format!("{text}\n{conf}")).unwrap();
        std::fs::write(pgdata.join("pg_hba.conf"), hba).unwrap();
        let pg_ctl = bin.join("pg_ctl");
        ok(
            as_postgres(&pg_ctl)
                .arg("-D")
                .arg(&pgdata)
                .args(["start", "-w", "-t", "60", "-l"])
                .arg(socket_dir.join("postgresql.log"))
                .output()
                .unwrap(),
            "pg_ctl start",
        );
        let mut running = RUNNING.lock().unwrap();
        if running.is_empty() {
            // SAFETY: registers a plain function to run at exit.
            unsafe { libc::atexit(stop_servers) };
        }
        running.push((pg_ctl, pgdata));
        Self {
            port,
            socket_dir,
            ca: ca_file,
            other_ca,
            _dir: dir,
        }
    }

    /// A new database on this server, made over its Unix socket.
    async fn database(&self) -> String {
        use diesel_async::{AsyncConnection, AsyncPgConnection, SimpleAsyncConnection};
        let admin = format!(
            "postgres://postgres@/postgres?host={}&port={}",
            self.socket_dir.display(),
            self.port
        );
        let mut conn = AsyncPgConnection::establish(&admin).await.unwrap();
        let name = format!("tls_{}", uuid::Uuid::now_v7().simple());
        conn.batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        name
    }

    /// A URL to `database` on `host` with `options` (`sslmode=...`).
    fn url(&self, host: &str, database: &str, options: &str) -> String {
        format!(
            "postgres://postgres@{host}:{}/{database}?{options}",
            self.port
        )
    }
}

fn tls_server() -> &'static Server {
    static S: OnceLock<Server> = OnceLock::new();
    S.get_or_init(|| Server::start(true))
}

fn plain_server() -> &'static Server {
    static S: OnceLock<Server> = OnceLock::new();
    S.get_or_init(|| Server::start(false))
}

fn path(p: &Option<PathBuf>) -> String {
    p.as_ref().unwrap().display().to_string()
}

/// `identity migrate --status` against `url`: it connects, reads and exits.
fn migrate_status(url: &str) -> Output {
    identity(&["migrate", "--status"], &[("DATABASE_URL", url)], None)
}

fn connects(url: &str) {
    let out = migrate_status(url);
    assert!(
        out.status.success(),
        "{url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Refused at start: exit 1, one line naming DATABASE_URL and saying why.
fn refused(url: &str, why: &str) {
    let out = migrate_status(url);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{url}: {stderr}");
    // Beside the error log line, the command's own last word.
    let said: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("identity: "))
        .collect();
    assert_eq!(said.len(), 1, "{url}: {stderr}");
    assert!(said[0].contains("DATABASE_URL"), "{url}: {stderr}");
    assert!(said[0].contains(why), "{url}: wanted {why:?} in {stderr}");
    assert!(!said[0].contains("unparseable"), "{url}: {stderr}");
}

#[tokio::test]
async fn each_sslmode_against_a_server_that_requires_tls() {
    let server = tls_server();
    let db = server.database().await;
    let ca = path(&server.ca);
    let other = server.other_ca.display().to_string();
    connects(&server.url(
        "localhost",
        &db,
        &format!("sslmode=verify-full&sslrootcert={ca}"),
    ));
    connects(&server.url(
        "localhost",
        &db,
        &format!("sslmode=verify-ca&sslrootcert={ca}"),
    ));
    // verify-ca checks the CA, not the name.
    connects(&server.url(
        "127.0.0.1",
        &db,
        &format!("sslmode=verify-ca&sslrootcert={ca}"),
    ));
    connects(&server.url("127.0.0.1", &db, "sslmode=require"));
    connects(&server.url("127.0.0.1", &db, "sslmode=prefer"));
    // The default is prefer, as in libpq.
    connects(&server.url("127.0.0.1", &db, ""));
    connects(&server.url("127.0.0.1", &db, "sslmode=allow"));
    // The key=value form too.
    connects(&format!(
        "host=localhost port={} user=postgres dbname={db} sslmode=verify-full sslrootcert='{ca}'",
        server.port
    ));

    // A wrong host name, a wrong CA, and no TLS where the server wants it.
    refused(
        &server.url(
            "127.0.0.1",
            &db,
            &format!("sslmode=verify-full&sslrootcert={ca}"),
        ),
        "certificate",
    );
    refused(
        &server.url(
            "localhost",
            &db,
            &format!("sslmode=verify-full&sslrootcert={other}"),
        ),
        "certificate",
    );
    refused(
        &server.url(
            "localhost",
            &db,
            &format!("sslmode=verify-ca&sslrootcert={other}"),
        ),
        "certificate",
    );
    // require with a root certificate given checks the chain (libpq).
    refused(
        &server.url(
            "127.0.0.1",
            &db,
            &format!("sslmode=require&sslrootcert={other}"),
        ),
        "certificate",
    );
    refused(
        &server.url("127.0.0.1", &db, "sslmode=disable"),
        "no encryption",
    );
}

#[tokio::test]
async fn each_sslmode_against_a_server_without_tls() {
    let server = plain_server();
    let db = server.database().await;
    let other = server.other_ca.display().to_string();
    connects(&server.url("127.0.0.1", &db, "sslmode=disable"));
    connects(&server.url("127.0.0.1", &db, "sslmode=allow"));
    connects(&server.url("127.0.0.1", &db, "sslmode=prefer"));
    connects(&server.url("127.0.0.1", &db, ""));
    refused(&server.url("127.0.0.1", &db, "sslmode=require"), "TLS");
    refused(
        &server.url(
            "localhost",
            &db,
            &format!("sslmode=verify-full&sslrootcert={other}"),
        ),
        "TLS",
    );
}

#[test]
fn bad_tls_options_are_bad_settings() {
    for (url, named) in [
        ("postgres://u:pw@db/x?sslmode=verify_full", "sslmode"),
        (
            "postgres://u:pw@db/x?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem",
            "sslrootcert",
        ),
        (
            "postgres://u:pw@db/x?sslmode=verify-full&sslrootcert=/etc/hostname",
            "sslrootcert",
        ),
        (
            "postgres://u:pw@db/x?sslcert=/c.pem&sslkey=/k.pem",
            "sslcert",
        ),
    ] {
        let out = migrate_status(url);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{url}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{url}: {stderr}");
        assert!(
            stderr.contains("DATABASE_URL") && stderr.contains(named),
            "{url}: {stderr}"
        );
        assert!(!stderr.contains("pw@"), "the password stays out: {stderr}");
    }
}

#[tokio::test]
async fn a_server_runs_on_a_database_it_reaches_with_verify_full() {
    let server = tls_server();
    let db = server.database().await;
    let url = server.url(
        "localhost",
        &db,
        &format!("sslmode=verify-full&sslrootcert={}", path(&server.ca)),
    );
    let out = identity(&["migrate"], &[("DATABASE_URL", &url)], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The shared test cluster's database goes unused: the server is on the
    // TLS one.
    let app = spawn_app_on(TestDb::empty().await, |c| c.database_url = Some(url)).await;
    // The pool: root logged in; a user made and logged in.
    let (user, tokens) = app.signed_in_user("tls-user").await;
    let verified = app
        .anon
        .auth
        .clone()
        .verify_token(pb::VerifyTokenRequest {
            access_token: tokens.access_token.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(verified.user.unwrap().id, user.id);
    // The health prober's own connection.
    let health = HealthClient::new(app.channel.clone())
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(health.status, 1, "SERVING");
    // The change feed's listener: it hears the announcements of the commits
    // above (scraped until it has, or the deadline).
    let addr = app.addr;
    let heard = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        loop {
            let body = tokio::task::spawn_blocking(move || http1_get(addr, "/metrics").2)
                .await
                .unwrap();
            if sample(&body, "identity_changes_written_total").is_some_and(|n| n >= 1.0) {
                return;
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert!(heard.is_ok(), "the listener heard no announcement");
    app.stop().await;
}
