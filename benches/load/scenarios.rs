//! The scenarios and the ceilings, each a list of calls for the driver.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Instant,
};

use diesel::sql_types::Text;
use diesel_async::{RunQueryDsl, SimpleAsyncConnection};
use futures::{FutureExt, StreamExt};
use identity::{
    config::Config,
    db::{self, Pool},
    proto::identity::v1::{
        self as pb, auth_service_client::AuthServiceClient, user_service_client::UserServiceClient,
    },
};
use tonic::{
    Request,
    metadata::MetadataValue,
    transport::{Channel, Endpoint},
};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use uuid::Uuid;

use crate::{
    Settings,
    drive::{self, Call, Outcome, Rng, Window, code},
    report::Row,
    seed::{self, Seeded},
    server::{CpuMark, Server},
};

/// A logged-in user: what its tokens name, and the tokens.
#[derive(Clone)]
pub struct Session {
    pub user_id: Uuid,
    pub session_id: Uuid,
    pub access_token: String,
    pub refresh_token: String,
}

/// Everything the scenarios share.
pub struct Bench<'a> {
    pub settings: &'a Settings,
    pub server: &'a Server,
    /// The server's database, for a second replica.
    pub database_url: String,
    /// The server's keys, for a second replica.
    pub keys_dir: PathBuf,
    /// Where a second replica may keep its DATA_DIR.
    pub scratch: PathBuf,
    pub pool: Pool,
    pub hash: String,
    channels: Vec<Channel>,
    hash_threads: usize,
    hash_params: identity::hashing::HashParams,
    issuer: String,
    audience: String,
    jwks: jsonwebtoken::jwk::JwkSet,
    /// The bearer token of a superuser.
    pub admin: MetadataValue<tonic::metadata::Ascii>,
    sessions: Vec<Session>,
    /// VerifyToken alone, for the mixed scenario's comparison.
    pub verify_alone: Option<Outcome>,
    /// The service's settings, as the server reads them.
    pub config: Config,
    /// The database before and after the last seeding, for `capacity`.
    pub seeding: Option<crate::capacity::Seeding>,
    /// What `capacity` found at this size, for the report.
    pub figures: Vec<crate::report::Figure>,
}

/// Fails unless the database holds no users: the bench adds its own.
pub async fn require_empty(pool: &Pool) {
    use diesel::QueryDsl;
    use identity::db::schema::users;
    let mut conn = pool.get().await.expect("a connection to the database");
    let n: i64 = users::table
        .count()
        .get_result(&mut conn)
        .await
        .expect("count users");
    assert!(
        n == 0,
        "the database already holds {n} users: give the bench an empty one"
    );
}

impl<'a> Bench<'a> {
    pub async fn connect(
        settings: &'a Settings,
        config: &Config,
        server: &'a Server,
        (database_url, scratch): (&str, &Path),
        pool: Pool,
        hash: String,
    ) -> Self {
        let url = format!("http://{}", server.addr);
        let mut channels = Vec::new();
        for _ in 0..settings.connections {
            // One Channel is one HTTP/2 connection.
            let channel = Endpoint::from_shared(url.clone())
                .expect("a URL")
                .tcp_nodelay(true)
                .connect()
                .await
                .expect("connect to the server");
            channels.push(channel);
        }
        let jwks = fetch_jwks(server).await;
        Self {
            settings,
            server,
            database_url: database_url.to_owned(),
            keys_dir: scratch.join("keys"),
            scratch: scratch.to_owned(),
            pool,
            hash,
            channels,
            hash_threads: config.hash_concurrency(),
            hash_params: config.hash_params(),
            issuer: config.jwt_issuer.clone(),
            audience: config.jwt_audience.clone(),
            jwks,
            admin: MetadataValue::from_static("Bearer none"),
            sessions: Vec::new(),
            verify_alone: None,
            config: config.clone(),
            seeding: None,
            figures: Vec::new(),
        }
    }

    /// The users logged in through Login.
    pub fn sessions(&self) -> &[Session] {
        &self.sessions
    }

    async fn login_as(&self, username: &str) -> Session {
        let mut client = AuthServiceClient::new(self.channels[0].clone());
        let tokens = client
            .login(pb::LoginRequest {
                login: username.to_owned(),
                password: seed::PASSWORD.to_owned(),
            })
            .await
            .expect("a seeded user logs in")
            .into_inner()
            .tokens
            .expect("tokens");
        let claims = claims_of(&tokens.access_token);
        Session {
            user_id: claims["sub"]
                .as_str()
                .and_then(|s| s.parse().ok())
                .expect("sub"),
            session_id: claims["sid"]
                .as_str()
                .and_then(|s| s.parse().ok())
                .expect("sid"),
            access_token: tokens.access_token,
            refresh_token: tokens.refresh_token,
        }
    }

    /// Logs in `settings.sessions` distinct users picked across all seeded
    /// ones (through Login, so that every token is a real one).
    pub async fn log_in(&mut self, seeded: &Seeded) {
        let started = Instant::now();
        self.admin = format!(
            "Bearer {}",
            self.login_as(&seed::username(0)).await.access_token
        )
        .parse()
        .expect("an ASCII header");
        let n = self.settings.sessions.min(seeded.ids.len() - 1);
        let mut rng = Rng::new(seeded.ids.len() as u64);
        let mut picked = std::collections::BTreeSet::new();
        while picked.len() < n {
            picked.insert(1 + rng.below(seeded.ids.len() - 1));
        }
        let this = &*self;
        let sessions: Vec<Session> = futures::stream::iter(picked)
            .map(|i| async move { this.login_as(&seed::username(i)).await })
            .buffer_unordered(self.hash_threads + 2)
            .collect()
            .await;
        self.sessions = sessions;
        eprintln!(
            "logged in {n} users in {:.1} s",
            started.elapsed().as_secs_f64()
        );
    }

    /// Runs one scenario or ceiling and reports its rows.
    pub async fn run(&mut self, scenario: &str, seeded: &Seeded) -> Vec<Row> {
        let s = self.settings;
        let ids = Arc::new(seeded.ids.clone());
        match scenario {
            "health" => vec![
                self.measure("health", "transport", self.health_calls())
                    .await,
            ],
            "db" => vec![self.measure("db", "database", self.db_calls()).await],
            "verify" => {
                let row = self
                    .measure("verify", "VerifyToken", self.verify_calls(s.in_flight))
                    .await;
                self.verify_alone = Some(row.outcome.clone());
                vec![row]
            }
            "get_user" => {
                let calls = (0..s.in_flight)
                    .map(|w| self.get_user_call(w, ids.clone()))
                    .collect();
                vec![self.measure("get_user", "GetUser", calls).await]
            }
            "get_self" => {
                let calls = (0..s.in_flight).map(|w| self.get_self_call(w)).collect();
                vec![
                    self.measure("get_self", "GetUser as the caller", calls)
                        .await,
                ]
            }
            "envoy" => {
                let calls = (0..s.in_flight).map(|w| self.envoy_call(w)).collect();
                vec![self.measure("envoy", "Envoy Check", calls).await]
            }
            "mesh" => self.mesh().await,
            "mesh_writes" => self.mesh_writes(seeded).await,
            "mesh_rss" => self.mesh_rss(seeded).await,
            "capacity" => self.capacity(seeded).await,
            "access_log" => self.access_log().await,
            "list_users" => {
                let calls = (0..s.in_flight)
                    .map(|w| self.list_users_call(w, ids.len()))
                    .collect();
                vec![self.measure("list_users", "ListUsers query", calls).await]
            }
            "refresh" => vec![
                self.measure("refresh", "Refresh", self.refresh_calls())
                    .await,
            ],
            "login" => {
                let calls = (0..s.in_flight)
                    .map(|w| self.login_call(w, ids.len()))
                    .collect();
                vec![self.measure("login", "Login", calls).await]
            }
            "flood" => self.flood(ids.len()).await,
            "feed" => self.feed(&ids).await,
            "feed_cost" => self.feed_cost(&ids).await,
            "hashing" => vec![self.hashing_ceiling()],
            "jwt" => vec![self.jwt_ceiling()],
            other => unreachable!("unknown scenario {other}"),
        }
    }

    pub fn window(&self) -> Window {
        Window::after(self.settings.warmup(), self.settings.measure())
    }

    /// Drives `calls`, with the CPU and the server's peak memory around
    /// them.
    async fn measure(&self, name: &str, label: &str, calls: Vec<Call>) -> Row {
        self.measure_in(name, label, calls, self.window()).await
    }

    /// As [`Self::measure`], in `window`.
    pub async fn measure_in(
        &self,
        name: &str,
        label: &str,
        calls: Vec<Call>,
        window: Window,
    ) -> Row {
        self.server.reset_peak_rss();
        let mark = CpuMark::now(self.server);
        let outcome = drive::drive(calls, window).await;
        Row::new(name, label, outcome).with_server(self.server, &mark)
    }

    pub fn channel(&self, worker: usize) -> Channel {
        self.channels[worker % self.channels.len()].clone()
    }

    fn health_calls(&self) -> Vec<Call> {
        (0..self.settings.in_flight)
            .map(|w| {
                let client = HealthClient::new(self.channel(w));
                Box::new(move || {
                    let mut client = client.clone();
                    async move {
                        let r = client
                            .check(HealthCheckRequest {
                                service: String::new(),
                            })
                            .await
                            .map_err(code)?;
                        if r.into_inner().status == ServingStatus::Serving as i32 {
                            Ok(())
                        } else {
                            Err("NOT_SERVING".into())
                        }
                    }
                    .boxed()
                }) as Call
            })
            .collect()
    }

    /// The ceiling of VerifyToken's database work: the same one-row lookup
    /// (`db::sessions::fresh`), through a pool of the service's size, at the
    /// same concurrency; no gRPC, no JWT.
    fn db_calls(&self) -> Vec<Call> {
        let sessions = Arc::new(self.sessions.clone());
        (0..self.settings.in_flight)
            .map(|w| {
                let pool = self.pool.clone();
                let sessions = sessions.clone();
                let mut rng = Rng::new(1000 + w as u64);
                Box::new(move || {
                    let pool = pool.clone();
                    let s = &sessions[rng.below(sessions.len())];
                    let (user, session) = (s.user_id, s.session_id);
                    async move {
                        let mut conn = pool.get().await.map_err(|e| e.to_string())?;
                        let fresh = db::sessions::fresh(&mut conn, user, session, true)
                            .await
                            .map_err(|e| e.to_string())?;
                        match fresh {
                            Some(f) if f.session_live => Ok(()),
                            _ => Err("SESSION_NOT_FOUND".into()),
                        }
                    }
                    .boxed()
                }) as Call
            })
            .collect()
    }

    fn verify_calls(&self, n: usize) -> Vec<Call> {
        let sessions = Arc::new(self.sessions.clone());
        (0..n)
            .map(|w| {
                let client = AuthServiceClient::new(self.channel(w));
                let sessions = sessions.clone();
                let mut rng = Rng::new(2000 + w as u64);
                Box::new(move || {
                    let mut client = client.clone();
                    let s = &sessions[rng.below(sessions.len())];
                    let (token, user) = (s.access_token.clone(), s.user_id);
                    async move {
                        let r = client
                            .verify_token(pb::VerifyTokenRequest {
                                access_token: token,
                            })
                            .await
                            .map_err(code)?
                            .into_inner();
                        match r.user {
                            Some(u) if u.id == user.to_string() => Ok(()),
                            _ => Err("WRONG_USER".into()),
                        }
                    }
                    .boxed()
                }) as Call
            })
            .collect()
    }

    fn get_user_call(&self, w: usize, ids: Arc<Vec<Uuid>>) -> Call {
        let client = UserServiceClient::new(self.channel(w));
        let admin = self.admin.clone();
        let mut rng = Rng::new(3000 + w as u64);
        Box::new(move || {
            let mut client = client.clone();
            let id = ids[rng.below(ids.len())].to_string();
            let mut request = Request::new(pb::GetUserRequest {
                lookup: Some(pb::get_user_request::Lookup::Id(id.clone())),
            });
            request
                .metadata_mut()
                .insert("authorization", admin.clone());
            async move {
                let r = client.get_user(request).await.map_err(code)?.into_inner();
                match r.user {
                    Some(u) if u.id == id => Ok(()),
                    _ => Err("WRONG_USER".into()),
                }
            }
            .boxed()
        })
    }

    /// GetUser of the caller itself, as a random logged-in user.
    fn get_self_call(&self, w: usize) -> Call {
        let client = UserServiceClient::new(self.channel(w));
        let sessions = Arc::new(self.sessions.clone());
        let mut rng = Rng::new(5000 + w as u64);
        Box::new(move || {
            let mut client = client.clone();
            let s = &sessions[rng.below(sessions.len())];
            let id = s.user_id.to_string();
            let mut request = Request::new(pb::GetUserRequest {
                lookup: Some(pb::get_user_request::Lookup::Id(id.clone())),
            });
            let bearer = format!("Bearer {}", s.access_token);
            request
                .metadata_mut()
                .insert("authorization", bearer.parse().expect("an ascii token"));
            async move {
                let r = client.get_user(request).await.map_err(code)?.into_inner();
                match r.user {
                    Some(u) if u.id == id => Ok(()),
                    _ => Err("WRONG_USER".into()),
                }
            }
            .boxed()
        })
    }

    /// Envoy's Check, as a sidecar sends it, for a random logged-in user.
    fn envoy_call(&self, w: usize) -> Call {
        use envoy_types::ext_authz::v3::pb::HttpResponse;
        use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
        let client = AuthorizationClient::new(self.channel(w));
        let sessions = Arc::new(self.sessions.clone());
        let mut rng = Rng::new(6000 + w as u64);
        Box::new(move || {
            let mut client = client.clone();
            let s = &sessions[rng.below(sessions.len())];
            let id = s.user_id.to_string();
            let request = check_request(&s.access_token);
            async move {
                let r = client.check(request).await.map_err(code)?.into_inner();
                let allowed = match &r.http_response {
                    Some(HttpResponse::OkResponse(ok)) => ok.headers.iter().any(|h| {
                        h.header
                            .as_ref()
                            .is_some_and(|h| h.key == "x-identity-user-id" && h.value == id)
                    }),
                    _ => false,
                };
                if allowed {
                    Ok(())
                } else {
                    Err("DENIED".into())
                }
            }
            .boxed()
        })
    }

    fn list_users_call(&self, w: usize, users: usize) -> Call {
        let client = UserServiceClient::new(self.channel(w));
        let admin = self.admin.clone();
        let mut rng = Rng::new(4000 + w as u64);
        Box::new(move || {
            let mut client = client.clone();
            let i = 1 + rng.below(users - 1);
            let mut request = Request::new(pb::ListUsersRequest {
                query: seed::query_for(i),
                ..Default::default()
            });
            request
                .metadata_mut()
                .insert("authorization", admin.clone());
            let expected = seed::username(i);
            async move {
                let r = client.list_users(request).await.map_err(code)?.into_inner();
                if r.users.iter().any(|u| u.username == expected) {
                    Ok(())
                } else {
                    Err("USER_NOT_LISTED".into())
                }
            }
            .boxed()
        })
    }

    /// Each call in flight follows its own session's chain of refresh
    /// tokens (each is single use).
    fn refresh_calls(&self) -> Vec<Call> {
        (0..self.settings.in_flight)
            .map(|w| {
                let client = AuthServiceClient::new(self.channel(w));
                let token = Arc::new(Mutex::new(
                    self.sessions[w % self.sessions.len()].refresh_token.clone(),
                ));
                Box::new(move || {
                    let mut client = client.clone();
                    let token = token.clone();
                    async move {
                        let current = token.lock().expect("unpoisoned").clone();
                        let r = client
                            .refresh(pb::RefreshRequest {
                                refresh_token: current,
                            })
                            .await
                            .map_err(code)?
                            .into_inner();
                        let next = r.tokens.ok_or("NO_TOKENS")?.refresh_token;
                        *token.lock().expect("unpoisoned") = next;
                        Ok(())
                    }
                    .boxed()
                }) as Call
            })
            .collect::<Vec<_>>()
            .into_iter()
            // Two calls in flight on one session would race for its token.
            .take(self.sessions.len())
            .collect()
    }

    fn login_call(&self, w: usize, users: usize) -> Call {
        login_call_on(self.channel(w), w, users)
    }

    /// A login flood (as many calls in flight as the other scenarios)
    /// saturating hashing, with VerifyToken measured beside it.
    async fn flood(&self, users: usize) -> Vec<Row> {
        let n = self.settings.in_flight;
        let logins: Vec<Call> = (0..n).map(|w| self.login_call(n + w, users)).collect();
        let verifies = self.verify_calls(n);
        self.server.reset_peak_rss();
        let mark = CpuMark::now(self.server);
        let window = self.window();
        let (login, verify) =
            tokio::join!(drive::drive(logins, window), drive::drive(verifies, window));
        vec![
            Row::new("flood_verify", "VerifyToken under a login flood", verify)
                .with_server(self.server, &mark),
            Row::new("flood_login", "Login flood", login).with_server(self.server, &mark),
        ]
    }

    /// argon2 verifies per second with the service's parameters on as many
    /// threads as the service may hash on, in this process.
    fn hashing_ceiling(&self) -> Row {
        use identity::hashing::{Memory, verify_phc};
        let memories: Vec<Mutex<Memory>> = (0..self.hash_threads)
            .map(|_| Mutex::new(Memory::new(self.hash_params)))
            .collect();
        let outcome = drive::on_threads(self.hash_threads, self.window(), |t, _| {
            let mut memory = memories[t].lock().expect("unpoisoned");
            match verify_phc(&mut memory, seed::PASSWORD.as_bytes(), &self.hash) {
                Ok(true) => Ok(()),
                Ok(false) => Err("MISMATCH".into()),
                Err(e) => Err(e.to_string()),
            }
        });
        Row::new("hashing", "argon2id verify", outcome)
    }

    /// Offline JWT verification on one core: the key by `kid` from the
    /// JWKS, the algorithm pinned, signature, exp, nbf, iss and aud checked.
    fn jwt_ceiling(&self) -> Row {
        use jsonwebtoken::{DecodingKey, Validation};
        let keys: Vec<(String, DecodingKey, jsonwebtoken::Algorithm)> = self
            .jwks
            .keys
            .iter()
            .map(|jwk| {
                let kid = jwk.common.key_id.clone().expect("a kid");
                let alg = jwk
                    .common
                    .key_algorithm
                    .and_then(|a| jsonwebtoken::Algorithm::try_from(a).ok())
                    .expect("an algorithm");
                (kid, DecodingKey::from_jwk(jwk).expect("a key"), alg)
            })
            .collect();
        let tokens: Vec<&str> = self
            .sessions
            .iter()
            .map(|s| s.access_token.as_str())
            .collect();
        let outcome = drive::on_threads(1, self.window(), |_, n| {
            let token = tokens[n as usize % tokens.len()];
            let header = jsonwebtoken::decode_header(token).map_err(|e| e.to_string())?;
            let kid = header.kid.ok_or("NO_KID")?;
            let (_, key, alg) = keys.iter().find(|k| k.0 == kid).ok_or("UNKNOWN_KID")?;
            let mut validation = Validation::new(*alg);
            validation.set_issuer(&[&self.issuer]);
            validation.set_audience(&[&self.audience]);
            validation.set_required_spec_claims(&["exp", "nbf", "iss", "aud", "sub"]);
            jsonwebtoken::decode::<serde_json::Value>(token, key, &validation)
                .map(|_| ())
                .map_err(|e| e.to_string())
        });
        Row::new("jwt", "JWT verify offline (1 core)", outcome)
    }

    /// EXPLAIN (ANALYZE, BUFFERS) of the query ListUsers runs for a seeded
    /// user's `query` (the page, then the count; as in `db::users::list`).
    pub async fn list_users_plan(&self, seeded: &Seeded) -> Vec<String> {
        #[derive(diesel::QueryableByName)]
        struct Line {
            #[diesel(sql_type = Text)]
            line: String,
        }
        let i = seeded.ids.len() / 2;
        let pattern = identity::domain::text::substring_pattern(&seed::query_for(i));
        let mut conn = self.pool.get().await.expect("a connection");
        conn.batch_execute(
            "CREATE OR REPLACE FUNCTION pg_temp.plan(q text) RETURNS SETOF text \
             LANGUAGE plpgsql AS $$ DECLARE r text; BEGIN \
             FOR r IN EXECUTE 'EXPLAIN (ANALYZE, BUFFERS) ' || q LOOP RETURN NEXT r; END LOOP; \
             END $$",
        )
        .await
        .expect("the plan function");
        let mut out = Vec::new();
        for sql in [
            format!(
                "SELECT id, username, email, first_name, last_name, is_superuser, is_active, \
                 is_verified, attributes, create_time, update_time FROM users \
                 WHERE search LIKE '{pattern}' ORDER BY id LIMIT 51"
            ),
            format!("SELECT count(*) FROM users WHERE search LIKE '{pattern}'"),
        ] {
            let lines: Vec<Line> = diesel::sql_query("SELECT pg_temp.plan($1) AS line")
                .bind::<Text, _>(&sql)
                .load(&mut conn)
                .await
                .expect("a plan");
            out.push(sql);
            out.extend(lines.into_iter().map(|l| format!("  {}", l.line)));
        }
        // The function is temporary; the pooled connection keeps no trace.
        conn.batch_execute("DROP FUNCTION pg_temp.plan(text)")
            .await
            .expect("drop the plan function");
        out
    }
}

/// Login as a random seeded user (each a real argon2id verification),
/// over `channel`.
pub fn login_call_on(channel: Channel, w: usize, users: usize) -> Call {
    let client = AuthServiceClient::new(channel);
    let mut rng = Rng::new(5000 + w as u64);
    Box::new(move || {
        let mut client = client.clone();
        let login = seed::username(1 + rng.below(users - 1));
        async move {
            client
                .login(pb::LoginRequest {
                    login,
                    password: seed::PASSWORD.to_owned(),
                })
                .await
                .map_err(code)?;
            Ok(())
        }
        .boxed()
    })
}

/// Envoy's Check for `GET /orders` with `access_token`, as a sidecar sends
/// it.
pub fn check_request(
    access_token: &str,
) -> envoy_types::pb::envoy::service::auth::v3::CheckRequest {
    use envoy_types::pb::envoy::service::auth::v3::{
        AttributeContext, CheckRequest, attribute_context::HttpRequest,
        attribute_context::Request as Attrs,
    };
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(Attrs {
                http: Some(HttpRequest {
                    method: "GET".into(),
                    path: "/orders".into(),
                    headers: [("authorization".to_owned(), format!("Bearer {access_token}"))]
                        .into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

/// The claims of a token, unverified: only to learn its `sub` and `sid`.
fn claims_of(token: &str) -> serde_json::Value {
    use base64::Engine as _;
    let payload = token.split('.').nth(1).expect("a JWT");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .expect("base64url");
    serde_json::from_slice(&bytes).expect("JSON claims")
}

/// `GET /.well-known/jwks.json`.
async fn fetch_jwks(server: &Server) -> jsonwebtoken::jwk::JwkSet {
    serde_json::from_str(&http_get(server, "/.well-known/jwks.json").await).expect("a JWKS")
}

/// `GET path` over plain HTTP/1.1 on the gRPC port: the body of a 200.
pub async fn http_get(server: &Server, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(server.addr)
        .await
        .expect("connect for an HTTP GET");
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: identity\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .expect("send");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.expect("receive");
    let text = String::from_utf8(response).expect("UTF-8");
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "GET {path}: {head}");
    body.to_owned()
}
