//! `paddock timer`: the app timers of the farm, their runs, and "run now".

use paddock_api::{TimerInfo, TimerRun};
use paddock_core::TimerSchedule;

use super::admin::Client;

#[derive(clap::Subcommand)]
pub enum TimerCommand {
    /// Every timer of the deployed versions: schedule, next tick, where it runs now.
    List,
    /// The newest runs of a timer: server, tick, start, duration, outcome, retry.
    Runs {
        app: String,
        timer: String,
        #[arg(long, default_value_t = 20)]
        limit: i64,
    },
    /// Make a timer due now (the console's "Run Now"): a scheduler that is on runs it next.
    Run { app: String, timer: String },
}

pub async fn timer(client: &Client, command: TimerCommand) -> anyhow::Result<()> {
    match command {
        TimerCommand::List => {
            let timers: Vec<TimerInfo> = client.get("/v1/timers").await?;
            client.print(&timers, |timers| {
                println!(
                    "{:<16} {:<20} {:<10} {:<10} {:<16} {:<24} RUNNING ON",
                    "APP", "TIMER", "ZONE", "VERSION", "SCHEDULE", "NEXT TICK (UTC)"
                );
                for t in timers {
                    let schedule = match &t.schedule {
                        TimerSchedule::Cron(expr) => expr.clone(),
                        TimerSchedule::Every(every) => {
                            format!("every {}", humantime::format_duration(*every))
                        }
                    };
                    println!(
                        "{:<16} {:<20} {:<10} {:<10} {:<16} {:<24} {}",
                        t.app,
                        t.timer,
                        t.zone,
                        t.version,
                        schedule,
                        super::admin::timestamp(t.next_ms),
                        t.running_on.as_deref().unwrap_or("-")
                    );
                }
            })
        }
        TimerCommand::Runs { app, timer, limit } => {
            let runs: Vec<TimerRun> = client
                .get(&format!("/v1/timers/{app}/{timer}/runs?limit={limit}"))
                .await?;
            client.print(&runs, |runs| {
                println!(
                    "{:>6} {:<12} {:<24} {:>9} {:>9} {:<8} {:<5} DETAIL",
                    "RUN", "SERVER", "TICK (UTC)", "DELAY", "DURATION", "OUTCOME", "RETRY"
                );
                for r in runs {
                    println!(
                        "{:>6} {:<12} {:<24} {:>6} ms {:>9} {:<8} {:<5} {}",
                        r.id,
                        r.server,
                        super::admin::timestamp(r.tick_ms),
                        r.started_ms - r.tick_ms,
                        r.ended_ms
                            .map(|e| format!("{} ms", e - r.started_ms))
                            .unwrap_or_else(|| "…".into()),
                        r.outcome,
                        if r.retry { "yes" } else { "no" },
                        r.detail.as_deref().unwrap_or("")
                    );
                }
            })
        }
        TimerCommand::Run { app, timer } => {
            client
                .post::<_, ()>(&format!("/v1/timers/{app}/{timer}/run"), &())
                .await?;
            client.print(
                &serde_json::json!({"app": app, "timer": timer, "due_now": true}),
                |_| println!("{app}/{timer} is due now; a front-end whose scheduler is on runs it"),
            )
        }
    }
}
