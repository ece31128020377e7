//! The harness: one embedded PostgreSQL cluster for the whole test binary, a
//! migrated template database, and per test its own database and server.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex, OnceLock},
};

use diesel_async::{AsyncConnection, AsyncPgConnection, SimpleAsyncConnection};
use identity::{
    app::Application,
    config::Config,
    db::embedded::{Durability, EmbeddedPostgres},
    proto::identity::v1 as pb,
};
use tokio::sync::oneshot;
use tonic::{Status, transport::Channel};
use uuid::Uuid;

pub use pb::{
    account_service_client::AccountServiceClient, api_key_service_client::ApiKeyServiceClient,
    auth_service_client::AuthServiceClient, change_service_client::ChangeServiceClient,
    group_service_client::GroupServiceClient, user_service_client::UserServiceClient,
};

/// Adds `authorization: Bearer <token>` to every call, when there is one.
#[derive(Clone, Default)]
pub struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl Bearer {
    /// Sends `token`.
    pub fn from_token(token: &str) -> Self {
        Self(Some(
            format!("Bearer {token}").parse().expect("ascii token"),
        ))
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            req.metadata_mut().insert("authorization", value.clone());
        }
        Ok(req)
    }
}

/// A channel that calls as someone (or as nobody).
pub type Authed = tonic::service::interceptor::InterceptedService<Channel, Bearer>;

/// The three clients, calling as one caller.
#[derive(Clone)]
pub struct Clients {
    pub users: UserServiceClient<Authed>,
    pub groups: GroupServiceClient<Authed>,
    pub auth: AuthServiceClient<Authed>,
    pub accounts: AccountServiceClient<Authed>,
    pub changes: ChangeServiceClient<Authed>,
    pub keys: ApiKeyServiceClient<Authed>,
}

impl Clients {
    /// Clients that send `token` (or no token).
    pub fn new(channel: &Channel, token: Option<&str>) -> Self {
        let bearer = Bearer(token.map(|t| format!("Bearer {t}").parse().expect("ascii token")));
        Self {
            users: UserServiceClient::with_interceptor(channel.clone(), bearer.clone()),
            groups: GroupServiceClient::with_interceptor(channel.clone(), bearer.clone()),
            auth: AuthServiceClient::with_interceptor(channel.clone(), bearer.clone()),
            accounts: AccountServiceClient::with_interceptor(channel.clone(), bearer.clone()),
            changes: ChangeServiceClient::with_interceptor(channel.clone(), bearer.clone()),
            keys: ApiKeyServiceClient::with_interceptor(channel.clone(), bearer),
        }
    }

    /// CreateUser: the new user.
    pub async fn create_user(&self, request: pb::CreateUserRequest) -> Result<pb::User, Status> {
        let created = self.users.clone().create_user(request).await?;
        Ok(created.into_inner().user.expect("user in response"))
    }

    /// GetUser: the user found by `lookup`.
    pub async fn get_user(&self, lookup: Lookup<'_>) -> Result<pb::User, Status> {
        let found = self.users.clone().get_user(lookup.request()).await?;
        Ok(found.into_inner().user.expect("user in response"))
    }

    /// UpdateUser of the user `id`: `change` sets the fields named in
    /// `paths` on a `pb::User` that has only the id (the others are not
    /// read). The user as it is now.
    pub async fn update_user(
        &self,
        id: &str,
        paths: &[&str],
        change: impl FnOnce(&mut pb::User),
    ) -> Result<pb::User, Status> {
        let mut user = pb::User {
            id: id.to_owned(),
            ..Default::default()
        };
        change(&mut user);
        let updated = self
            .users
            .clone()
            .update_user(pb::UpdateUserRequest {
                user: Some(user),
                update_mask: mask(paths),
            })
            .await?;
        Ok(updated.into_inner().user.expect("user in response"))
    }

    /// ListUsers: one page.
    pub async fn list_users(
        &self,
        request: pb::ListUsersRequest,
    ) -> Result<pb::ListUsersResponse, Status> {
        let page = self.users.clone().list_users(request).await?;
        Ok(page.into_inner())
    }
}

/// How GetUser finds a user: the `lookup` of its request.
#[derive(Debug, Clone, Copy)]
pub enum Lookup<'a> {
    Id(&'a str),
    Username(&'a str),
    Email(&'a str),
}

impl Lookup<'_> {
    /// The GetUser request.
    pub fn request(self) -> pb::GetUserRequest {
        use pb::get_user_request::Lookup as By;
        let lookup = match self {
            Lookup::Id(id) => By::Id(id.to_owned()),
            Lookup::Username(username) => By::Username(username.to_owned()),
            Lookup::Email(email) => By::Email(email.to_owned()),
        };
        pb::GetUserRequest {
            lookup: Some(lookup),
        }
    }
}

/// An update mask of `paths`.
pub fn mask(paths: &[&str]) -> Option<prost_types::FieldMask> {
    Some(prost_types::FieldMask {
        paths: paths.iter().map(|p| (*p).to_owned()).collect(),
    })
}

/// The superuser every test server starts with.
pub const ROOT_USERNAME: &str = "root";
/// Its password.
pub const ROOT_PASSWORD: &str = "root password for tests";

const TEMPLATE: &str = "identity_template";

/// The shared test cluster.
struct Cluster {
    admin_url: String,
    template_url: String,
    /// `server_version_num`: 150004 for 15.4.
    server_version: u32,
}

static CLUSTER: OnceLock<Cluster> = OnceLock::new();
static EMBEDDED: Mutex<Option<EmbeddedPostgres>> = Mutex::new(None);

/// Stops the test cluster when the test binary exits (libtest ends with
/// `process::exit`, which runs `atexit` handlers).
extern "C" fn stop_cluster() {
    if let Some(mut pg) = EMBEDDED.lock().ok().and_then(|mut guard| guard.take()) {
        let _ = pg.stop();
    }
}

/// The server binaries the tests run: `PG_BIN_DIR` (as for the service),
/// else the newest found.
fn pg_bin_dir() -> Option<PathBuf> {
    std::env::var_os("PG_BIN_DIR")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
}

/// A short folder in the temp dir (Unix socket paths are limited), one per
/// checkout and per `PG_BIN_DIR`, so that two checkouts may test at once and
/// a switch of PostgreSQL version does not meet the other's cluster.
fn cluster_dir() -> PathBuf {
    let checkout = env!("CARGO_MANIFEST_DIR");
    let key = match pg_bin_dir() {
        Some(bin) => format!("{checkout}\0{}", bin.display()),
        None => checkout.to_owned(),
    };
    let tag = &format!("{:016x}", sha_of(&key))[..12];
    std::env::temp_dir().join(format!("identity-test-{tag}"))
}

/// The SQL that makes a database: from `template` by copying its files,
/// or empty. `STRATEGY FILE_COPY` (PostgreSQL 15 and newer, whose default
/// WAL_LOG strategy is several times slower for a small template) is named
/// only where the server knows it; older servers always copy files.
pub fn create_database_sql(name: &str, template: Option<&str>, server_version: u32) -> String {
    match template {
        Some(t) if server_version >= 150_000 => {
            format!("CREATE DATABASE {name} TEMPLATE {t} STRATEGY FILE_COPY")
        }
        Some(t) => format!("CREATE DATABASE {name} TEMPLATE {t}"),
        None => format!("CREATE DATABASE {name}"),
    }
}

/// The server's `server_version_num`.
async fn server_version(conn: &mut AsyncPgConnection) -> u32 {
    use diesel_async::RunQueryDsl;
    #[derive(diesel::QueryableByName)]
    struct Version {
        #[diesel(sql_type = diesel::sql_types::Text)]
        server_version_num: String,
    }
    let row: Version = diesel::sql_query("SHOW server_version_num")
        .get_result(conn)
        .await
        .expect("SHOW server_version_num");
    row.server_version_num
        .trim()
        .parse()
        .expect("a numeric server_version_num")
}

#[test]
fn databases_are_copied_with_file_copy_only_where_the_server_has_it() {
    for version in [130_000, 130_016, 140_011, 149_999] {
        assert_eq!(
            create_database_sql("test_a", Some("tpl"), version),
            "CREATE DATABASE test_a TEMPLATE tpl",
            "{version}"
        );
    }
    for version in [150_000, 150_004, 160_002, 170_000] {
        assert_eq!(
            create_database_sql("test_a", Some("tpl"), version),
            "CREATE DATABASE test_a TEMPLATE tpl STRATEGY FILE_COPY",
            "{version}"
        );
    }
    assert_eq!(
        create_database_sql("test_a", None, 170_000),
        "CREATE DATABASE test_a"
    );
}

fn sha_of(s: &str) -> u64 {
    // FNV-1a: a stable, dependency-free tag for a path.
    s.bytes().fold(0xcbf29ce484222325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
    })
}

fn cluster() -> &'static Cluster {
    CLUSTER.get_or_init(|| {
        // A thread of its own: this may run inside a test's runtime, and the
        // set-up needs a runtime of its own.
        std::thread::spawn(|| {
            init_logs();
            let bin_dir = pg_bin_dir();
            let pg =
                EmbeddedPostgres::start(&cluster_dir(), bin_dir.as_deref(), Durability::Throwaway)
                    .expect("start the test cluster");
            let admin_url = pg.url("postgres");
            let template_url = pg.url(TEMPLATE);
            *EMBEDDED.lock().unwrap() = Some(pg);
            unsafe { libc::atexit(stop_cluster) };
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            let server_version = rt.block_on(async {
                let mut admin = AsyncPgConnection::establish(&admin_url).await.unwrap();
                drop_leftovers(&mut admin).await;
                admin
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {TEMPLATE} WITH (FORCE)"))
                    .await
                    .unwrap();
                admin
                    .batch_execute(&format!("CREATE DATABASE {TEMPLATE}"))
                    .await
                    .unwrap();
                identity::db::migrations::run_pending(&template_url)
                    .await
                    .expect("migrate the template");
                server_version(&mut admin).await
            });
            Cluster {
                admin_url,
                template_url,
                server_version,
            }
        })
        .join()
        .expect("cluster set-up")
    })
}

/// Drops the databases of earlier runs that died before their clean-up.
async fn drop_leftovers(admin: &mut AsyncPgConnection) {
    use diesel::{QueryDsl, TextExpressionMethods};
    use diesel_async::RunQueryDsl;
    diesel::table! { pg_database (datname) { datname -> Text, } }
    let names: Vec<String> = pg_database::table
        .filter(pg_database::datname.like("test\\_%"))
        .select(pg_database::datname)
        .load(admin)
        .await
        .unwrap();
    for name in names {
        let _ = admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
            .await;
    }
}

fn init_logs() {
    if std::env::var_os("TEST_LOG").is_some() {
        identity::telemetry::init(identity::config::LogFormat::Text);
    }
}

/// A database of one test, dropped when the test ends.
pub struct TestDb {
    pub name: String,
    pub url: String,
}

impl TestDb {
    /// A copy of the migrated template.
    pub async fn migrated() -> Self {
        Self::create(Some(TEMPLATE)).await
    }

    /// An empty database, with no schema.
    pub async fn empty() -> Self {
        Self::create(None).await
    }

    async fn create(template: Option<&str>) -> Self {
        let cluster = cluster();
        let name = format!("test_{}", Uuid::now_v7().simple());
        let mut admin = AsyncPgConnection::establish(&cluster.admin_url)
            .await
            .unwrap();
        let sql = create_database_sql(&name, template, cluster.server_version);
        admin
            .batch_execute(&sql)
            .await
            .expect("create the test database");
        let url = cluster.template_url.replacen(TEMPLATE, &name, 1);
        Self { name, url }
    }

    /// A connection to this database.
    pub async fn connect(&self) -> AsyncPgConnection {
        AsyncPgConnection::establish(&self.url).await.unwrap()
    }

    /// Runs SQL as the cluster's superuser on the admin database.
    pub async fn admin(&self, sql: &str) {
        let mut admin = AsyncPgConnection::establish(&cluster().admin_url)
            .await
            .unwrap();
        admin.batch_execute(sql).await.unwrap();
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        let admin_url = cluster().admin_url.clone();
        // Drop runs inside the test's runtime; the async driver needs one of
        // its own, on a thread of its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Ok(mut admin) = AsyncPgConnection::establish(&admin_url).await {
                    let _ = admin.batch_execute(&sql).await;
                }
            });
        })
        .join();
    }
}

/// The settings of a test server: port 0, cheaper argon2 (tests hash a lot;
/// the production parameters are checked in unit tests).
pub fn test_config(database_url: &str) -> Config {
    Config::from_args([
        "--database-url",
        database_url,
        "--listen-addr",
        "127.0.0.1:0",
        "--argon2-memory-kib",
        "4096",
        "--argon2-iterations",
        "1",
        "--db-pool-size",
        "8",
        // Rotations in tests sign at once unless a test says otherwise.
        "--keys-activation-delay",
        "0s",
    ])
    .expect("test config")
}

/// A running server on its own database.
///
/// The server task holds the database and the keys folder too (see
/// [`start`]), so that whichever way a test ends (`stop()`, the end of its
/// body, a panic), the database is dropped only once the task and its pool
/// are gone: never under a server still using it.
pub struct TestApp {
    pub addr: SocketAddr,
    pub channel: Channel,
    /// UserService as the superuser `root`.
    pub users: UserServiceClient<Authed>,
    /// All clients as `root`.
    pub admin: Clients,
    /// All clients as nobody.
    pub anon: Clients,
    /// The superuser `root`.
    pub root: pb::User,
    pub keys_dir: Arc<TempDir>,
    /// Sent by `stop()`; dropped with the app, it stops the server as well.
    stop: Option<oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<()>>,
    pub db: Arc<TestDb>,
}

/// Starts a server on a fresh database and connects the clients.
pub async fn spawn_app() -> TestApp {
    let db = TestDb::migrated().await;
    spawn_app_on(db, |_| {}).await
}

/// A folder removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// A new empty folder under the temp dir.
    pub fn new(prefix: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("{prefix}-{}", Uuid::now_v7().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Creates the superuser `root` directly through the service layer, as
/// `identity createsuperuser` does.
async fn bootstrap_root(config: &Config) {
    use identity::{
        domain::{Attributes, BreachedList, Email, Password, Username},
        hashing::{HashParams, Hasher},
        service::users::{NewUser, UserService},
    };
    let params = HashParams {
        memory_kib: config.argon2_memory_kib,
        iterations: config.argon2_iterations,
        parallelism: config.argon2_parallelism,
    };
    let pool = identity::db::pool(config.database_url.as_deref().unwrap(), 1).unwrap();
    let service = UserService::new(pool, Hasher::new(params, 1, 4).unwrap());
    let result = service
        .create(NewUser {
            username: Username::parse(ROOT_USERNAME).unwrap(),
            email: Email::parse("root@example.com").unwrap(),
            password: Some(Password::parse(ROOT_PASSWORD, &[], &BreachedList::empty()).unwrap()),
            first_name: String::new(),
            last_name: String::new(),
            is_superuser: true,
            is_active: true,
            is_verified: true,
            attributes: Attributes::default(),
            is_service: false,
        })
        .await;
    match result {
        Ok(_) | Err(identity::error::Error::AlreadyExists { .. }) => {}
        Err(e) => panic!("bootstrap root: {e:?}"),
    }
}

/// Starts a server on `db`, with settings adjusted by `tweak`.
pub async fn spawn_app_on(db: impl Into<Arc<TestDb>>, tweak: impl FnOnce(&mut Config)) -> TestApp {
    spawn_app_with(db, TempDir::new("identity-keys"), tweak).await
}

/// Starts a server on `db` and `keys_dir`, with settings adjusted by `tweak`.
pub async fn spawn_app_with(
    db: impl Into<Arc<TestDb>>,
    keys_dir: impl Into<Arc<TempDir>>,
    tweak: impl FnOnce(&mut Config),
) -> TestApp {
    start(db.into(), keys_dir.into(), tweak, true).await
}

/// Starts a server whose `admin` clients are anonymous: for settings under
/// which even root's login would not get through (tiny deadlines).
pub async fn spawn_app_without_login(
    db: impl Into<Arc<TestDb>>,
    tweak: impl FnOnce(&mut Config),
) -> TestApp {
    start(
        db.into(),
        TempDir::new("identity-keys").into(),
        tweak,
        false,
    )
    .await
}

async fn start(
    db: Arc<TestDb>,
    keys_dir: Arc<TempDir>,
    tweak: impl FnOnce(&mut Config),
    log_root_in: bool,
) -> TestApp {
    let mut config = test_config(&db.url);
    config.keys_dir = keys_dir.0.clone();
    tweak(&mut config);
    bootstrap_root(&config).await;
    let app = Application::build(&config).await.expect("build the app");
    let addr = app.local_addr();
    let (stop, stopped) = oneshot::channel::<()>();
    let (task_db, task_keys) = (db.clone(), keys_dir.clone());
    let server = tokio::spawn(async move {
        // The first locals, so the last dropped: after the server's future
        // (and its pool), whether the task ends or the runtime drops it.
        let _db = task_db;
        let _keys_dir = task_keys;
        app.run_until_stopped(async {
            let _ = stopped.await;
        })
        .await
        .expect("server run");
    });
    // The listener is bound already: connecting needs no wait.
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("connect to the test server");
    let anon = Clients::new(&channel, None);
    let (admin, root) = if log_root_in {
        let login = anon
            .auth
            .clone()
            .login(pb::LoginRequest {
                login: ROOT_USERNAME.into(),
                password: ROOT_PASSWORD.into(),
            })
            .await
            .expect("root logs in")
            .into_inner();
        let token = login.tokens.unwrap().access_token;
        (Clients::new(&channel, Some(&token)), login.user.unwrap())
    } else {
        (anon.clone(), pb::User::default())
    };
    TestApp {
        addr,
        users: admin.users.clone(),
        admin,
        anon,
        root,
        keys_dir,
        channel,
        stop: Some(stop),
        server: Some(server),
        db,
    }
}

impl TestApp {
    /// Stops the server and waits until in-flight calls have finished.
    pub async fn stop(mut self) {
        self.shutdown().await;
    }

    async fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            server.await.expect("server task");
        }
    }

    /// Stops this server and starts another on the same database and keys,
    /// with settings adjusted by `tweak`.
    pub async fn restart(mut self, tweak: impl FnOnce(&mut Config)) -> TestApp {
        self.shutdown().await;
        let TestApp { db, keys_dir, .. } = self;
        spawn_app_with(db, keys_dir, tweak).await
    }

    /// Clients calling with `token`.
    pub fn as_token(&self, token: &str) -> Clients {
        Clients::new(&self.channel, Some(token))
    }

    /// Logs in; the tokens and the user.
    pub async fn login(
        &self,
        login: &str,
        password: &str,
    ) -> Result<pb::LoginResponse, tonic::Status> {
        self.anon
            .auth
            .clone()
            .login(pb::LoginRequest {
                login: login.into(),
                password: password.into(),
            })
            .await
            .map(tonic::Response::into_inner)
    }

    /// Creates a user (with [`TestUser`]'s password), logs it in, and
    /// returns it with its tokens.
    pub async fn signed_in_user(&self, username: &str) -> (pb::User, pb::Tokens) {
        let user = self.create_user(username).await;
        let login = self
            .login(username, &TestUser::named(username).password)
            .await
            .expect("login");
        (user, login.tokens.unwrap())
    }

    /// Deactivates `user`, as a superuser.
    pub async fn deactivate(&self, user: &pb::User) {
        self.update_user(&user.id, &["is_active"], |u| u.is_active = false)
            .await
            .expect("deactivate");
    }

    /// Creates the group `groupname` (slug derived) as root, and adds
    /// `members` to it; returns it.
    pub async fn group_with(&self, groupname: &str, members: &[&pb::User]) -> pb::Group {
        let group = self
            .admin
            .groups
            .clone()
            .create_group(pb::CreateGroupRequest {
                groupname: groupname.into(),
                slug: String::new(),
            })
            .await
            .expect("create group")
            .into_inner()
            .group
            .expect("the group");
        for user in members {
            self.admin
                .groups
                .clone()
                .add_group_member(pb::AddGroupMemberRequest {
                    group_id: group.id.clone(),
                    user_id: user.id.clone(),
                })
                .await
                .expect("add member");
        }
        group
    }

    /// Creates a user with a password and returns it.
    pub async fn create_user(&self, username: &str) -> pb::User {
        self.admin
            .create_user(TestUser::named(username).request())
            .await
            .expect("create user")
    }

    /// CreateUser as root: the new user.
    pub async fn create_user_from(
        &self,
        request: pb::CreateUserRequest,
    ) -> Result<pb::User, Status> {
        self.admin.create_user(request).await
    }

    /// GetUser as root.
    pub async fn get_user(&self, lookup: Lookup<'_>) -> Result<pb::User, Status> {
        self.admin.get_user(lookup).await
    }

    /// UpdateUser as root (see [`Clients::update_user`]).
    pub async fn update_user(
        &self,
        id: &str,
        paths: &[&str],
        change: impl FnOnce(&mut pb::User),
    ) -> Result<pb::User, Status> {
        self.admin.update_user(id, paths, change).await
    }

    /// ListUsers as root: one page.
    pub async fn list_users(
        &self,
        request: pb::ListUsersRequest,
    ) -> Result<pb::ListUsersResponse, Status> {
        self.admin.list_users(request).await
    }
}

/// Whether the cluster has a database of that name.
async fn database_exists(name: &str) -> bool {
    use diesel_async::RunQueryDsl;
    #[derive(diesel::QueryableByName)]
    struct Count {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    let mut admin = AsyncPgConnection::establish(&cluster().admin_url)
        .await
        .unwrap();
    let row: Count = diesel::sql_query("SELECT count(*) AS n FROM pg_database WHERE datname = $1")
        .bind::<diesel::sql_types::Text, _>(name)
        .get_result(&mut admin)
        .await
        .unwrap();
    row.n == 1
}

#[tokio::test]
async fn a_test_app_dropped_without_stop_keeps_its_database_until_its_server_task_ends() {
    let app = spawn_app().await;
    app.create_user("pooled").await;
    let name = app.db.name.clone();
    let db = Arc::downgrade(&app.db);

    drop(app);
    // The server task holds the database until it has stopped, pool and all.
    assert_eq!(db.strong_count(), 1, "held by the server task");
    // Told to stop when `stop` was dropped, it ends by itself; its database
    // goes then.
    tokio::time::timeout(std::time::Duration::from_secs(30), async {
        while db.strong_count() > 0 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the server task ends by itself");
    assert!(!database_exists(&name).await, "dropped with the task");
}

#[test]
fn a_test_that_panics_drops_its_database_after_its_server_task() {
    let runtime = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    };
    // Another runtime looks: the test's is the one under examination.
    let exists = |name: &str| runtime().block_on(database_exists(name));
    let rt = runtime();
    let mut name = String::new();
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        rt.block_on(async {
            let app = spawn_app().await;
            name = app.db.name.clone();
            panic!("a failing assertion");
        })
    }));
    assert!(panicked.is_err());
    assert!(exists(&name), "the server task, still there, holds it");
    drop(rt);
    assert!(!exists(&name), "gone with the server task");
}

/// A valid CreateUser request, to vary field by field.
pub struct TestUser {
    pub username: String,
    pub email: String,
    pub password: String,
}

impl TestUser {
    /// A user with a unique-enough email derived from the username.
    pub fn named(username: &str) -> Self {
        let local: String = username
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { 'x' })
            .take(40)
            .collect();
        Self {
            username: username.to_owned(),
            email: format!(
                "{local}.{}@example.com",
                &Uuid::now_v7().simple().to_string()[20..]
            ),
            password: "correct horse battery staple".to_owned(),
        }
    }

    /// The CreateUser request of this user.
    pub fn request(&self) -> pb::CreateUserRequest {
        pb::CreateUserRequest {
            username: self.username.clone(),
            email: self.email.clone(),
            password: self.password.clone(),
            ..Default::default()
        }
    }
}

/// The fields named by a status's BadRequest details.
pub fn violated_fields(status: &tonic::Status) -> Vec<String> {
    use tonic_types::StatusExt;
    status
        .get_details_bad_request()
        .map(|b| b.field_violations.into_iter().map(|v| v.field).collect())
        .unwrap_or_default()
}

/// The `google.rpc.ErrorInfo` reason of a status ("" without one).
pub fn reason(status: &Status) -> String {
    use tonic_types::StatusExt;
    status
        .get_details_error_info()
        .map(|i| i.reason)
        .unwrap_or_default()
}

/// The field an ALREADY_EXISTS status says is taken: the `field` of its
/// ErrorInfo `FIELD_TAKEN` ("username", "email", "groupname", "slug", "id").
pub fn taken_field(status: &Status) -> Option<String> {
    use tonic_types::StatusExt;
    let info = status.get_details_error_info()?;
    if info.reason != "FIELD_TAKEN" || info.domain != "identity" {
        return None;
    }
    info.metadata.get("field").cloned()
}

/// The signing key files (`*.pem`) of a keys folder, oldest first; the
/// folder also holds the MFA key (`mfa.key`).
pub fn pem_files(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "pem"))
        .collect();
    files.sort();
    files
}
