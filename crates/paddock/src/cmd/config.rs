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
    },
    /// Removes the override of KEY: the manifest's value (or none) applies again.
    Unset { app: String, key: String },
}

pub async fn config(client: &Client, command: ConfigCommand) -> anyhow::Result<()> {
    let answer: AppConfig = match &command {
        ConfigCommand::Show { app } => client.get(&format!("/v1/apps/{app}/config")).await?,
        ConfigCommand::Set { app, key, value } => {
            client
                .put(
                    &format!("/v1/apps/{app}/config/{key}"),
                    &SetConfig {
                        value: value.clone(),
                    },
                )
                .await?
        }
        ConfigCommand::Unset { app, key } => {
            client
                .delete_json(&format!("/v1/apps/{app}/config/{key}"))
                .await?
        }
    };
    client.print(&answer, |c| {
        if let Some(generation) = c.generation {
            println!(
                "{}: generation {generation}; each front-end swaps in {} with the new config (requests running keep the old)",
                c.app, c.version
            );
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
