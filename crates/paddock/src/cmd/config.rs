//! `paddock config`: an app's `[config]` as its instances get it, and run-time overrides of it
//! that apply without a new version.

use paddock_controller::config::{AppConfig, SetConfig};

use super::admin::Client;

#[derive(clap::Subcommand)]
pub enum ConfigCommand {
    /// The app's config: each key's value and where it comes from (the manifest or an override).
    Show { app: String },
    /// Overrides KEY with VALUE for every version of the app, at once, without a new version.
    Set {
        app: String,
        key: String,
        value: String,
        #[command(flatten)]
        wait: Wait,
    },
    /// Removes the override of KEY: the manifest's value (or none) applies again.
    Unset {
        app: String,
        key: String,
        #[command(flatten)]
        wait: Wait,
    },
}

#[derive(clap::Args)]
pub struct Wait {
    /// Return once every live front-end of the app's zone (deployment on) reports running the
    /// app with the new config.
    #[arg(long)]
    wait: bool,
    /// How long --wait waits before it fails, naming the front-ends that have not.
    #[arg(long, default_value = "60s", value_parser = crate::positive_duration)]
    timeout: std::time::Duration,
}

pub async fn config(client: &Client, command: ConfigCommand) -> anyhow::Result<()> {
    // The key goes in the URL's path: a name that is no variable name is refused here, before
    // a `#` or `?` in it could make it another key on the way.
    if let ConfigCommand::Set { key, .. } | ConfigCommand::Unset { key, .. } = &command
        && !paddock_core::manifest::is_config_key(key)
    {
        anyhow::bail!(
            "config key {key:?}: use an environment variable name (a letter or '_', then letters, digits and '_', at most 128), not starting with PADDOCK_; nothing changed"
        );
    }
    let answer: AppConfig = match &command {
        ConfigCommand::Show { app } => client.get(&format!("/v1/apps/{app}/config")).await?,
        ConfigCommand::Set {
            app, key, value, ..
        } => {
            client
                .put(
                    &format!("/v1/apps/{app}/config/{key}"),
                    &SetConfig {
                        value: value.clone(),
                    },
                )
                .await?
        }
        ConfigCommand::Unset { app, key, .. } => {
            client
                .delete_json(&format!("/v1/apps/{app}/config/{key}"))
                .await?
        }
    };
    let answer = match &command {
        ConfigCommand::Set { wait, .. } | ConfigCommand::Unset { wait, .. } if wait.wait => {
            wait_applied(client, answer, wait.timeout).await?
        }
        _ => answer,
    };
    client.print(&answer, |c| {
        if let Some(generation) = c.generation {
            println!(
                "{}: generation {generation}; each front-end swaps in {} with the new config (requests running keep the old)",
                c.app, c.version
            );
            if !c.deployed {
                println!("{} is not deployed: the config applies when it is", c.app);
            } else if c.waiting_for.is_empty() {
                println!("every front-end of its zone runs it with this config");
            }
        }
        if c.deployed && !c.waiting_for.is_empty() {
            println!("waiting for: {}", c.waiting_for.join(", "));
        }
        println!("{:<32} {:<10} VALUE", "KEY", "FROM");
        for (key, value) in &c.effective {
            let from = if c.overrides.contains_key(key) {
                if c.manifest.contains_key(key) {
                    "override (manifest has its own)"
                } else {
                    "override"
                }
            } else {
                "manifest"
            };
            println!("{key:<32} {from:<10} {value}");
        }
    })
}

/// Polls the app's config until no front-end is left to take the change.
async fn wait_applied(
    client: &Client,
    mut answer: AppConfig,
    timeout: std::time::Duration,
) -> anyhow::Result<AppConfig> {
    let deadline = std::time::Instant::now() + timeout;
    while !answer.waiting_for.is_empty() {
        if std::time::Instant::now() >= deadline {
            anyhow::bail!(
                "the change stands, but after {} these front-ends do not report running {} with it yet: {} (`paddock servers` shows what they run; a front-end with deployment off takes it when turned on)",
                humantime::format_duration(timeout),
                answer.app,
                answer.waiting_for.join(", ")
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let generation = answer.generation;
        answer = client
            .get(&format!("/v1/apps/{}/config", answer.app))
            .await?;
        answer.generation = generation;
    }
    Ok(answer)
}
