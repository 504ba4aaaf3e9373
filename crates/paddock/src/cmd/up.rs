//! `paddock up`: a whole farm on one machine — the controller (SQLite), a balancer and N
//! front-ends, as child processes of this one, stopped together on Ctrl-C or SIGTERM.
//!
//! A process that exits once the farm is up is started again after [`RESTART_DELAY`], as a
//! service manager would (the balancer routes around a front-end meanwhile); a start that fails
//! counts as an exit, and a process that ends [`QUICK_EXITS`] times in a row within [`QUICK`] of
//! its start stops the farm, naming it.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;

#[derive(clap::Args)]
pub struct UpArgs {
    /// How many front-ends to start.
    #[arg(long, default_value_t = 2)]
    frontends: u16,
    /// Where the farm keeps its database, tokens and caches.
    #[arg(long, default_value = ".paddock", env = "PADDOCK_DATA")]
    data: PathBuf,
    /// The controller's port.
    #[arg(long, default_value_t = 7070)]
    controller_port: u16,
    /// The first front-end's port; the others take the ports after it.
    #[arg(long, default_value_t = 8081)]
    frontend_port: u16,
    /// The balancer's port: where users send requests.
    #[arg(long, default_value_t = 8000)]
    balancer_port: u16,
    /// The balancer's admin port (/metrics).
    #[arg(long, default_value_t = 9180)]
    balancer_admin_port: u16,
}

/// How long a process of the farm that exited waits before it is started again.
const RESTART_DELAY: Duration = Duration::from_secs(2);
/// An exit within this time of the start counts as the process not starting.
const QUICK: Duration = Duration::from_secs(10);
/// Quick exits in a row after which the farm stops instead of starting it once more.
const QUICK_EXITS: u32 = 3;

/// One process of the farm, and how to start it again.
struct Member {
    name: String,
    args: Vec<String>,
    env: Vec<(&'static str, String)>,
    /// None while it waits to be started again.
    child: Option<Child>,
    started: Instant,
    /// Exits in a row, each within [`QUICK`] of its start.
    quick_exits: u32,
    restart_at: Option<Instant>,
}

impl Member {
    /// A member not started yet.
    fn new(name: &str, args: Vec<String>, env: Vec<(&'static str, String)>) -> Member {
        Member {
            name: name.to_string(),
            args,
            env,
            child: None,
            started: Instant::now(),
            quick_exits: 0,
            restart_at: None,
        }
    }

    fn start(
        exe: &Path,
        name: &str,
        args: Vec<String>,
        env: Vec<(&'static str, String)>,
    ) -> anyhow::Result<Member> {
        let mut member = Member::new(name, args, env);
        member.child = Some(spawn(exe, name, &member.args, &member.env)?);
        Ok(member)
    }

    fn child(&mut self) -> &mut Child {
        self.child
            .as_mut()
            .expect("a member is started before the farm is up")
    }

    /// Once the farm is up: notices an exit and starts the process again (from `exe`) when its
    /// time has come; the reason to stop the farm when it keeps exiting.
    fn watch(&mut self, exe: &Path) -> anyhow::Result<Option<String>> {
        if let Some(child) = &mut self.child {
            let Some(status) = child.try_wait()? else {
                return Ok(None);
            };
            self.child = None;
            return Ok(self.ended(
                format!("exited ({status})"),
                "fix what its log above says".into(),
            ));
        }
        if self.restart_at.is_some_and(|at| at <= Instant::now()) {
            self.restart_at = None;
            self.started = Instant::now();
            match spawn(exe, &self.name, &self.args, &self.env) {
                Ok(child) => {
                    eprintln!("started {} again (pid {})", self.name, child.id());
                    self.child = Some(child);
                }
                Err(e) => {
                    let what = format!("could not be started ({e:#})");
                    let fix = format!("put a paddock build back at {}", exe.display());
                    return Ok(self.ended(what, fix));
                }
            }
        }
        Ok(None)
    }

    /// Counts an end (`what` says how it ended, `fix` what to do if it keeps ending so) and sets
    /// the next start; the reason to stop the farm when it keeps ending.
    fn ended(&mut self, what: String, fix: String) -> Option<String> {
        self.quick_exits = quick_exits_after(self.quick_exits, self.started.elapsed());
        if self.quick_exits >= QUICK_EXITS {
            return Some(format!(
                "{} ended {} times in a row within {}s of its start (last: it {what}); {fix}, then run `paddock up` again",
                self.name,
                self.quick_exits,
                QUICK.as_secs()
            ));
        }
        eprintln!(
            "{} {what}; starting it again in {}s",
            self.name,
            RESTART_DELAY.as_secs()
        );
        self.restart_at = Some(Instant::now() + RESTART_DELAY);
        None
    }
}

/// Quick exits in a row, once a process that had `before` of them exits `ran` after its start.
fn quick_exits_after(before: u32, ran: Duration) -> u32 {
    if ran < QUICK { before + 1 } else { 0 }
}

struct Farm {
    children: Vec<Member>,
}

impl Drop for Farm {
    fn drop(&mut self) {
        for child in self.children.iter_mut().filter_map(|m| m.child.as_mut()) {
            // One that has exited is not signalled: its process id may be another's by now.
            if let Ok(Some(_)) = child.try_wait() {
                continue;
            }
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
        }
        for member in &mut self.children {
            let Member {
                name,
                child: Some(child),
                ..
            } = member
            else {
                continue;
            };
            let deadline = Instant::now() + Duration::from_secs(40);
            loop {
                match child.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(50))
                    }
                    _ => {
                        eprintln!("{name} did not stop in time; killing it");
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                }
            }
        }
    }
}

/// Starts a child whose output is relayed line by line, tagged with `name`.
fn spawn(
    exe: &Path,
    name: &str,
    args: &[String],
    env: &[(&'static str, String)],
) -> anyhow::Result<Child> {
    let mut child = Command::new(exe)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {name} from {}", exe.display()))?;
    for stream in [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let name = name.to_string();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                eprintln!("[{name}] {line}");
            }
        });
    }
    Ok(child)
}

/// How a started process proves it is up, and that it is this farm's (not another process that
/// held the port): the controller takes the admin token; a front-end's health, and the
/// balancer's status, name it.
enum Ready<'a> {
    Controller { url: &'a str, admin_token: &'a str },
    Named { url: String, name: &'a str },
}

impl Ready<'_> {
    async fn check(&self, http: &reqwest::Client) -> bool {
        let request = match self {
            Ready::Controller { url, admin_token } => http
                .get(format!("{url}/v1/status"))
                .bearer_auth(admin_token),
            Ready::Named { url, .. } => http.get(url),
        };
        let Ok(response) = request.timeout(Duration::from_secs(2)).send().await else {
            return false;
        };
        match self {
            Ready::Controller { .. } => response.status().is_success(),
            Ready::Named { name, .. } => response
                .json::<serde_json::Value>()
                .await
                .is_ok_and(|v| v["server"] == *name || v["name"] == *name),
        }
    }
}

/// Waits until a child answers as this farm's; fails if it exits first (a port in use, ...).
async fn wait_ready(
    http: &reqwest::Client,
    name: &str,
    child: &mut Child,
    ready: Ready<'_>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if ready.check(http).await {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            anyhow::bail!("{name} exited ({status}) before it was ready; its log is above");
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{name} did not answer within 60s; its log is above"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn wait_for_file(path: &Path, child: &mut Child) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(text) = std::fs::read_to_string(path)
            && !text.trim().is_empty()
        {
            return Ok(text.trim().to_string());
        }
        if let Some(status) = child.try_wait()? {
            anyhow::bail!("the controller exited ({status}) before it was ready; its log is above");
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the controller did not write {} within 60s",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn up(args: UpArgs) -> anyhow::Result<()> {
    if args.frontends == 0 {
        anyhow::bail!("--frontends 0: a farm needs at least one front-end");
    }
    if args.frontend_port.checked_add(args.frontends - 1).is_none() {
        anyhow::bail!(
            "--frontend-port {} leaves no room for {} front-ends at ports up to 65535: give a lower one",
            args.frontend_port,
            args.frontends
        );
    }
    std::fs::create_dir_all(&args.data)
        .with_context(|| format!("creating {}", args.data.display()))?;
    let data = args.data.canonicalize()?;
    let controller_dir = data.join("controller");
    let controller_url = format!("http://127.0.0.1:{}", args.controller_port);
    // Its path now: a platform upgrade renames a new build over it, and a process started
    // again later runs that one (`current_exe` would then name the replaced file, gone).
    let exe = std::env::current_exe().context("finding the paddock binary")?;
    let mut farm = Farm {
        children: Vec::new(),
    };

    let db = format!("sqlite://{}", data.join("paddock.db").display());
    let controller = Member::start(
        &exe,
        "controller",
        vec![
            "controller".into(),
            "--listen".into(),
            format!("127.0.0.1:{}", args.controller_port),
            "--db".into(),
            db.clone(),
            "--data".into(),
            controller_dir.display().to_string(),
            // One machine, one executable, started by whoever runs this: `paddock upgrade`
            // installs a new one over it.
            "--platform-upgrades".into(),
        ],
        Vec::new(),
    )?;
    farm.children.push(controller);
    let join_token = wait_for_file(&controller_dir.join("join.token"), farm.children[0].child())?;
    let admin_token = wait_for_file(
        &controller_dir.join("admin.token"),
        farm.children[0].child(),
    )?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let http = reqwest::Client::new();
    runtime.block_on(wait_ready(
        &http,
        "the controller",
        farm.children[0].child(),
        Ready::Controller {
            url: &controller_url,
            admin_token: &admin_token,
        },
    ))?;

    let mut frontends = Vec::new();
    let mut waiting = Vec::new();
    for i in 1..=args.frontends {
        let name = format!("fe-{i}");
        let port = args.frontend_port + i - 1;
        let mut member = Member::start(
            &exe,
            &name,
            vec![
                "frontend".into(),
                "--name".into(),
                name.clone(),
                "--listen".into(),
                format!("127.0.0.1:{port}"),
                "--data".into(),
                data.join(&name).display().to_string(),
                "--controller".into(),
                controller_url.clone(),
                // The apps' data and sessions, in the farm's database.
                "--db".into(),
                db.clone(),
            ],
            // Through the environment: a command line is readable by every local user.
            vec![("PADDOCK_JOIN_TOKEN", join_token.clone())],
        )?;
        let health = format!("http://127.0.0.1:{port}/_paddock/health");
        waiting.push((farm.children.len(), health));
        frontends.push(format!(
            "{name}: http://127.0.0.1:{port}/   (pid {})",
            member.child().id()
        ));
        farm.children.push(member);
    }

    let balancer_url = format!("http://127.0.0.1:{}", args.balancer_port);
    let access_log = data.join("lb-1").join("access.log");
    std::fs::create_dir_all(data.join("lb-1"))
        .with_context(|| format!("creating {}", data.join("lb-1").display()))?;
    let balancer = Member::start(
        &exe,
        "balancer",
        vec![
            "balancer".into(),
            "--name".into(),
            "lb-1".into(),
            "--listen".into(),
            format!("127.0.0.1:{}", args.balancer_port),
            "--admin".into(),
            format!("127.0.0.1:{}", args.balancer_admin_port),
            "--data".into(),
            data.join("lb-1").display().to_string(),
            "--controller".into(),
            controller_url.clone(),
            "--access-log".into(),
            access_log.display().to_string(),
        ],
        vec![("PADDOCK_JOIN_TOKEN", join_token.clone())],
    )?;
    let status = format!("http://127.0.0.1:{}/status", args.balancer_admin_port);
    waiting.push((farm.children.len(), status));
    farm.children.push(balancer);
    for (index, url) in waiting {
        let member = &mut farm.children[index];
        let name = member.name.clone();
        let expected = if name == "balancer" {
            "lb-1".to_string()
        } else {
            name.clone()
        };
        runtime.block_on(wait_ready(
            &http,
            &name,
            member.child(),
            Ready::Named {
                url,
                name: &expected,
            },
        ))?;
    }

    println!();
    println!(
        "Paddock farm is up ({} front-ends, data in {}):",
        args.frontends,
        data.display()
    );
    println!("  balancer:   {balancer_url}/   <- send your users here");
    println!(
        "              metrics: http://127.0.0.1:{}/metrics",
        args.balancer_admin_port
    );
    println!(
        "              access log: {} (one JSON line per request)",
        access_log.display()
    );
    println!("  controller: {controller_url}   (admin token: {admin_token})");
    println!("  console:    {controller_url}/#token={admin_token}   <- open in a browser");
    for f in &frontends {
        println!("  {f}");
    }
    println!();
    println!("Publish an app:   paddock app publish fixtures/apps/packages/hello-v1");
    println!("Call it:          curl {balancer_url}/hello");
    println!("See the farm:     paddock status   (and `paddock routing`)");
    println!("Stop: Ctrl-C");
    println!();

    let exited = runtime.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut watch = tokio::time::interval(Duration::from_millis(200));
        loop {
            tokio::select! {
                // A stop first: the processes had the signal too, and their exits are not
                // to be taken for ones to start again.
                biased;
                _ = term.recv() => return anyhow::Ok(None),
                _ = tokio::signal::ctrl_c() => return Ok(None),
                _ = watch.tick() => {
                    for member in &mut farm.children {
                        if let Some(why) = member.watch(&exe)? {
                            return Ok(Some(why));
                        }
                    }
                }
            }
        }
    })?;
    eprintln!("stopping the farm...");
    drop(farm);
    match exited {
        Some(why) => anyhow::bail!(why),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_exits_in_a_row_soon_after_the_start_stop_the_farm() {
        let soon = QUICK - Duration::from_millis(1);
        let late = QUICK;
        // A process that ran its while: nothing counted.
        assert_eq!(quick_exits_after(0, late), 0);
        // Three quick exits in a row reach the limit.
        let mut n = 0;
        for _ in 0..QUICK_EXITS {
            n = quick_exits_after(n, soon);
        }
        assert_eq!(n, QUICK_EXITS);
        // Two quick, one that ran its while, two quick: not in a row.
        let mut n = 0;
        for ran in [soon, soon, late, soon, soon] {
            n = quick_exits_after(n, ran);
        }
        assert_eq!(n, 2);
        assert!(n < QUICK_EXITS);
    }

    #[test]
    fn starts_that_fail_stop_the_farm_saying_what_to_put_back() {
        let gone = Path::new("/nonexistent/paddock");
        let mut member = Member::new("fe-1", vec!["frontend".into()], Vec::new());
        let mut said = Vec::new();
        for _ in 0..QUICK_EXITS {
            member.restart_at = Some(Instant::now());
            said.push(member.watch(gone).unwrap());
        }
        assert!(said[..2].iter().all(Option::is_none), "{said:?}");
        let why = said[2].as_deref().unwrap_or_default();
        assert!(why.contains("fe-1 ended 3 times in a row"), "{why}");
        assert!(why.contains("could not be started"), "{why}");
        assert!(why.contains("/nonexistent/paddock"), "{why}");
        assert!(why.contains("put a paddock build back"), "{why}");
        assert!(member.child.is_none());
    }
}
