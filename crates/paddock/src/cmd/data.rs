//! `paddock data`: what the apps keep in the farm's database (their buckets and their users'
//! sessions), looked at and mended by hand.

use std::io::{Read as _, Write as _};
use std::path::PathBuf;

use anyhow::Context as _;
use paddock_api::{DataKeys, DataSummary};
use paddock_controller::data::SessionsEnded;

use super::admin::Client;

#[derive(clap::Subcommand)]
pub enum DataCommand {
    /// What an app keeps: its buckets (keys, bytes) and its sessions.
    Show { app: String },
    /// A bucket's keys, in order.
    Keys {
        app: String,
        /// The bucket (default: the app's default bucket, `store.open("")`).
        #[arg(long, default_value = "")]
        bucket: String,
        /// Start after this key (the last one of the page before).
        #[arg(long)]
        after: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: u64,
    },
    /// A value, written to stdout as it is stored.
    Get {
        app: String,
        key: String,
        #[arg(long, default_value = "")]
        bucket: String,
    },
    /// Stores a value: VALUE, or the bytes of --file (`-` for stdin).
    Set {
        app: String,
        key: String,
        #[arg(required_unless_present = "file", conflicts_with = "file")]
        value: Option<String>,
        #[arg(long, value_name = "PATH")]
        file: Option<PathBuf>,
        #[arg(long, default_value = "")]
        bucket: String,
    },
    /// Deletes a key (nothing happens if it is not there).
    Delete {
        app: String,
        key: String,
        #[arg(long, default_value = "")]
        bucket: String,
    },
    /// Ends every session of an app: each of its users starts anew (logged out).
    EndSessions { app: String },
}

pub async fn data(client: &Client, command: DataCommand) -> anyhow::Result<()> {
    match command {
        DataCommand::Show { app } => {
            let summary: DataSummary = client.get(&format!("/v1/apps/{app}/data")).await?;
            client.print(&summary, |s| {
                println!("{:<24} {:>10} {:>12}", "BUCKET", "KEYS", "BYTES");
                for b in &s.buckets {
                    let name = if b.name.is_empty() {
                        "(default)"
                    } else {
                        &b.name
                    };
                    println!("{name:<24} {:>10} {:>12}", b.keys, b.bytes);
                }
                println!(
                    "sessions: {} live, {} expired (swept within a minute); their values: {} keys, {} bytes",
                    s.live_sessions, s.expired_sessions, s.session_keys, s.session_bytes
                );
            })
        }
        DataCommand::Keys {
            app,
            bucket,
            after,
            limit,
        } => {
            let limit = limit.to_string();
            let mut query = vec![("bucket", bucket.as_str()), ("limit", limit.as_str())];
            if let Some(after) = &after {
                query.push(("after", after));
            }
            let page: DataKeys = client
                .get_query(&format!("/v1/apps/{app}/data/keys"), &query)
                .await?;
            client.print(&page, |page| {
                for key in &page.keys {
                    println!("{key}");
                }
                if let (true, Some(last)) = (page.more, page.keys.last()) {
                    eprintln!("(more: --after {last:?})");
                }
            })
        }
        DataCommand::Get { app, key, bucket } => {
            let value = client
                .get_bytes(
                    &format!("/v1/apps/{app}/data/value"),
                    &[("bucket", &bucket), ("key", &key)],
                )
                .await?;
            std::io::stdout()
                .write_all(&value)
                .context("writing the value to stdout")
        }
        DataCommand::Set {
            app,
            key,
            value,
            file,
            bucket,
        } => {
            let bytes = match (value, file) {
                (Some(value), _) => value.into_bytes(),
                (None, Some(path)) if path.as_os_str() == "-" => {
                    let mut bytes = Vec::new();
                    std::io::stdin()
                        .read_to_end(&mut bytes)
                        .context("reading the value from stdin")?;
                    bytes
                }
                (None, Some(path)) => {
                    std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?
                }
                (None, None) => anyhow::bail!("give VALUE or --file"),
            };
            let size = bytes.len();
            client
                .put_bytes(
                    &format!("/v1/apps/{app}/data/value"),
                    &[("bucket", &bucket), ("key", &key)],
                    bytes,
                )
                .await?;
            client.print(
                &serde_json::json!({"app": app, "bucket": bucket, "key": key, "bytes": size}),
                |_| println!("{app}: {key:?} set ({size} bytes)"),
            )
        }
        DataCommand::Delete { app, key, bucket } => {
            client
                .delete_query(
                    &format!("/v1/apps/{app}/data/value"),
                    &[("bucket", &bucket), ("key", &key)],
                )
                .await?;
            client.print(
                &serde_json::json!({"app": app, "bucket": bucket, "key": key, "deleted": true}),
                |_| println!("{app}: {key:?} deleted"),
            )
        }
        DataCommand::EndSessions { app } => {
            let ended: SessionsEnded = client
                .delete_json(&format!("/v1/apps/{app}/sessions"))
                .await?;
            client.print(&ended, |e| {
                println!("{}: {} session(s) ended", e.app, e.ended)
            })
        }
    }
}
