//! `paddock cache`: the front-ends' response caches, purged farm-wide and looked at.

use std::time::{Duration, Instant};

use paddock_api::{PurgeAnswer, PurgeRequest};
use paddock_controller::api::Status;

use super::admin::Client;

#[derive(clap::Subcommand)]
pub enum CacheCommand {
    /// Drops an app's cached responses on every front-end: those with a tag (`--tag`, the
    /// tags its answers named in `paddock-cache-tag`), or all of them. Waits until every live
    /// front-end that keeps a cache reports the purge applied.
    Purge {
        app: String,
        /// Only the responses with this tag (repeat for several).
        #[arg(long = "tag", value_name = "TAG")]
        tags: Vec<String>,
        /// Return once the purge is in the farm's purge log, without waiting for the servers.
        #[arg(long)]
        no_wait: bool,
        /// How long to wait for the servers.
        #[arg(long, default_value = "30s", value_parser = crate::duration)]
        timeout: Duration,
    },
    /// Each front-end's response cache: entries, bytes, hits and misses, the last purge
    /// applied, and whether it serves from its cache now.
    Status,
}

pub async fn cache(client: &Client, command: CacheCommand) -> anyhow::Result<()> {
    match command {
        CacheCommand::Purge {
            app,
            tags,
            no_wait,
            timeout,
        } => {
            let answer: PurgeAnswer = client
                .post(
                    &format!("/v1/apps/{app}/cache/purge"),
                    &PurgeRequest { tags },
                )
                .await?;
            if !client.json {
                let what = if answer.tags.is_empty() {
                    "every cached response".to_string()
                } else {
                    format!("tag(s) {}", answer.tags.join(", "))
                };
                println!("purge {} of {}: {what}", answer.purge, answer.app);
            }
            if !no_wait {
                wait_applied(client, &answer, timeout).await?;
            }
            if client.json {
                client.print(&answer, |_| {})?;
            }
            Ok(())
        }
        CacheCommand::Status => {
            let status: Status = client.get("/v1/status").await?;
            let servers: Vec<_> = status.servers.iter().filter(|s| s.alive).collect();
            let reports: Vec<_> = servers
                .iter()
                .map(|s| {
                    (
                        s.server.name.clone(),
                        s.server.observed.as_ref().and_then(|o| o.cache.clone()),
                    )
                })
                .collect();
            client.print(&reports, |reports| {
                println!(
                    "{:<16} {:>8} {:>10} {:>10} {:>10} {:>10} {:>8}  STATE",
                    "SERVER", "ENTRIES", "MIB", "OF MIB", "HITS", "MISSES", "PURGED"
                );
                for (name, report) in reports {
                    match report {
                        None => println!("{name:<16} (keeps no response cache)"),
                        Some(r) => println!(
                            "{name:<16} {:>8} {:>10.1} {:>10.0} {:>10} {:>10} {:>8}  {}",
                            r.entries,
                            r.bytes as f64 / 1048576.0,
                            r.max_bytes as f64 / 1048576.0,
                            r.hits,
                            r.misses,
                            r.purged,
                            r.off
                                .as_deref()
                                .map_or("on".to_string(), |why| format!("off: {why}"))
                        ),
                    }
                }
            })
        }
    }
}

/// Waits until every live front-end that keeps a cache reports the purge applied. A front-end
/// whose cache is off serves nothing from it, and starts empty when it comes back: that counts
/// too, when said in a report received after the purge was written.
async fn wait_applied(
    client: &Client,
    purge: &PurgeAnswer,
    timeout: Duration,
) -> anyhow::Result<()> {
    let id = purge.purge;
    let started = Instant::now();
    loop {
        let status: Status = client.get("/v1/status").await?;
        let mut applied = Vec::new();
        let mut waiting = Vec::new();
        let mut off = Vec::new();
        for s in status.servers.iter().filter(|s| s.alive) {
            let Some(report) = s.server.observed.as_ref().and_then(|o| o.cache.as_ref()) else {
                continue;
            };
            let recent = s.server.heartbeat_ms.is_some_and(|at| at >= purge.at_ms);
            if report.off.is_some() && recent {
                off.push(s.server.name.clone());
            } else if report.off.is_none() && report.purged >= id {
                applied.push(s.server.name.clone());
            } else {
                waiting.push(s.server.name.clone());
            }
        }
        if waiting.is_empty() {
            if !client.json {
                if applied.is_empty() && off.is_empty() {
                    println!("no live front-end keeps a response cache");
                } else if !applied.is_empty() {
                    println!(
                        "applied by {} front-end(s) in {:.1}s: {}",
                        applied.len(),
                        started.elapsed().as_secs_f64(),
                        applied.join(", ")
                    );
                }
                if !off.is_empty() {
                    println!(
                        "cache off (serving nothing from it, empty when it comes back): {}",
                        off.join(", ")
                    );
                }
            }
            return Ok(());
        }
        if started.elapsed() > timeout {
            anyhow::bail!(
                "purge {id} not reported applied by {} within {timeout:?}; it is in the farm's purge log, and each front-end applies it when it reads the log (`paddock cache status` shows where they are)",
                waiting.join(", ")
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
