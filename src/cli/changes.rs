//! `identity changes`: the change feed on a terminal, `tail -f` of who did
//! what. A gRPC client of a running server (ListChanges, or WatchChanges
//! with `--follow`), never of its database: it sees what the API shows, with
//! the API's permissions (a superuser's access token).
//!
//! The token comes from `IDENTITY_TOKEN` only, never a flag: a command
//! line is visible to every user of the machine in `ps` and lands in shell
//! history. One line per change on standard output, flushed at once so that
//! `| grep` sees it live; everything else (errors, the cursor to resume
//! from) goes to standard error.
//!
//! Plaintext only (`http://`): this build's tonic has TLS but no trust
//! roots for a client (neither `tls-native-roots` nor `tls-webpki-roots`),
//! and a CLI that trusts nothing would be no TLS at all. Reach a TLS
//! deployment through a port-forward or its mesh sidecar.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::{Code, Request, Status};
use uuid::Uuid;

use crate::domain::{ChangeKind, Cursor};
use crate::proto::identity::v1 as pb;
use pb::change_service_client::ChangeServiceClient;

/// ListChanges page size: large pages, few round trips.
const PAGE: i32 = 500;

/// What the operator is told when the server refuses the token.
const TOKEN_HINT: &str = "IDENTITY_TOKEN must hold a superuser's access token \
     (from Login; it expires after ACCESS_TOKEN_TTL, log in again for a new one)";

#[derive(Debug, Args)]
pub(super) struct ChangesArgs {
    /// The server's gRPC address. Plaintext `http://` only (this build has
    /// no TLS trust roots for clients).
    #[arg(long, env = "IDENTITY_SERVER", value_name = "URL",
          default_value = "http://127.0.0.1:50051", value_parser = parse_server)]
    server: String,

    /// Follow the feed as it commits (WatchChanges) until Ctrl-C or
    /// SIGTERM. Without it: list the recorded changes (ListChanges), page
    /// after page, and exit 0.
    #[arg(short, long, env = "IDENTITY_FOLLOW",
          value_parser = clap::builder::BoolishValueParser::new())]
    follow: bool,

    /// Start after this cursor (each change prints its own; the last one is
    /// printed to standard error on exit). Unset: from the oldest change
    /// kept, or with --follow from now.
    #[arg(long, env = "IDENTITY_AFTER", value_name = "CURSOR", value_parser = parse_cursor)]
    after: Option<String>,

    /// Only changes of this kind; repeat it (or separate with commas) for
    /// several: user_created, user_updated, user_deleted, password_changed,
    /// session_started, session_ended, group_created, group_deleted,
    /// member_added, member_removed, api_key_created, api_key_revoked,
    /// keys_changed.
    #[arg(long = "kind", env = "IDENTITY_KINDS", value_name = "KIND",
          value_delimiter = ',', value_parser = parse_kind)]
    kinds: Vec<ChangeKind>,

    /// Only changes of this user (its id). With --follow the server sends
    /// every change of the kinds asked and this command drops the others.
    #[arg(long = "user", env = "IDENTITY_USER_ID", value_name = "ID")]
    user: Option<Uuid>,

    /// Only changes made by this user (its id). With --follow, filtered
    /// here as --user is.
    #[arg(long = "actor", env = "IDENTITY_ACTOR_ID", value_name = "ID")]
    actor: Option<Uuid>,

    /// One JSON object per line, with the field names of the proto's
    /// Change (kind as its short name, commit_time in RFC 3339), instead of
    /// text.
    #[arg(long, env = "IDENTITY_JSON",
          value_parser = clap::builder::BoolishValueParser::new())]
    json: bool,
}

fn parse_server(s: &str) -> Result<String, String> {
    let uri: http::Uri = s
        .parse()
        .map_err(|e| format!("not a URL ({e}); e.g. http://127.0.0.1:50051"))?;
    match uri.scheme_str() {
        Some("http") if uri.authority().is_some() => Ok(s.to_owned()),
        Some("https") => Err(
            "https is not supported: this build has no TLS trust roots for \
             clients; use http:// (a port-forward or the mesh sidecar)"
                .to_owned(),
        ),
        _ => Err("expected http://HOST:PORT".to_owned()),
    }
}

fn parse_cursor(s: &str) -> Result<String, String> {
    if s.is_empty() {
        return Ok(String::new());
    }
    Cursor::parse(s)
        .map(|_| s.to_owned())
        .map_err(|e| format!("{e} (a cursor is 32 hexadecimal digits)"))
}

/// A kind by its short name (`user_updated`), as [`ChangeKind::name`]
/// prints it; the proto's names (`CHANGE_KIND_USER_UPDATED`) and any case
/// are accepted too.
fn parse_kind(s: &str) -> Result<ChangeKind, String> {
    let lower = s.trim().to_ascii_lowercase();
    let name = lower.strip_prefix("change_kind_").unwrap_or(&lower);
    ChangeKind::ALL
        .into_iter()
        .find(|k| k.name() == name)
        .ok_or_else(|| {
            let names: Vec<&str> = ChangeKind::ALL.iter().map(|k| k.name()).collect();
            format!("unknown kind; one of {}", names.join(", "))
        })
}

/// Why the command stopped early.
#[derive(Debug)]
enum Stop {
    /// The server answered with an error.
    Status(Status),
    /// No connection.
    Connect(String),
    /// Standard output failed (a closed pipe is one).
    Output(std::io::Error),
}

impl From<Status> for Stop {
    fn from(s: Status) -> Self {
        Stop::Status(s)
    }
}

impl From<std::io::Error> for Stop {
    fn from(e: std::io::Error) -> Self {
        Stop::Output(e)
    }
}

/// How a run ended without error.
#[derive(Debug)]
enum Ended {
    /// ListChanges has no more.
    Listed,
    /// The server ended the stream (it shuts down).
    StreamClosed,
}

pub(super) async fn changes(args: ChangesArgs) -> ExitCode {
    let token = match std::env::var("IDENTITY_TOKEN") {
        Ok(t) if !t.trim().is_empty() => t.trim().to_owned(),
        _ => {
            eprintln!("identity: IDENTITY_TOKEN is not set: {TOKEN_HINT}");
            return ExitCode::from(2);
        }
    };
    let bearer: MetadataValue<Ascii> = match format!("Bearer {token}").parse() {
        Ok(v) => v,
        Err(_) => {
            eprintln!("identity: IDENTITY_TOKEN is not a token: {TOKEN_HINT}");
            return ExitCode::from(2);
        }
    };
    // Installed before anything else, so that a Ctrl-C at any moment ends
    // the run here, with the cursor printed, rather than killing it.
    let stop = stop_signal();
    let mut reader = Reader {
        args,
        bearer,
        last: None,
    };
    reader.last = reader.args.after.clone().filter(|c| !c.is_empty());
    let outcome = tokio::select! {
        outcome = reader.run() => Some(outcome),
        _ = stop => None,
    };
    let resume = |last: &Option<String>| {
        if let Some(cursor) = last {
            eprintln!("identity: resume with --after {cursor}");
        }
    };
    match outcome {
        None => {
            resume(&reader.last);
            ExitCode::SUCCESS
        }
        Some(Ok(Ended::Listed)) => {
            resume(&reader.last);
            ExitCode::SUCCESS
        }
        Some(Ok(Ended::StreamClosed)) => {
            eprintln!("identity: the server ended the stream (it is shutting down)");
            resume(&reader.last);
            ExitCode::SUCCESS
        }
        Some(Err(Stop::Output(e))) if e.kind() == std::io::ErrorKind::BrokenPipe => {
            // `| head`: the reader has what it wanted.
            ExitCode::SUCCESS
        }
        Some(Err(Stop::Output(e))) => {
            eprintln!("identity: writing to standard output: {e}");
            resume(&reader.last);
            ExitCode::FAILURE
        }
        Some(Err(Stop::Connect(message))) => {
            eprintln!("identity: UNAVAILABLE: {message}");
            resume(&reader.last);
            ExitCode::FAILURE
        }
        Some(Err(Stop::Status(status))) => {
            let expired = reason(&status).as_deref() == Some("CURSOR_EXPIRED");
            eprintln!("identity: {}", status_line(&status));
            if !expired {
                resume(&reader.last);
            }
            ExitCode::FAILURE
        }
    }
}

/// `<CODE>: <message>`, with what to do for the refusals an operator meets.
fn status_line(status: &Status) -> String {
    let mut line = format!("{}: {}", code_name(status.code()), status.message());
    let reason = reason(status);
    if let Some(reason) = &reason {
        line.push_str(&format!(" ({reason})"));
    }
    match status.code() {
        Code::Unauthenticated | Code::PermissionDenied => {
            line.push_str(&format!("; {TOKEN_HINT}"));
        }
        _ if reason.as_deref() == Some("CURSOR_EXPIRED") => {
            line.push_str("; start again without --after and re-read the state you keep");
        }
        _ => {}
    }
    // One line, whatever the server wrote.
    line.replace(['\n', '\r'], " ")
}

/// The ErrorInfo reason of a refusal, if it carries one.
fn reason(status: &Status) -> Option<String> {
    use tonic_types::StatusExt;
    status
        .get_error_details()
        .error_info()
        .map(|info| info.reason.clone())
        .filter(|r| !r.is_empty())
}

/// The canonical name of a status code, as gRPC's documentation spells it.
fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Resolves on Ctrl-C or SIGTERM; the handlers are installed when called.
/// Unlike `serve`'s, it logs nothing: standard error is the operator's.
fn stop_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{SignalKind, signal};
    let interrupt = signal(SignalKind::interrupt());
    let term = signal(SignalKind::terminate());
    async move {
        match (interrupt, term) {
            (Ok(mut interrupt), Ok(mut term)) => {
                tokio::select! {
                    _ = interrupt.recv() => {}
                    _ = term.recv() => {}
                }
            }
            // Without handlers the default actions stop the program.
            _ => std::future::pending().await,
        }
    }
}

/// One run of the command, and the last cursor it has seen.
struct Reader {
    args: ChangesArgs,
    bearer: MetadataValue<Ascii>,
    /// Where an operator resumes: after the last change printed, or the
    /// last cursor the server gave (a heartbeat's, a page's).
    last: Option<String>,
}

impl Reader {
    async fn run(&mut self) -> Result<Ended, Stop> {
        let endpoint = tonic::transport::Endpoint::from_shared(self.args.server.clone())
            .map_err(|e| Stop::Connect(format!("{}: {e}", self.args.server)))?
            .connect_timeout(Duration::from_secs(10));
        let channel = endpoint.connect().await.map_err(|e| {
            Stop::Connect(format!(
                "cannot connect to {}: {}",
                self.args.server,
                chain(&e)
            ))
        })?;
        let client = ChangeServiceClient::new(channel);
        if self.args.follow {
            self.follow(client).await
        } else {
            self.list(client).await
        }
    }

    fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        request
            .metadata_mut()
            .insert("authorization", self.bearer.clone());
        request
    }

    fn kinds(&self) -> Vec<i32> {
        self.args.kinds.iter().map(|k| *k as i32).collect()
    }

    async fn list(
        &mut self,
        mut client: ChangeServiceClient<tonic::transport::Channel>,
    ) -> Result<Ended, Stop> {
        let mut printer = Printer::new(self.args.json);
        let mut after = self.args.after.clone().unwrap_or_default();
        loop {
            let request = self.request(pb::ListChangesRequest {
                after_cursor: after.clone(),
                page_size: PAGE,
                kinds: self.kinds(),
                user_id: self.args.user.map(|u| u.to_string()).unwrap_or_default(),
                actor_id: self.args.actor.map(|u| u.to_string()).unwrap_or_default(),
            });
            let page = client.list_changes(request).await?.into_inner();
            for change in &page.changes {
                printer.print(change)?;
                self.last = Some(change.cursor.clone());
            }
            // A short page: the server read up to the head of the feed.
            let exhausted = page.changes.len() < PAGE as usize;
            if page.cursor.is_empty() || page.cursor == after {
                return Ok(Ended::Listed);
            }
            self.last = Some(page.cursor.clone());
            after = page.cursor;
            if exhausted {
                return Ok(Ended::Listed);
            }
        }
    }

    async fn follow(
        &mut self,
        mut client: ChangeServiceClient<tonic::transport::Channel>,
    ) -> Result<Ended, Stop> {
        let mut printer = Printer::new(self.args.json);
        let request = self.request(pb::WatchChangesRequest {
            after_cursor: self.args.after.clone().unwrap_or_default(),
            kinds: self.kinds(),
        });
        let mut stream = client.watch_changes(request).await?.into_inner();
        while let Some(response) = stream.message().await? {
            for change in &response.changes {
                if self.wanted(change) {
                    printer.print(change)?;
                }
                self.last = Some(change.cursor.clone());
            }
            // A heartbeat prints nothing; its cursor is where to resume.
            if !response.cursor.is_empty() {
                self.last = Some(response.cursor);
            }
        }
        Ok(Ended::StreamClosed)
    }

    /// The filters WatchChanges has no field for, applied here.
    fn wanted(&self, change: &pb::Change) -> bool {
        let is = |want: Option<Uuid>, id: &str| want.is_none_or(|w| w.to_string() == id);
        is(self.args.user, &change.user_id) && is(self.args.actor, &change.actor_id)
    }
}

/// An error with its causes ("transport error" alone says nothing).
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(&format!(": {cause_text}"));
        }
        source = cause.source();
    }
    text
}

/// Writes one line per change and flushes it.
struct Printer {
    json: bool,
    out: std::io::Stdout,
}

impl Printer {
    fn new(json: bool) -> Self {
        Self {
            json,
            out: std::io::stdout(),
        }
    }

    fn print(&mut self, change: &pb::Change) -> std::io::Result<()> {
        let line = if self.json {
            json_line(change)
        } else {
            text_line(change)
        };
        let mut out = self.out.lock();
        out.write_all(line.as_bytes())?;
        out.write_all(b"\n")?;
        out.flush()
    }
}

/// The kind's short name; a kind newer than this program by its number.
fn kind_name(kind: i32) -> String {
    ChangeKind::from_number(kind).map_or_else(|| format!("kind_{kind}"), |k| k.name().to_owned())
}

/// RFC 3339 in UTC with microseconds (what PostgreSQL keeps).
fn rfc3339(t: Option<&prost_types::Timestamp>) -> String {
    t.and_then(|t| chrono::DateTime::from_timestamp(t.seconds, t.nanos.max(0) as u32))
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true))
        .unwrap_or_default()
}

/// The text form: time, kind, then `key=value` for each field present,
/// the cursor last. A value with spaces, quotes, `=` or control characters
/// (a request id is the client's choice) is quoted and escaped, so a line
/// stays one line and splits on spaces.
fn text_line(c: &pb::Change) -> String {
    fn value(v: &str) -> String {
        if v.chars()
            .all(|ch| ch.is_ascii_graphic() && ch != '"' && ch != '=')
        {
            v.to_owned()
        } else {
            format!("{v:?}")
        }
    }
    let mut line = format!("{} {}", rfc3339(c.commit_time.as_ref()), kind_name(c.kind));
    let fields = c.fields.join(",");
    for (key, v) in [
        ("user", c.user_id.as_str()),
        ("group", &c.group_id),
        ("session", &c.session_id),
        ("api_key", &c.api_key_id),
        ("actor", &c.actor_id),
        ("rpc", &c.rpc),
        ("fields", &fields),
        ("end_reason", &c.end_reason),
        ("request_id", &c.request_id),
        ("cursor", &c.cursor),
    ] {
        if !v.is_empty() {
            line.push_str(&format!(" {key}={}", value(v)));
        }
    }
    line
}

/// The JSON form: every field of the proto's Change under its proto name,
/// always present (empty when absent), in the proto's order.
#[derive(serde::Serialize)]
struct JsonChange<'a> {
    cursor: &'a str,
    commit_time: String,
    kind: String,
    user_id: &'a str,
    session_id: &'a str,
    group_id: &'a str,
    api_key_id: &'a str,
    actor_id: &'a str,
    rpc: &'a str,
    fields: &'a [String],
    request_id: &'a str,
    end_reason: &'a str,
}

fn json_line(c: &pb::Change) -> String {
    let json = JsonChange {
        cursor: &c.cursor,
        commit_time: rfc3339(c.commit_time.as_ref()),
        kind: kind_name(c.kind),
        user_id: &c.user_id,
        session_id: &c.session_id,
        group_id: &c.group_id,
        api_key_id: &c.api_key_id,
        actor_id: &c.actor_id,
        rpc: &c.rpc,
        fields: &c.fields,
        request_id: &c.request_id,
        end_reason: &c.end_reason,
    };
    // Strings and a list of strings: serialising cannot fail.
    serde_json::to_string(&json).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_parse_by_short_or_proto_name_and_unknown_ones_are_refused() {
        assert_eq!(parse_kind("user_updated"), Ok(ChangeKind::UserUpdated));
        assert_eq!(
            parse_kind("CHANGE_KIND_SESSION_ENDED"),
            Ok(ChangeKind::SessionEnded)
        );
        assert!(
            parse_kind("user_renamed")
                .unwrap_err()
                .contains("keys_changed")
        );
        for k in ChangeKind::ALL {
            assert_eq!(parse_kind(k.name()), Ok(k));
        }
    }

    #[test]
    fn only_plain_http_servers_are_accepted() {
        assert!(parse_server("http://127.0.0.1:50051").is_ok());
        assert!(parse_server("https://identity.example:443").is_err());
        assert!(parse_server("127.0.0.1:50051").is_err());
    }

    #[test]
    fn a_text_line_shows_what_is_present_and_quotes_odd_values() {
        let change = pb::Change {
            cursor: "0000000000000001000000000000002a".into(),
            commit_time: Some(prost_types::Timestamp {
                seconds: 1_796_000_000,
                nanos: 123_456_000,
            }),
            kind: ChangeKind::UserUpdated as i32,
            user_id: "u1".into(),
            fields: vec!["first_name".into(), "is_active".into()],
            request_id: "a b\n".into(),
            ..Default::default()
        };
        assert_eq!(
            text_line(&change),
            "2026-11-30T00:53:20.123456Z user_updated user=u1 fields=first_name,is_active \
             request_id=\"a b\\n\" cursor=0000000000000001000000000000002a"
        );
        let json: serde_json::Value = serde_json::from_str(&json_line(&change)).unwrap();
        assert_eq!(json["kind"], "user_updated");
        assert_eq!(json["actor_id"], "");
        assert_eq!(json["fields"][1], "is_active");
    }
}
