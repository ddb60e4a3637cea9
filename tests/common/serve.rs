//! A `detour serve` process of the test's own (the real binary, real
//! signals), with its stderr collected.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]
// The stderr collector runs on a plain thread.
#![allow(clippy::disallowed_types)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

pub const BIN: &str = env!("CARGO_BIN_EXE_detour");
pub const TOKEN: &str = "admin-t0ken";

pub fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// A `detour serve` process; its stderr lines are collected.
pub struct Serve {
    pub child: std::process::Child,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Serve {
    pub fn start(config: &Path, extra_args: &[&str]) -> Self {
        Self::start_with_env(config, extra_args, &[])
    }

    /// [`Serve::start`] with more environment variables.
    pub fn start_with_env(config: &Path, extra_args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::start_logging("json", config, extra_args, env)
    }

    /// [`Serve::start_with_env`] with the log in `format` (`json`, `human`).
    pub fn start_logging(
        format: &str,
        config: &Path,
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        let mut child = Command::new(BIN)
            .args(["--log-format", format, "serve", "--config"])
            .arg(config)
            .args(extra_args)
            .env("DETOUR_ADMIN_TOKEN", TOKEN)
            .env("DETOUR_TEST_UPSTREAM_KEY", "sk-upstream-SECRET-1")
            .env("DETOUR_TEST_GATEWAY_KEY", "dk-gateway-SECRET-2")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let lines = BufReader::new(child.stderr.take().unwrap());
        let sink = Arc::clone(&stderr);
        std::thread::spawn(move || {
            for line in lines.lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        Self { child, stderr }
    }

    pub fn log(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    pub async fn wait_ready(&self, addr: SocketAddr) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            assert!(
                Instant::now() < deadline,
                "detour did not start:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
