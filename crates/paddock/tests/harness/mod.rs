//! The end-to-end test harness: starts real `paddock` processes on loopback ports, gives tests
//! keep-alive HTTP connections to them, and reads their logs.
//!
//! Every wait here waits for a fact (a log line, a health report, a response), bounded by a
//! deadline that fails the test with what was seen.

#![allow(dead_code)] // each test binary uses its own subset

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper_util::rt::TokioIo;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;

pub const PADDOCK: &str = env!("CARGO_BIN_EXE_paddock");

/// The folder of the committed test app packages.
pub fn fixture(package: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/apps/packages")
        .join(package)
}

/// The step named `name` in an operation's JSON (`op list --json`, `/v1/operations/ID`).
pub fn op_step<'a>(op: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    op["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["step"] == name)
        .unwrap_or_else(|| panic!("no step {name}: {op:#}"))
}

/// How long a journaled step ran, in ms.
pub fn ran_ms(step: &serde_json::Value) -> i64 {
    step["ended_ms"].as_i64().unwrap() - step["started_ms"].as_i64().unwrap()
}

/// A file of the committed test certificates (`fixtures/tls/`, made by its `make.sh`).
pub fn tls_fixture(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/tls")
        .join(name)
        .display()
        .to_string()
}

/// A TLS connection to `addr` as `localhost`, offering HTTP/1.1 (ALPN), from a client that
/// trusts the certificates of the PEM file `trusted` (none: trusts nothing).
pub async fn tls_connect(
    addr: SocketAddr,
    trusted: Option<&str>,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    tls_connect_offering(addr, trusted, &[b"http/1.1"]).await
}

/// [`tls_connect`] offering these protocols, in order of preference.
pub async fn tls_connect_offering(
    addr: SocketAddr,
    trusted: Option<&str>,
    protocols: &[&[u8]],
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    if let Some(trusted) = trusted {
        roots
            .add(rustls::pki_types::CertificateDer::from_pem_file(trusted).unwrap())
            .unwrap();
    }
    let mut client = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    client.alpn_protocols = protocols.iter().map(|p| p.to_vec()).collect();
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(client))
        .connect(name, tcp)
        .await
}

/// A package folder of the `hello.wasm` of fixture package `source` with this `paddock.toml`.
pub fn hello_package(source: &str, manifest: &str) -> tempfile::TempDir {
    let package = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture(source).join("hello.wasm"),
        package.path().join("hello.wasm"),
    )
    .unwrap();
    std::fs::write(package.path().join("paddock.toml"), manifest).unwrap();
    package
}

/// Copies a fixture package into `dir/name`, atomically: a watcher sees all of it or none.
pub fn install_package(apps_dir: &Path, package: &str, name: &str) {
    let staging = apps_dir.join(format!(".staging-{name}"));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).unwrap();
    for file in std::fs::read_dir(fixture(package)).unwrap() {
        let file = file.unwrap();
        std::fs::copy(file.path(), staging.join(file.file_name())).unwrap();
    }
    std::fs::rename(&staging, apps_dir.join(name)).unwrap();
}

/// Replaces the files of an installed package with those of another fixture, each file by an
/// atomic rename (as a deployment script would).
pub fn replace_package(apps_dir: &Path, name: &str, package: &str) {
    for file in std::fs::read_dir(fixture(package)).unwrap() {
        let file = file.unwrap();
        write_atomically(
            &apps_dir.join(name).join(file.file_name()),
            &std::fs::read(file.path()).unwrap(),
        );
    }
}

/// `dir/bin/paddock`: a hard link (or a copy) of the executable under test, made if not there
/// yet, for a process that a test upgrades or restarts on a new build without touching the
/// build's own file.
pub fn own_paddock(dir: &Path) -> PathBuf {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let exe = bin.join("paddock");
    if !exe.exists() && std::fs::hard_link(PADDOCK, &exe).is_err() {
        std::fs::copy(PADDOCK, &exe).unwrap();
    }
    exe
}

/// What a test build ends with.
const BUILD_MARK: &[u8] = b"\n-- a Paddock build made by a test --\n";

/// A new build at `path`: the executable under test with [`BUILD_MARK`] appended. It runs the
/// same, and its sha256 (a build's identity) differs.
pub fn new_build(path: &Path) -> PathBuf {
    std::fs::copy(PADDOCK, path).unwrap();
    let mut file = std::fs::OpenOptions::new().append(true).open(path).unwrap();
    std::io::Write::write_all(&mut file, BUILD_MARK).unwrap();
    path.to_path_buf()
}

/// Whether the file (or `/proc/PID/exe`: what a process runs) is a [`new_build`].
pub fn is_new_build(path: &Path) -> bool {
    use std::io::{Read as _, Seek as _};
    let mut file = std::fs::File::open(path).unwrap();
    file.seek(std::io::SeekFrom::End(-(BUILD_MARK.len() as i64)))
        .unwrap();
    let mut tail = Vec::new();
    file.read_to_end(&mut tail).unwrap();
    tail == BUILD_MARK
}

/// This machine's host name, as processes report it.
pub fn host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .to_string()
}

/// Sends process `pid` a signal (`kill -SIGNAL PID`).
pub fn send_signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -{signal} {pid}");
}

/// Waits (at most `within`) for `child` to exit on its own; its exit status.
async fn wait_child_exit(child: &mut Child, name: &str, within: Duration) -> ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "{name} still runs after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn write_atomically(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("incoming");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Starts a `paddock` process whose stderr (its log) is appended to `log` and echoed with `name`.
fn spawn_logged(command: &mut Command, name: &str, log: &Arc<Mutex<String>>) -> Child {
    let mut child = command
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("start {name}: {e}"));
    let stderr = child.stderr.take().unwrap();
    let (log, name) = (log.clone(), name.to_string());
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            eprintln!("[{name}] {line}");
            let mut log = log.lock().unwrap();
            log.push_str(&line);
            log.push('\n');
        }
    });
    child
}

/// Waits until the log after byte `start` announces an address after each of `needles` (e.g.
/// `"listening on http://"`), and returns them in order. Fails if the process exits first.
async fn logged_addresses(
    name: &str,
    log: &Arc<Mutex<String>>,
    start: usize,
    child: &mut Child,
    needles: &[&str],
) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let found: Option<Vec<String>> = {
            let log = log.lock().unwrap();
            let after = &log[start..];
            needles
                .iter()
                .map(|needle| {
                    after.lines().find_map(|l| {
                        l.split(needle)
                            .nth(1)
                            .map(|a| a.split(['/', ' ']).next().unwrap_or("").to_string())
                    })
                })
                .collect()
        };
        if let Some(addresses) = found {
            return addresses;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("{name} exited ({status}); log:\n{}", log.lock().unwrap());
        }
        assert!(
            Instant::now() < deadline,
            "{name} did not start; log:\n{}",
            log.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// SIGKILL, and reap.
fn kill_child(child: &mut Option<Child>) {
    if let Some(mut child) = child.take() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// A running `paddock frontend` (with an apps folder, or following a controller).
pub struct Frontend {
    pub name: String,
    pub addr: SocketAddr,
    pub apps_dir: PathBuf,
    child: Child,
    log: Arc<Mutex<String>>,
    _dir: tempfile::TempDir,
}

pub struct FrontendBuilder {
    name: String,
    packages: Vec<(String, String)>,
    extra_args: Vec<String>,
    dir: Option<tempfile::TempDir>,
    wait_registered: bool,
    listen: Option<SocketAddr>,
    own_executable: bool,
}

impl FrontendBuilder {
    /// Runs from its own `paddock` executable (`<dir>/bin/paddock`, a hard link to the one under
    /// test), which a platform upgrade may replace without touching the build's.
    pub fn own_executable(mut self) -> Self {
        self.own_executable = true;
        self
    }

    /// Installs fixture `package` in the apps folder before start, under the folder name `name`.
    pub fn package(mut self, package: &str, name: &str) -> Self {
        self.packages.push((package.into(), name.into()));
        self
    }

    pub fn arg(mut self, arg: &str) -> Self {
        self.extra_args.push(arg.into());
        self
    }

    /// Follows `controller`'s desired state, in `zone`.
    pub fn controller(self, controller: &Controller, zone: &str) -> Self {
        self.controller_urls(&controller.url, &controller.join_token, zone)
    }

    /// Follows the controller at `urls` (several: the active one and its standbys), in `zone`.
    pub fn controller_urls(mut self, urls: &str, join_token: &str, zone: &str) -> Self {
        self.wait_registered = true;
        self.arg("--controller")
            .arg(urls)
            .arg("--join-token")
            .arg(join_token)
            .arg("--zone")
            .arg(zone)
    }

    /// Keeps the apps' data in `controller`'s database.
    pub fn db(self, controller: &Controller) -> Self {
        let url = controller.db_url.clone();
        self.arg("--db").arg(&url)
    }

    /// Does not wait for the front-end to register (its controller may be down).
    pub fn without_registration(mut self) -> Self {
        self.wait_registered = false;
        self
    }

    /// Listens on this address instead of a free port (to come back where it was).
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.listen = Some(addr);
        self
    }

    /// Starts with the folders (apps, data) of a front-end that ran before.
    pub fn reuse(mut self, dir: tempfile::TempDir) -> Self {
        self.dir = Some(dir);
        self
    }

    pub async fn start(self) -> Frontend {
        let wait_registered = self.wait_registered;
        let mut frontend = self.spawn();
        let line = frontend
            .wait_for_log("listening on http://", Duration::from_secs(120))
            .await;
        let addr = line.split("listening on http://").nth(1).unwrap();
        let addr = addr.split_whitespace().next().unwrap();
        frontend.addr = addr.parse().unwrap();
        if wait_registered {
            frontend
                .wait_for_log("registered with the controller", Duration::from_secs(30))
                .await;
        }
        frontend
    }

    /// Starts the process without waiting for it to listen (for one that must refuse to start).
    pub fn spawn(self) -> Frontend {
        let dir = match self.dir {
            Some(dir) => dir,
            None => tempfile::tempdir().unwrap(),
        };
        let apps_dir = dir.path().join("apps");
        std::fs::create_dir_all(&apps_dir).unwrap();
        for (package, name) in &self.packages {
            install_package(&apps_dir, package, name);
        }
        let exe = if self.own_executable {
            own_paddock(dir.path())
        } else {
            PathBuf::from(PADDOCK)
        };
        let mut command = Command::new(&exe);
        command
            .arg("frontend")
            .arg("--listen")
            .arg(
                self.listen
                    .map(|a| a.to_string())
                    .unwrap_or_else(|| "127.0.0.1:0".into()),
            )
            .args(["--name", &self.name]);
        if !self.extra_args.iter().any(|a| a == "--controller") {
            command.arg("--apps").arg(&apps_dir);
        }
        command
            .arg("--data")
            .arg(dir.path().join("data"))
            .args(["--scan-interval", "100ms"])
            .args(&self.extra_args);
        let log = Arc::new(Mutex::new(String::new()));
        let child = spawn_logged(&mut command, &self.name, &log);
        Frontend {
            name: self.name,
            addr: "127.0.0.1:0".parse().unwrap(),
            apps_dir,
            child,
            log,
            _dir: dir,
        }
    }
}

impl Frontend {
    pub fn builder(name: &str) -> FrontendBuilder {
        FrontendBuilder {
            name: name.into(),
            packages: Vec::new(),
            extra_args: Vec::new(),
            dir: None,
            wait_registered: false,
            listen: None,
            own_executable: false,
        }
    }

    /// The executable a front-end built with [`FrontendBuilder::own_executable`] runs from.
    pub fn own_exe(&self) -> PathBuf {
        self._dir.path().join("bin").join("paddock")
    }

    /// Its data folder (`--data`).
    pub fn data_dir(&self) -> PathBuf {
        self._dir.path().join("data")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits until a log line contains `needle` and returns that line.
    pub async fn wait_for_log(&self, needle: &str, timeout: Duration) -> String {
        self.wait_for_log_after(0, needle, timeout).await
    }

    /// Like `wait_for_log`, looking only at the log after byte `offset` (see `log_len`).
    pub async fn wait_for_log_after(
        &self,
        offset: usize,
        needle: &str,
        timeout: Duration,
    ) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            {
                let log = self.log.lock().unwrap();
                if let Some(line) = log[offset.min(log.len())..]
                    .lines()
                    .find(|l| l.contains(needle))
                {
                    return line.to_string();
                }
            }
            assert!(
                Instant::now() < deadline,
                "{}: no log line with {needle:?} within {timeout:?}; log:\n{}",
                self.name,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the process (SIGTERM, then waits) and hands back its folders for a restart.
    pub async fn stop(mut self) -> tempfile::TempDir {
        self.signal("TERM");
        self.wait_exit(Duration::from_secs(30)).await;
        let dir = tempfile::tempdir().unwrap();
        std::mem::replace(&mut self._dir, dir)
    }

    /// The version of `app` this front-end serves now, by its health report.
    pub async fn serving(&self, app: &str) -> Option<String> {
        let (_, report) = self.health().await;
        report["apps"]
            .as_array()?
            .iter()
            .find(|a| a["name"] == app)
            .and_then(|a| a["version"].as_str())
            .map(str::to_string)
    }

    /// Waits until the front-end serves `app` at `version` (by health and by a real request).
    pub async fn wait_serving(&self, app: &str, version: &str, path: &str) {
        self.wait_for_health(&format!("{app}@{version}"), Duration::from_secs(60), |h| {
            h["apps"].as_array().is_some_and(|apps| {
                apps.iter()
                    .any(|a| a["name"] == app && a["version"] == version)
            })
        })
        .await;
        let reply = self.connect().await.get(path).await.unwrap();
        assert_eq!(
            (reply.status, reply.version()),
            (200, Some(version)),
            "{}: {}",
            self.name,
            reply.body
        );
    }

    pub fn log_len(&self) -> usize {
        self.log.lock().unwrap().len()
    }

    pub async fn connect(&self) -> Conn {
        Conn::open(self.addr).await.expect("connect to front-end")
    }

    /// The parsed health report and its status code.
    pub async fn health(&self) -> (u16, serde_json::Value) {
        let reply = self.connect().await.get("/_paddock/health").await.unwrap();
        (reply.status, serde_json::from_str(&reply.body).unwrap())
    }

    /// Waits until the health report satisfies `check`.
    pub async fn wait_for_health(
        &self,
        what: &str,
        timeout: Duration,
        check: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            let (_, report) = self.health().await;
            if check(&report) {
                return report;
            }
            assert!(
                Instant::now() < deadline,
                "{}: health never showed {what} within {timeout:?}; last: {report}",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn signal(&self, signal: &str) {
        send_signal(self.child.id(), signal);
    }

    /// Waits for the process to exit on its own.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        wait_child_exit(&mut self.child, &self.name, timeout).await
    }
}

impl Drop for Frontend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One keep-alive HTTP/1.1 connection.
pub struct Conn {
    sender: hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
}

#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: String,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn version(&self) -> Option<&str> {
        self.header("x-paddock-version")
    }
}

impl Conn {
    pub async fn open(addr: SocketAddr) -> anyhow::Result<Conn> {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        Ok(Conn { sender })
    }

    pub async fn get(&mut self, path: &str) -> anyhow::Result<Reply> {
        self.get_with(path, &[]).await
    }

    /// A GET with these headers besides `Host`.
    pub async fn get_with(
        &mut self,
        path: &str,
        headers: &[(&str, &str)],
    ) -> anyhow::Result<Reply> {
        self.send(http::Method::GET, path, headers).await
    }

    pub async fn head(&mut self, path: &str) -> anyhow::Result<Reply> {
        self.send(http::Method::HEAD, path, &[]).await
    }

    async fn send(
        &mut self,
        method: http::Method,
        path: &str,
        headers: &[(&str, &str)],
    ) -> anyhow::Result<Reply> {
        self.sender
            .ready()
            .await
            .map_err(|e| anyhow::Error::new(e).context(NoResponse))?;
        let mut request = http::Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, "paddock.test");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request.body(Empty::new())?;
        let response = self
            .sender
            .send_request(request)
            .await
            .map_err(|e| anyhow::Error::new(e).context(NoResponse))?;
        let (parts, body) = response.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok(Reply {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    }
}

/// A request's connection closed (or failed) before any byte of a response came.
#[derive(Debug)]
pub struct NoResponse;

impl std::fmt::Display for NoResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("no response")
    }
}

/// Which database a controller uses.
#[derive(Clone, Copy, Debug)]
pub enum Db {
    Sqlite,
    Postgres,
}

/// A running `paddock controller`.
pub struct Controller {
    pub url: String,
    pub admin_token: String,
    pub join_token: String,
    db_url: String,
    data: PathBuf,
    child: Option<Child>,
    log: Arc<Mutex<String>>,
    extra_args: Vec<String>,
    exe: PathBuf,
    _dir: tempfile::TempDir,
}

impl Controller {
    pub async fn start(db: Db, test: &str, extra_args: &[&str]) -> Controller {
        Controller::start_from(db, test, extra_args, false).await
    }

    /// Runs from its own `paddock` executable (see [`Controller::own_exe`]), which a platform
    /// upgrade may replace without touching the build's.
    pub async fn start_own_executable(db: Db, test: &str, extra_args: &[&str]) -> Controller {
        Controller::start_from(db, test, extra_args, true).await
    }

    /// The executable it runs from.
    pub fn own_exe(&self) -> PathBuf {
        self.exe.clone()
    }

    async fn start_from(db: Db, test: &str, extra_args: &[&str], own: bool) -> Controller {
        let dir = tempfile::tempdir().unwrap();
        let exe = if own {
            own_paddock(dir.path())
        } else {
            PathBuf::from(PADDOCK)
        };
        let db_url = match db {
            Db::Sqlite => format!("sqlite://{}", dir.path().join("paddock.db").display()),
            Db::Postgres => {
                let base = std::env::var("PADDOCK_TEST_POSTGRES").expect(
                    "PADDOCK_TEST_POSTGRES is not set: run scripts/test.sh, which starts PostgreSQL",
                );
                let name = format!("farm_{test}_{}", std::process::id());
                let admin = paddock_store::SqlStore::open(&base).await.unwrap();
                admin
                    .execute_raw(&format!("DROP DATABASE IF EXISTS {name}"))
                    .await
                    .unwrap();
                admin
                    .execute_raw(&format!("CREATE DATABASE {name}"))
                    .await
                    .unwrap();
                let (prefix, _) = base.rsplit_once('/').unwrap();
                format!("{prefix}/{name}")
            }
        };
        let mut controller = Controller {
            url: String::new(),
            admin_token: String::new(),
            join_token: String::new(),
            db_url,
            data: dir.path().join("controller"),
            child: None,
            log: Arc::new(Mutex::new(String::new())),
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            exe,
            _dir: dir,
        };
        controller.launch("127.0.0.1:0").await;
        controller.admin_token = std::fs::read_to_string(controller.data.join("admin.token"))
            .unwrap()
            .trim()
            .into();
        controller.join_token = std::fs::read_to_string(controller.data.join("join.token"))
            .unwrap()
            .trim()
            .into();
        controller
    }

    async fn launch(&mut self, listen: &str) {
        let mut command = Command::new(&self.exe);
        command
            .args(["controller", "--listen", listen, "--db", &self.db_url])
            .arg("--data")
            .arg(&self.data)
            .args(&self.extra_args);
        let start = self.log.lock().unwrap().len();
        let child = self
            .child
            .insert(spawn_logged(&mut command, "controller", &self.log));
        let found = logged_addresses(
            "controller",
            &self.log,
            start,
            child,
            &["listening on http://"],
        )
        .await;
        self.url = format!("http://{}", found[0]);
    }

    /// The process id of the running controller.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the controller runs").id()
    }

    /// Waits (at most `within`) for the controller to exit on its own.
    pub async fn wait_exited(&mut self, within: Duration) -> ExitStatus {
        let child = self.child.as_mut().expect("the controller runs");
        let status = wait_child_exit(child, "the controller", within).await;
        self.child = None;
        status
    }

    /// Its log (stderr) so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits (at most `within`) until the controller's log (its stderr) contains `needle`.
    pub async fn wait_for_log(&self, needle: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let log = self.log.lock().unwrap().clone();
            if log.contains(needle) {
                return log;
            }
            assert!(
                Instant::now() < deadline,
                "the controller never logged {needle:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL: the controller dies at once, as on a crash.
    pub fn kill(&mut self) {
        kill_child(&mut self.child);
    }

    /// Starts it again on the same address and database.
    pub async fn restart(&mut self) {
        self.kill();
        let listen = self.url.trim_start_matches("http://").to_string();
        self.launch(&listen).await;
    }

    /// Runs a `paddock` admin command against this controller.
    pub fn cli(&self, args: &[&str]) -> CliOutput {
        run_cli(&self.url, &self.admin_token, args)
    }

    /// Starts a standby controller: this one's address, database and data folder (its tokens),
    /// with `--standby`; returns once it says it stands by. It listens only once it holds the
    /// controller role, so the CLI and the front-ends find it where they found this one.
    pub async fn start_standby(&self) -> Controller {
        self.start_standby_at(None).await
    }

    /// Like `start_standby`, listening at `listen` (an address of its own) if given.
    pub async fn start_standby_at(&self, listen: Option<&str>) -> Controller {
        self.launch_standby(listen, None).await
    }

    /// A standby at this controller's address, running from its own hard link of the
    /// executable, that follows this controller's platform builds (`--follow`, `--name`).
    pub async fn start_standby_following(&self, name: &str) -> Controller {
        self.launch_standby(None, Some(name)).await
    }

    async fn launch_standby(&self, listen: Option<&str>, follow_as: Option<&str>) -> Controller {
        let dir = tempfile::tempdir().unwrap();
        let listen = match listen {
            Some(listen) => listen.to_string(),
            None => self.url.trim_start_matches("http://").to_string(),
        };
        // One that follows the builds runs from its own executable, with its own data folder
        // holding copies of the tokens (not the builds the active controller keeps).
        let (exe, data) = match follow_as {
            Some(_) => {
                let data = dir.path().join("data");
                std::fs::create_dir_all(&data).unwrap();
                for token in ["admin.token", "join.token"] {
                    std::fs::copy(self.data.join(token), data.join(token)).unwrap();
                }
                (own_paddock(dir.path()), data)
            }
            None => (PathBuf::from(PADDOCK), self.data.clone()),
        };
        let mut command = Command::new(&exe);
        command
            .args([
                "controller",
                "--listen",
                &listen,
                "--db",
                &self.db_url,
                "--standby",
            ])
            .arg("--data")
            .arg(&data);
        if let Some(name) = follow_as {
            command.args(["--follow", &self.url, "--name", name, "--platform-upgrades"]);
        }
        let log = Arc::new(Mutex::new(String::new()));
        let child = spawn_logged(&mut command, "standby", &log);
        let standby = Controller {
            url: format!("http://{listen}"),
            admin_token: self.admin_token.clone(),
            join_token: self.join_token.clone(),
            db_url: self.db_url.clone(),
            data,
            child: Some(child),
            log,
            extra_args: vec!["--standby".into()],
            exe,
            _dir: dir,
        };
        standby
            .wait_for_log("standing by", Duration::from_secs(30))
            .await;
        standby
    }

    /// Starts a second controller on this one's database (its own address and data folder) and
    /// returns its stderr once it has exited, which it must within 30 s.
    pub async fn start_another(&self) -> String {
        let db_url = self.db_url.clone();
        tokio::task::spawn_blocking(move || {
            let data = tempfile::tempdir().unwrap();
            let mut child = Command::new(PADDOCK)
                .args(["controller", "--listen", "127.0.0.1:0", "--db", &db_url])
                .arg("--data")
                .arg(data.path())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            let deadline = Instant::now() + Duration::from_secs(30);
            while child.try_wait().unwrap().is_none() {
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let out = child.wait_with_output().unwrap();
                    panic!(
                        "a second controller kept running on the same database: {}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let out = child.wait_with_output().unwrap();
            assert!(!out.status.success());
            String::from_utf8_lossy(&out.stderr).into_owned()
        })
        .await
        .unwrap()
    }

    /// `GET path` of the admin API (`/v1/...`) with the admin token: the answer's text.
    pub async fn admin_get(&self, path: &str) -> String {
        self.get_with_token(path, &self.admin_token).await
    }

    /// `GET path` of the control channel (`/control/v1/...`) with the join token, as JSON.
    pub async fn control_get(&self, path: &str) -> serde_json::Value {
        serde_json::from_str(&self.get_with_token(path, &self.join_token).await).unwrap()
    }

    async fn get_with_token(&self, path: &str, token: &str) -> String {
        let response = reqwest::Client::new()
            .get(format!("{}{path}", self.url))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert!(
            response.status().is_success(),
            "GET {path}: {}",
            response.status()
        );
        response.text().await.unwrap()
    }

    /// The controller's store, opened beside it (to damage what a test needs damaged).
    pub async fn store(&self) -> paddock_store::SqlStore {
        paddock_store::SqlStore::open(&self.db_url).await.unwrap()
    }

    /// Like `cli`, on a blocking thread: for a command that runs while the test drives load.
    pub async fn cli_async(&self, args: &[&str]) -> CliOutput {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let (url, token) = (self.url.clone(), self.admin_token.clone());
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            run_cli(&url, &token, &args)
        })
        .await
        .unwrap()
    }

    /// A CLI command run with `--controller urls` (several: the first that answers).
    pub fn cli_at(&self, urls: &str, args: &[&str]) -> CliOutput {
        run_cli(urls, &self.admin_token, args)
    }

    /// Like `cli`, and the command must succeed.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.success,
            "paddock {args:?} failed: {}{}",
            out.stdout, out.stderr
        );
        out.stdout
    }

    /// Like `cli`, and the command must fail; returns its error output.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(!out.success, "paddock {args:?} should fail: {}", out.stdout);
        out.stderr
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        self.kill();
    }
}

fn run_cli(url: &str, token: &str, args: &[&str]) -> CliOutput {
    let out = Command::new(PADDOCK)
        .args(args)
        .env("PADDOCK_CONTROLLER", url)
        .env("PADDOCK_TOKEN", token)
        .output()
        .unwrap();
    CliOutput {
        success: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

pub struct CliOutput {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

/// A running `paddock balancer` following a controller (or a fixed table).
pub struct Balancer {
    pub name: String,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    /// The executable it runs from.
    exe: PathBuf,
    child: Option<Child>,
    log: Arc<Mutex<String>>,
    args: Vec<String>,
    dir: tempfile::TempDir,
}

impl Balancer {
    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// The CPUs each event loop's thread may run on (`Cpus_allowed_list` in `/proc`): the main
    /// thread runs loop 0, the `paddock-balancer-N` threads the others.
    pub fn loop_cpus(&self) -> Vec<String> {
        let pid = self.pid().expect("the balancer runs");
        let mut loops = Vec::new();
        for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
            let task = task.unwrap().path();
            let tid: u32 = task.file_name().unwrap().to_str().unwrap().parse().unwrap();
            // The kernel keeps 15 bytes of a thread's name.
            let comm = std::fs::read_to_string(task.join("comm")).unwrap();
            if tid != pid && comm.trim() != "paddock-balance" {
                continue;
            }
            let status = std::fs::read_to_string(task.join("status")).unwrap();
            loops.push(cpus_allowed(&status));
        }
        loops
    }

    /// Starts a balancer of `controller` and waits until it routes by the controller's table.
    pub async fn start(controller: &Controller, name: &str, extra_args: &[&str]) -> Balancer {
        Balancer::start_at(&controller.url, &controller.join_token, name, extra_args).await
    }

    /// A balancer following the controller at `urls` (several: the active one and its standbys).
    pub async fn start_at(
        urls: &str,
        join_token: &str,
        name: &str,
        extra_args: &[&str],
    ) -> Balancer {
        let mut args = vec![
            "--controller".to_string(),
            urls.to_string(),
            "--join-token".into(),
            join_token.to_string(),
        ];
        args.extend(extra_args.iter().map(|s| s.to_string()));
        Balancer::launched(name, args, tempfile::tempdir().unwrap()).await
    }

    /// A balancer fed a fixed routing table (`--table`), with no controller.
    pub async fn with_table(
        name: &str,
        table: &serde_json::Value,
        extra_args: &[&str],
    ) -> Balancer {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fixed-table.json");
        std::fs::write(&path, table.to_string()).unwrap();
        let mut args = vec!["--table".to_string(), path.display().to_string()];
        args.extend(extra_args.iter().map(|s| s.to_string()));
        Balancer::launched(name, args, dir).await
    }

    /// A balancer of `controller` running from its own hard link of the `paddock` executable
    /// ([`Balancer::own_exe`]), which a test may replace.
    pub async fn start_own_executable(
        controller: &Controller,
        name: &str,
        extra_args: &[&str],
    ) -> Balancer {
        let dir = tempfile::tempdir().unwrap();
        let exe = own_paddock(dir.path());
        let mut args = vec![
            "--controller".to_string(),
            controller.url.clone(),
            "--join-token".into(),
            controller.join_token.clone(),
        ];
        args.extend(extra_args.iter().map(|s| s.to_string()));
        Balancer::launched_from(name, args, dir, exe).await
    }

    /// The executable it runs from.
    pub fn own_exe(&self) -> PathBuf {
        self.exe.clone()
    }

    /// Sends it a signal (`kill -SIGNAL`).
    pub fn signal(&self, signal: &str) {
        send_signal(self.pid().expect("the balancer runs"), signal);
    }

    /// Starts `paddock balancer` with `args` (and its data in `dir`), once it routes by a table.
    async fn launched(name: &str, args: Vec<String>, dir: tempfile::TempDir) -> Balancer {
        Balancer::launched_from(name, args, dir, PathBuf::from(PADDOCK)).await
    }

    async fn launched_from(
        name: &str,
        args: Vec<String>,
        dir: tempfile::TempDir,
        exe: PathBuf,
    ) -> Balancer {
        let mut balancer = Balancer {
            name: name.into(),
            addr: "127.0.0.1:0".parse().unwrap(),
            admin: "127.0.0.1:0".parse().unwrap(),
            exe,
            child: None,
            log: Arc::new(Mutex::new(String::new())),
            args,
            dir,
        };
        balancer.launch().await;
        balancer
            .wait_status("a routing table", |s| s["generation"].as_i64() > Some(0))
            .await;
        balancer
    }

    async fn launch(&mut self) {
        let mut command = Command::new(&self.exe);
        command
            .args(["balancer", "--name", &self.name])
            .args(["--listen", &self.addr.to_string()])
            .args(["--admin", &self.admin.to_string()])
            .arg("--data")
            .arg(self.dir.path())
            .args(&self.args);
        let start = self.log.lock().unwrap().len();
        self.child = Some(spawn_logged(&mut command, &self.name, &self.log));
        let child = self.child.as_mut().unwrap();
        let found = logged_addresses(
            &self.name,
            &self.log,
            start,
            child,
            &[
                if self.args.iter().any(|a| a == "--tls-cert") {
                    "balancing on https://"
                } else {
                    "balancing on http://"
                },
                "metrics on http://",
            ],
        )
        .await;
        self.addr = found[0].parse().unwrap();
        self.admin = found[1].parse().unwrap();
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    pub fn log_len(&self) -> usize {
        self.log.lock().unwrap().len()
    }

    /// Waits until the log after byte `offset` has a line with `needle`.
    pub async fn wait_for_log_after(&self, offset: usize, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.log.lock().unwrap()[offset..].contains(needle) {
            assert!(
                Instant::now() < deadline,
                "{}: no log line with {needle:?} within {timeout:?}; log:\n{}",
                self.name,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        kill_child(&mut self.child);
    }

    /// Starts it again on the same addresses and data folder.
    pub async fn restart(&mut self) {
        self.kill();
        self.launch().await;
    }

    /// Waits for the process to exit on its own; its exit status.
    pub async fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let child = self.child.as_mut().expect("the balancer was started");
        let status = wait_child_exit(child, &self.name, within).await;
        self.child = None;
        status
    }

    pub async fn connect(&self) -> Conn {
        Conn::open(self.addr)
            .await
            .expect("connect to the balancer")
    }

    async fn admin_get(&self, path: &str) -> String {
        let mut conn = Conn::open(self.admin)
            .await
            .expect("connect to the admin port");
        let reply = conn.get(path).await.unwrap();
        assert_eq!(reply.status, 200, "{path}: {}", reply.body);
        reply.body
    }

    /// What it reports to the controller (`/status` on its admin port).
    pub async fn status(&self) -> serde_json::Value {
        serde_json::from_str(&self.admin_get("/status").await).unwrap()
    }

    pub async fn metrics(&self) -> String {
        self.admin_get("/metrics").await
    }

    /// Sum of `paddock_balancer_requests_total` over the lines whose labels contain all of `labels`.
    pub async fn requests_counted(&self, labels: &[&str]) -> u64 {
        self.metric_sum("paddock_balancer_requests_total", labels)
            .await
    }

    /// Sum of the metric `name` over the lines whose labels contain all of `labels`.
    pub async fn metric_sum(&self, name: &str, labels: &[&str]) -> u64 {
        let prefix = format!("{name}{{");
        self.metrics()
            .await
            .lines()
            .filter(|l| l.starts_with(&prefix))
            .filter(|l| labels.iter().all(|want| l.contains(want)))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    }

    /// Waits until its status satisfies `check`.
    pub async fn wait_status(
        &self,
        what: &str,
        check: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let status = self.status().await;
            if check(&status) {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{}: status never showed {what}; last: {status}",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until the named upstreams are up, or down, by its health checks.
    pub async fn wait_up(&self, servers: &[&str], up: bool) {
        self.wait_status(&format!("{servers:?} up = {up}"), |s| {
            servers.iter().all(|name| {
                s["upstreams"]
                    .as_array()
                    .is_some_and(|u| u.iter().any(|u| u["name"] == *name && u["up"] == up))
            })
        })
        .await;
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `GET path` on `conn`, opened to `addr` first when there is none.
async fn get_on(conn: &mut Option<Conn>, addr: SocketAddr, path: &str) -> anyhow::Result<Reply> {
    if conn.is_none() {
        *conn = Conn::open(addr).await.ok();
    }
    match conn.as_mut() {
        Some(c) => c.get(path).await,
        None => Err(anyhow::anyhow!("cannot connect")),
    }
}

/// One request of a [`Load`].
#[derive(Debug, Clone)]
pub struct Sample {
    pub started: Instant,
    pub finished: Instant,
    /// 0 when the request failed without a response.
    pub status: u16,
    pub server: Option<String>,
    pub version: Option<String>,
    pub error: Option<String>,
    /// Sent again on a new connection: its keep-alive connection closed before any response
    /// byte (only for [`Load::start_as_browser`]).
    pub retried: bool,
}

/// Keep-alive clients sending GETs in a loop until stopped; each reconnects after a failure,
/// and after a response that said `Connection: close`.
pub struct Load {
    stop: Arc<std::sync::atomic::AtomicBool>,
    clients: Vec<tokio::task::JoinHandle<Vec<Sample>>>,
}

impl Load {
    /// `clients` connections to `addr`, each sending `GET path` then pausing `pace`; a request
    /// that fails is a failure.
    pub fn start(addr: SocketAddr, path: &str, clients: usize, pace: Duration) -> Load {
        Load::launch(addr, path, clients, pace, false)
    }

    /// The same clients, except that a GET whose reused keep-alive connection closed before
    /// any response byte is sent again once on a new connection, as browsers and HTTP client
    /// libraries do (RFC 9112, 9.3.1): a server may close an idle connection at any moment.
    pub fn start_as_browser(addr: SocketAddr, path: &str, clients: usize, pace: Duration) -> Load {
        Load::launch(addr, path, clients, pace, true)
    }

    fn launch(addr: SocketAddr, path: &str, clients: usize, pace: Duration, retry: bool) -> Load {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let clients = (0..clients)
            .map(|_| {
                let (stop, path) = (stop.clone(), path.to_string());
                tokio::spawn(async move {
                    let mut samples = Vec::new();
                    let mut conn: Option<Conn> = None;
                    while !stop.load(std::sync::atomic::Ordering::Acquire) {
                        let started = Instant::now();
                        let reused = conn.is_some();
                        let mut result = get_on(&mut conn, addr, &path).await;
                        let retried = retry
                            && reused
                            && result
                                .as_ref()
                                .is_err_and(|e| e.downcast_ref::<NoResponse>().is_some());
                        if retried {
                            conn = None;
                            result = get_on(&mut conn, addr, &path).await;
                        }
                        let finished = Instant::now();
                        if let Ok(reply) = &result
                            && reply.header("connection") == Some("close")
                        {
                            conn = None;
                        }
                        samples.push(match result {
                            Ok(reply) => Sample {
                                started,
                                finished,
                                status: reply.status,
                                server: reply.header("x-paddock-server").map(str::to_string),
                                version: reply.version().map(str::to_string),
                                error: (reply.status >= 400).then(|| reply.body.clone()),
                                retried,
                            },
                            Err(e) => {
                                conn = None;
                                Sample {
                                    started,
                                    finished,
                                    status: 0,
                                    server: None,
                                    version: None,
                                    error: Some(format!("{e:#}")),
                                    retried,
                                }
                            }
                        });
                        tokio::time::sleep(pace).await;
                    }
                    samples
                })
            })
            .collect();
        Load { stop, clients }
    }

    pub async fn stop(self) -> Vec<Sample> {
        self.stop_by_client().await.into_iter().flatten().collect()
    }

    /// Each client's samples, in the order it sent them.
    pub async fn stop_by_client(self) -> Vec<Vec<Sample>> {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        let mut all = Vec::new();
        for client in self.clients {
            all.push(client.await.unwrap());
        }
        all
    }
}

/// The failed samples, for an assertion message.
pub fn failures(samples: &[Sample]) -> Vec<String> {
    samples
        .iter()
        .filter(|s| s.status != 200)
        .map(|s| format!("{} {:?}", s.status, s.error))
        .collect()
}

/// The `Cpus_allowed_list` of a `/proc/.../status`.
pub fn cpus_allowed(status: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .expect("Cpus_allowed_list in /proc/.../status")
        .trim()
        .to_string()
}

/// Headless Chromium (Debian's `chromium`), driven through `chromedriver` (`chromium-driver`) by
/// WebDriver, with a profile of its own that is gone with it.
pub struct Browser {
    pub client: fantoccini::Client,
    driver: Child,
    _dir: tempfile::TempDir,
}

impl Browser {
    pub async fn start() -> Browser {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
            .port();
        let log = dir.path().join("chromedriver.log");
        // In a process group of its own, with the browser it starts: one signal ends them all.
        let driver = Command::new("chromedriver")
            .process_group(0)
            .arg(format!("--port={port}"))
            .arg(format!("--log-path={}", log.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "start chromedriver: {e}; the console tests need Debian's chromium and \
                     chromium-driver (`apt-get install chromium chromium-driver`, as .ci/run does)"
                )
            });
        let profile = dir.path().join("profile");
        let capabilities = serde_json::json!({
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                // No traffic but to loopback: the machine's network is closed, and Chromium's
                // background connections would only fail.
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                    "--window-size=1400,1000",
                    format!("--user-data-dir={}", profile.display()),
                ],
            }
        });
        let serde_json::Value::Object(capabilities) = capabilities else {
            unreachable!()
        };
        let url = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(30);
        let client = loop {
            let connector = hyper_util::client::legacy::connect::HttpConnector::new();
            match fantoccini::ClientBuilder::new(connector)
                .capabilities(capabilities.clone())
                .connect(&url)
                .await
            {
                Ok(client) => break client,
                Err(e) => {
                    assert!(
                        Instant::now() < deadline,
                        "no browser session from chromedriver at {url}: {e}; its log:\n{}",
                        std::fs::read_to_string(&log).unwrap_or_default()
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        Browser {
            client,
            driver,
            _dir: dir,
        }
    }

    pub async fn goto(&self, url: &str) {
        self.client.goto(url).await.unwrap();
    }

    /// The text of the first element `css` selects, if there is one.
    pub async fn text(&self, css: &str) -> Option<String> {
        let element = self.client.find(fantoccini::Locator::Css(css)).await.ok()?;
        element.text().await.ok()
    }

    /// Waits until the element `css` selects is there and its text passes `check`; its text.
    pub async fn wait_text(&self, css: &str, check: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let seen = self.text(css).await;
            if let Some(text) = &seen
                && check(text)
            {
                return text.clone();
            }
            if Instant::now() > deadline {
                let page = self.text("body").await.unwrap_or_default();
                panic!(
                    "`{css}` did not show what was expected; last seen: {seen:?}; page:\n{page}"
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Clicks the element `css` selects, once it is there and enabled.
    pub async fn click(&self, css: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(element) = self.client.find(fantoccini::Locator::Css(css)).await
                && element.is_enabled().await.unwrap_or(false)
                && element.click().await.is_ok()
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "nothing enabled to click at `{css}`"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The texts of every element `css` selects, read from one drawing of the page: an
    /// element redrawn while it was read is read again (at most for 30 s).
    pub async fn texts(&self, css: &str) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        'drawing: loop {
            let mut texts = Vec::new();
            for element in self
                .client
                .find_all(fantoccini::Locator::Css(css))
                .await
                .unwrap()
            {
                match element.text().await {
                    Ok(text) => texts.push(text),
                    Err(e) => {
                        assert!(Instant::now() < deadline, "`{css}` could not be read: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue 'drawing;
                    }
                }
            }
            return texts;
        }
    }

    /// Whether the element `css` selects is there and enabled.
    pub async fn enabled(&self, css: &str) -> bool {
        match self.client.find(fantoccini::Locator::Css(css)).await {
            Ok(element) => element.is_enabled().await.unwrap_or(false),
            Err(_) => false,
        }
    }

    /// The address the page shows now.
    pub async fn url(&self) -> String {
        self.client.current_url().await.unwrap().to_string()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let group = format!("-{}", self.driver.id());
        let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
        let _ = self.driver.wait();
    }
}

/// A process the test started by hand, killed when dropped (a failing test leaves none behind).
pub struct Started(pub Child);

impl Drop for Started {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `paddock <args>` (a server command) under an open files limit of 256, hard limit
/// `hard`, logging at info (the balancer's health checks at debug); its stderr, line by line.
pub fn spawn_with_open_files(
    args: &[std::ffi::OsString],
    hard: u64,
) -> (Started, std::sync::mpsc::Receiver<String>) {
    let mut command = Command::new(PADDOCK);
    command
        .args(args)
        .env("RUST_LOG", "info,paddock_balancer::health=debug")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: only an async-signal-safe system call between fork and exec.
    unsafe {
        command.pre_exec(move || {
            let limit = libc::rlimit {
                rlim_cur: 256,
                rlim_max: hard,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = command.spawn().unwrap();
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in stderr.lines().map_while(Result::ok) {
            eprintln!("[limited] {line}");
            let _ = tx.send(line);
        }
    });
    (Started(child), lines)
}

/// The next of `lines` that contains `needle` (within 10 s), skipping the others.
pub fn next_line(lines: &std::sync::mpsc::Receiver<String>, needle: &str) -> String {
    next_line_without(lines, needle, &[])
}

/// [`next_line`], failing on a line before it that contains any of `forbidden`.
pub fn next_line_without(
    lines: &std::sync::mpsc::Receiver<String>,
    needle: &str,
    forbidden: &[&str],
) -> String {
    loop {
        match lines.recv_timeout(Duration::from_secs(10)) {
            Ok(line) if line.contains(needle) => return line,
            Ok(line) => assert!(!forbidden.iter().any(|f| line.contains(f)), "{line}"),
            Err(e) => panic!("no line with {needle:?}: {e}"),
        }
    }
}

/// The address a log line gives after `before` (e.g. `"balancing on http://"`).
pub fn address_after(line: &str, before: &str) -> SocketAddr {
    line.rsplit(before)
        .next()
        .and_then(|a| a.split_whitespace().next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address after {before:?} in {line:?}"))
}

/// Checks how `paddock <args>` (a server command) deals with its open files limit. Started under
/// a soft limit of 256, it raises it to the hard one: 8192 (or the machine's most) and nothing
/// said; 512, and it warns, naming what one connection costs it (`holds`). Out of descriptors with
/// 600 clients waiting, it says why accepting fails once, not at each retry (every 50 ms).
/// `listening` is the start of the log line that gives its address.
pub fn open_files_limit_raised_and_said(args: &[std::ffi::OsString], listening: &str, holds: &str) {
    // SAFETY: reads into a struct the call fills.
    let most = unsafe {
        let mut limit = std::mem::zeroed::<libc::rlimit>();
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        limit.rlim_max
    };
    let high = most.min(8192);
    assert!(high >= 4096, "this machine allows only {most} open files");
    let (child, lines) = spawn_with_open_files(args, high);
    assert_eq!(open_files_limit(child.0.id(), high), (high, high));
    // Every line it wrote until it listens (the warning would come before).
    let mut said = Vec::new();
    while !said.last().is_some_and(|l: &String| l.contains(listening)) {
        match lines.recv_timeout(Duration::from_secs(10)) {
            Ok(line) => said.push(line),
            Err(e) => panic!("no line with {listening:?}: {e}; it said {said:#?}"),
        }
    }
    drop(child);
    assert!(
        !said.iter().any(|l| l.contains("files at most")),
        "{said:#?}"
    );

    // A hard limit too low to serve many clients: raised as far as it goes, and said.
    let (child, lines) = spawn_with_open_files(args, 512);
    assert_eq!(open_files_limit(child.0.id(), 512), (512, 512));
    let line = next_line(&lines, "files at most");
    assert!(
        line.contains("may open 512 files at most")
            && line.contains(holds)
            && line.contains("LimitNOFILE"),
        "{line}"
    );
    // Out of descriptors: clients wait in the backlog, and the process says why, once.
    let address = address_after(&next_line(&lines, listening), listening);
    let clients: Vec<_> = (0..600)
        .map(|_| std::net::TcpStream::connect(address).unwrap())
        .collect();
    let line = next_line(&lines, "accept failed");
    assert!(
        line.contains("open files limit allows") && line.contains("LimitNOFILE"),
        "{line}"
    );
    let until = Instant::now() + Duration::from_secs(2);
    let mut again = 0;
    while let Some(left) = until.checked_duration_since(Instant::now()) {
        if lines
            .recv_timeout(left)
            .is_ok_and(|l| l.contains("accept failed"))
        {
            again += 1;
        }
    }
    assert_eq!(again, 0, "the accept failure was said again within 2 s");
    drop(clients);
    drop(child);
}

/// The soft and hard limits of open files of process `pid`, once its soft one is `soft`.
fn open_files_limit(pid: u32, soft: u64) -> (u64, u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
        let line = limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .unwrap();
        let numbers: Vec<u64> = line
            .split_whitespace()
            .filter_map(|w| w.parse().ok())
            .collect();
        if numbers[0] == soft || Instant::now() > deadline {
            return (numbers[0], numbers[1]);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
