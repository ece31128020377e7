//! `GET /metrics`: scraped while calls are made; the metrics that alerts
//! read (health, key reloads, the signing key's age, the process's CPU);
//! and every metric docs/alerts.yml names is one the server serves.

use std::time::Duration;

use crate::auth::http1_get;
use crate::changes::{open_watch, read_changes};
use crate::helpers::{TempDir, TestDb, TestUser, spawn_app, spawn_app_with};
use identity::proto::identity::v1 as pb;

/// The body of `GET /metrics` now.
pub(crate) async fn scrape(addr: std::net::SocketAddr) -> String {
    tokio::task::spawn_blocking(move || http1_get(addr, "/metrics").2)
        .await
        .unwrap()
}

/// The value of the sample `name{labels}` in a Prometheus text exposition.
pub(crate) fn sample(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name_and_labels) && l[name_and_labels.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_calls_by_method_and_code_and_show_pool_hashing_and_process() {
    let app = spawn_app().await;
    app.create_user("counted1").await;
    app.create_user("counted2").await;
    let bad = pb::CreateUserRequest {
        username: "x".into(),
        ..TestUser::named("x").request()
    };
    app.users.clone().create_user(bad).await.unwrap_err();
    app.anon
        .users
        .clone()
        .list_users(pb::ListUsersRequest::default())
        .await
        .unwrap_err();

    let addr = app.addr;
    let (status, headers, body) = tokio::task::spawn_blocking(move || http1_get(addr, "/metrics"))
        .await
        .unwrap();
    assert!(status.contains("200"), "{status}");
    assert!(headers.contains("text/plain"));

    let create = r#"identity_grpc_requests_total{code="Ok",method="CreateUser",service="identity.v1.UserService"}"#;
    let invalid = r#"identity_grpc_requests_total{code="InvalidArgument",method="CreateUser",service="identity.v1.UserService"}"#;
    let refused = r#"identity_grpc_requests_total{code="Unauthenticated",method="ListUsers",service="identity.v1.UserService"}"#;
    assert_eq!(sample(&body, create), Some(2.0), "{body}");
    assert_eq!(sample(&body, invalid), Some(1.0));
    assert_eq!(sample(&body, refused), Some(1.0));
    // Root's login during set-up.
    let login = r#"identity_grpc_requests_total{code="Ok",method="Login",service="identity.v1.AuthService"}"#;
    assert_eq!(sample(&body, login), Some(1.0));
    let latency = r#"identity_grpc_request_duration_seconds_count{method="CreateUser",service="identity.v1.UserService"}"#;
    assert_eq!(sample(&body, latency), Some(3.0));
    for gauge in [
        r#"identity_db_pool_connections{state="in_use"}"#,
        r#"identity_db_pool_connections{state="idle"}"#,
        r#"identity_db_pool_connections{state="waiting"}"#,
        "identity_hash_queue_depth",
        "identity_grpc_open_streams",
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
    ] {
        assert!(sample(&body, gauge).is_some(), "{gauge} missing");
    }
    assert!(sample(&body, r#"identity_db_pool_connections{state="idle"}"#).unwrap() >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_change_feed_counts_its_streams_and_deliveries_with_their_delay() {
    let app = spawn_app().await;
    let mut stream = open_watch(&app.admin, "", &[]).await.unwrap();
    let user = app.create_user("watched").await;
    let (delivered, _) = read_changes(&mut stream, 1).await;
    let delivered = &delivered[0];
    assert_eq!(delivered.user_id, user.id);

    let addr = app.addr;
    let body = tokio::task::spawn_blocking(move || http1_get(addr, "/metrics").2)
        .await
        .unwrap();
    assert_eq!(
        sample(&body, "identity_change_streams"),
        Some(1.0),
        "{body}"
    );
    assert_eq!(
        sample(
            &body,
            r#"identity_changes_delivered_total{kind="user_created"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(&body, "identity_change_delivery_seconds_count"),
        Some(1.0)
    );
    assert!(sample(&body, "identity_changes_written_total").is_some_and(|n| n >= 1.0));
    assert!(sample(&body, "identity_change_stream_lag_seconds").is_some());

    drop(stream);
    // The stream's end is counted once the server notices it: scrape until.
    let closed = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        loop {
            let body = tokio::task::spawn_blocking(move || http1_get(addr, "/metrics").2)
                .await
                .unwrap();
            if sample(&body, "identity_change_streams") == Some(0.0) {
                return;
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert!(closed.is_ok(), "the closed stream is still counted");
    // A call the client abandoned is counted, as Cancelled (its status is
    // recorded before the stream's gauge goes down).
    let body = tokio::task::spawn_blocking(move || http1_get(addr, "/metrics").2)
        .await
        .unwrap();
    let cancelled = r#"identity_grpc_requests_total{code="Cancelled",method="WatchChanges",service="identity.v1.ChangeService"}"#;
    assert_eq!(sample(&body, cancelled), Some(1.0), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_cpu_seconds_is_a_counter_with_a_fraction_of_a_second() {
    let app = spawn_app().await;
    let mut readings = Vec::new();
    for round in 0..3 {
        // Work: password hashing, on this process's threads.
        app.create_user(&format!("busy{round}")).await;
        let body = scrape(app.addr).await;
        assert!(
            body.lines()
                .any(|l| l == "# TYPE process_cpu_seconds_total counter"),
            "{body}"
        );
        readings.push(sample(&body, "process_cpu_seconds_total").expect("a float"));
    }
    assert!(readings[0] > 0.0);
    assert!(
        readings.windows(2).all(|w| w[0] <= w[1]),
        "never goes back: {readings:?}"
    );
    // Microseconds, not whole seconds: three readings all on a whole
    // second would be a one-in-10^18 chance.
    assert!(
        readings.iter().any(|r| r.fract() != 0.0),
        "fractional: {readings:?}"
    );
}

/// A health Watch of `service`, read until it reports `status`.
async fn wait_for_health(
    channel: &tonic::transport::Channel,
    status: tonic_health::pb::health_check_response::ServingStatus,
) {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let mut watch = HealthClient::new(channel.clone())
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let heard = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(message) = watch.message().await.unwrap() {
            if message.status == status as i32 {
                return;
            }
        }
        panic!("the watch ended");
    })
    .await;
    assert!(heard.is_ok(), "no {status:?} within 30 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_health_gauge_follows_the_health_service() {
    use tonic_health::pb::health_check_response::ServingStatus;
    let app = spawn_app().await;
    let whole = r#"identity_health_serving{service=""}"#;
    let auth = r#"identity_health_serving{service="identity.v1.AuthService"}"#;
    let body = scrape(app.addr).await;
    assert_eq!(sample(&body, whole), Some(1.0), "{body}");
    assert_eq!(sample(&body, auth), Some(1.0));
    assert!(body.contains("# TYPE identity_health_serving gauge"));

    // The database goes away: NOT_SERVING, and 0 on /metrics.
    let name = &app.db.name;
    app.db
        .admin(&format!(
            "ALTER DATABASE {name} ALLOW_CONNECTIONS false; \
             SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"
        ))
        .await;
    wait_for_health(&app.channel, ServingStatus::NotServing).await;
    let body = scrape(app.addr).await;
    assert_eq!(sample(&body, whole), Some(0.0), "{body}");
    assert_eq!(sample(&body, auth), Some(0.0));

    // And back.
    app.db
        .admin(&format!("ALTER DATABASE {name} ALLOW_CONNECTIONS true"))
        .await;
    wait_for_health(&app.channel, ServingStatus::Serving).await;
    let body = scrape(app.addr).await;
    assert_eq!(sample(&body, whole), Some(1.0), "{body}");
    assert_eq!(sample(&body, auth), Some(1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_reload_that_fails_is_counted() {
    let db = TestDb::migrated().await;
    let dir = TempDir::new("identity-reload-fails");
    let (serve, _channel) = crate::limits::serve_with(&db, &dir, &[]).await;
    let failures = "identity_keys_reload_failures_total";
    assert_eq!(sample(&scrape(serve.addr).await, failures), Some(0.0));

    // A file that is no key, where the reload reads keys.
    std::fs::write(
        dir.0.join("keys/20990101T000000.000000Z-eddsa.pem"),
        "not a key",
    )
    .unwrap();
    let seen = serve.log.len();
    serve.signal(nix::sys::signal::Signal::SIGHUP);
    assert!(
        serve
            .log
            .wait_for(seen, "keys not reloaded", Duration::from_secs(30)),
        "the reload failed"
    );
    let body = scrape(serve.addr).await;
    assert_eq!(sample(&body, failures), Some(1.0), "{body}");
    assert!(body.contains("# TYPE identity_keys_reload_failures_total counter"));
    assert_eq!(serve.terminate(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_signing_key_age_counts_from_the_time_in_its_file_name() {
    use identity::{config::JwtAlgorithm, token::keys::generate};
    let keys = TempDir::new("identity-old-key");
    let made = generate(&keys.0, JwtAlgorithm::EdDsa).unwrap();
    let ten_days_ago = chrono::Utc::now() - chrono::Duration::days(10);
    let stamp = ten_days_ago.format("%Y%m%dT%H%M%S%.6fZ");
    std::fs::rename(&made, keys.0.join(format!("{stamp}-eddsa.pem"))).unwrap();
    let app = spawn_app_with(TestDb::migrated().await, keys, |_| {}).await;

    let body = scrape(app.addr).await;
    let age = sample(&body, "identity_signing_key_age_seconds").expect("the key's age");
    let ten_days = 10.0 * 86_400.0;
    assert!(
        (ten_days..ten_days + 600.0).contains(&age),
        "10 days and the test's few seconds: {age}"
    );
    assert!(body.contains("# TYPE identity_signing_key_age_seconds gauge"));
}

/// The metric names in the `expr:` of every rule of docs/alerts.yml: each
/// expression (one line, or a block of more indented lines after `expr: |`)
/// cut into identifiers, of which those of the service and the process.
fn names_in_alert_expressions(yaml: &str) -> std::collections::BTreeSet<String> {
    let mut exprs = Vec::new();
    let mut lines = yaml.lines().peekable();
    while let Some(line) = lines.next() {
        let Some((indent, rest)) = line.split_once("expr:") else {
            continue;
        };
        if !indent.trim().is_empty() {
            continue;
        }
        let rest = rest.trim();
        if rest.starts_with('|') || rest.starts_with('>') {
            while let Some(next) = lines.peek() {
                let deeper = next.len() - next.trim_start().len() > indent.len();
                if !deeper && !next.trim().is_empty() {
                    break;
                }
                exprs.push(lines.next().unwrap().to_owned());
            }
        } else {
            exprs.push(rest.to_owned());
        }
    }
    let mut names = std::collections::BTreeSet::new();
    for expr in exprs {
        // Label values and matchers are in quotes: not names.
        let outside_quotes: String = expr.split('"').step_by(2).collect::<Vec<_>>().join(" ");
        for word in outside_quotes.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if word.starts_with("identity_") || word.starts_with("process_") {
                names.insert(word.to_owned());
            }
        }
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_alerts_read_is_served() {
    let yaml =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/alerts.yml")).unwrap();
    let names = names_in_alert_expressions(&yaml);
    for expected in [
        "identity_grpc_requests_total",
        "identity_grpc_request_duration_seconds_bucket",
        "identity_health_serving",
        "identity_signing_key_age_seconds",
    ] {
        assert!(
            names.contains(expected),
            "the parser finds {expected}: {names:?}"
        );
    }

    let app = spawn_app().await;
    // Calls, so that the per-call series exist.
    app.create_user("alerted").await;
    let body = scrape(app.addr).await;
    let served: std::collections::BTreeSet<&str> = body
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    let missing: Vec<_> = names
        .iter()
        .filter(|n| !served.contains(n.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "alerts name metrics /metrics lacks: {missing:?}"
    );
}

#[test]
fn alert_expressions_are_read_line_by_line_and_as_blocks() {
    let yaml = r#"
groups:
  - rules:
      - alert: A
        expr: identity_a_total{code="identity_not_a_name"} > 0
        labels:
          severity: warning
      - alert: B
        expr: |
          sum(rate(identity_b_total[5m]))
            / process_c_seconds
        for: 5m
        annotations:
          summary: "identity_d_mentioned is not read"
"#;
    let names: Vec<String> = names_in_alert_expressions(yaml).into_iter().collect();
    assert_eq!(
        names,
        ["identity_a_total", "identity_b_total", "process_c_seconds"]
    );
}

/// A heading's anchor as GitHub makes it: lower case, spaces to `-`, other
/// punctuation but `-` and `_` dropped.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

#[test]
fn every_alert_links_a_runbook_section_that_exists() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/docs");
    let alerts = std::fs::read_to_string(format!("{dir}/alerts.yml")).unwrap();
    let runbooks = std::fs::read_to_string(format!("{dir}/runbooks.md")).unwrap();
    let anchors: std::collections::BTreeSet<String> = runbooks
        .lines()
        .filter_map(|l| l.strip_prefix("## "))
        .map(anchor)
        .collect();
    let alert_count = alerts.matches("- alert: ").count();
    let links: Vec<&str> = alerts
        .lines()
        .filter_map(|l| l.trim().strip_prefix("runbook_url: \"docs/runbooks.md#"))
        .map(|rest| rest.trim_end_matches('"'))
        .collect();
    assert!(alert_count > 0);
    assert_eq!(links.len(), alert_count, "one runbook_url per alert");
    for link in links {
        assert!(
            anchors.contains(link),
            "no section #{link} in runbooks.md: {anchors:?}"
        );
    }
    assert!(anchors.contains("resource_exhausted"));
}
