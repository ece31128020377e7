//! `identity passwords`: the breached-password list of
//! BREACHED_PASSWORDS_FILE, made and checked offline. `build` converts Have
//! I Been Pwned's SHA-1 list into the compact file the service loads
//! fastest; `check` loads a list as the service would and says what it
//! holds. Neither touches the database.

use std::path::PathBuf;
use std::time::Instant;

use clap::{Args, Subcommand};

use crate::app::StartupError;
use crate::domain::{BreachedList, breached::ListFormat};

#[derive(Debug, Args)]
pub(super) struct PasswordsArgs {
    #[command(subcommand)]
    action: PasswordsAction,
}

#[derive(Debug, Subcommand)]
enum PasswordsAction {
    /// Converts a list of `HASH:COUNT` lines (Have I Been Pwned's SHA-1
    /// "Pwned Passwords", any order; blank lines and `\r\n` are fine) into
    /// OUTPUT, the file BREACHED_PASSWORDS_FILE loads fastest. OUTPUT is
    /// replaced atomically. Memory: 4 bytes an entry plus 4 MiB. Exits 1
    /// when INPUT cannot be read or has a malformed line (named by number).
    Build {
        /// The text list.
        input: PathBuf,
        /// The file to write.
        output: PathBuf,
        /// Keep only the passwords seen at least this many times (the
        /// count after the colon): how to fit the whole list (close to a
        /// billion entries, about 4 GB in memory) into less.
        #[arg(long, default_value = "1", value_parser = clap::value_parser!(u64).range(1..))]
        min_count: u64,
    },
    /// Loads FILE as the service would (either form) and prints its
    /// entries, the time the load took and the false-positive rate. Exits
    /// 1 when the service could not load it.
    Check {
        /// A text list or a built file.
        file: PathBuf,
    },
}

pub(super) async fn passwords(args: PasswordsArgs) -> Result<(), StartupError> {
    tokio::task::spawn_blocking(move || run(args.action))
        .await
        .map_err(|e| StartupError::Other(e.to_string()))?
}

fn run(action: PasswordsAction) -> Result<(), StartupError> {
    let failed = |e: crate::domain::breached::ListError| StartupError::Other(e.to_string());
    match action {
        PasswordsAction::Build {
            input,
            output,
            min_count,
        } => {
            let start = Instant::now();
            if crate::domain::breached::format_of(&input).map_err(failed)? == ListFormat::Built {
                return Err(StartupError::Other(format!(
                    "{}: already a built list",
                    input.display()
                )));
            }
            let (list, stats) = BreachedList::read_text(&input, min_count).map_err(failed)?;
            let read = start.elapsed();
            list.write_built_file(&output).map_err(failed)?;
            println!(
                "{} entries from {} lines ({} with a count of at least {min_count}), read in {:.2} s, written to {} in {:.2} s; false-positive rate {:.1e}",
                list.len(),
                stats.lines,
                stats.kept,
                read.as_secs_f64(),
                output.display(),
                (start.elapsed() - read).as_secs_f64(),
                list.false_positive_rate()
            );
        }
        PasswordsAction::Check { file } => {
            let start = Instant::now();
            let (list, format) = BreachedList::load(&file).map_err(failed)?;
            println!(
                "{} entries ({format}), loaded in {:.3} s; false-positive rate {:.1e}",
                list.len(),
                start.elapsed().as_secs_f64(),
                list.false_positive_rate()
            );
        }
    }
    Ok(())
}
