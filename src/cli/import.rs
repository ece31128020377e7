//! `identity import`: users with their password hashes from a JSON Lines
//! file, read here in batches and handed to the service, which checks and
//! stores them; every refused line is printed with its number.

use clap::Args;

use crate::app::StartupError;
use crate::config::Config;
use crate::error::Error;

use super::admin::with_admin_db;

#[derive(Debug, Args)]
pub(super) struct ImportArgs {
    /// The JSON Lines file (`-`: standard input).
    file: std::path::PathBuf,
    /// Lines per transaction.
    #[arg(long, default_value = "64",
          value_parser = clap::value_parser!(u32).range(1..=64))]
    batch_size: u32,
    #[command(flatten)]
    pub(super) config: Config,
}

pub(super) async fn import(args: ImportArgs) -> Result<(), StartupError> {
    use crate::service::accounts::AccountService;
    use std::io::BufRead;
    let reader: Box<dyn BufRead> = if args.file.as_os_str() == "-" {
        Box::new(std::io::BufReader::new(std::io::stdin()))
    } else {
        let file = std::fs::File::open(&args.file)
            .map_err(|e| StartupError::Other(format!("reading {}: {e}", args.file.display())))?;
        Box::new(std::io::BufReader::new(file))
    };
    let config = &args.config;
    let counts = with_admin_db(config, async |pool, hasher| {
        // Nothing is hashed here: the hashes come with the users.
        let accounts = AccountService::new(
            pool,
            hasher,
            config.email_verification_ttl,
            config.password_reset_ttl,
        );
        read_lines(&accounts, reader, args.batch_size as usize)
            .await
            .map_err(StartupError::Database)
    })
    .await;
    let (imported, already, refused) = counts?;
    println!("imported {imported}, already there {already}, refused {refused}");
    if refused > 0 {
        return Err(StartupError::Other(format!(
            "{refused} line(s) refused; fix them and run the import again"
        )));
    }
    Ok(())
}

/// Reads the JSON Lines of `identity import` in batches of `batch_size`
/// users and hands each batch to the service; prints one line per refused
/// line and a running count. Returns (imported, already there, refused).
async fn read_lines(
    accounts: &crate::service::accounts::AccountService,
    reader: impl std::io::BufRead,
    batch_size: usize,
) -> Result<(usize, usize, usize), Error> {
    use crate::service::import::{ImportOutcome, ImportedUser};
    let (mut imported, mut already, mut refused) = (0usize, 0usize, 0usize);
    let mut lines = reader.lines().enumerate().peekable();
    while lines.peek().is_some() {
        // One batch: parsed lines go to the service, unreadable ones are
        // refused here; both are reported by line number.
        let mut batch: Vec<(usize, ImportedUser)> = Vec::new();
        for (n, line) in lines.by_ref() {
            let number = n + 1;
            let line = line.map_err(|e| Error::internal(format!("reading line {number}: {e}")))?;
            if line.trim().is_empty() {
                continue;
            }
            match serde_json::from_str::<ImportedUser>(&line) {
                Ok(user) => batch.push((number, user)),
                Err(e) => {
                    refused += 1;
                    println!("line {number}: refused: not a valid user object: {e}");
                }
            }
            if batch.len() == batch_size {
                break;
            }
        }
        if batch.is_empty() {
            continue;
        }
        let (numbers, users): (Vec<usize>, Vec<ImportedUser>) = batch.into_iter().unzip();
        let outcomes =
            crate::service::audit::within(command_origin("identity import"), None, async {
                accounts.import(users).await
            })
            .await?;
        for (number, outcome) in numbers.iter().zip(outcomes) {
            match outcome {
                ImportOutcome::Imported(_) => imported += 1,
                ImportOutcome::AlreadyImported(_) => already += 1,
                ImportOutcome::Refused(why) => {
                    refused += 1;
                    println!("line {number}: refused: {why}");
                }
            }
        }
        eprintln!(
            "up to line {}: {imported} imported, {already} already there, {refused} refused",
            numbers.last().copied().unwrap_or(0)
        );
    }
    Ok((imported, already, refused))
}

/// The origin the change feed records for a command run by an operator:
/// no actor (no user signed in), the command as the RPC.
pub(super) fn command_origin(command: &str) -> crate::db::changes::Origin {
    crate::db::changes::Origin {
        actor_id: None,
        rpc: command.to_owned(),
        request_id: uuid::Uuid::now_v7().to_string(),
        announce: false,
    }
}
