//! A real `redis-server` of the test's own, on a free loopback port, that
//! the test can stop, pause (SIGSTOP), resume and restart on the same port.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct RedisServer {
    pub port: u16,
    password: Option<String>,
    /// TLS only, with this certificate and key (PEM files).
    tls: Option<(std::path::PathBuf, std::path::PathBuf)>,
    child: Option<Child>,
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

impl RedisServer {
    pub fn start() -> Self {
        Self::start_on(free_port(), None)
    }

    /// A server on `port`, requiring `password` if given.
    pub fn start_on(port: u16, password: Option<&str>) -> Self {
        let mut r = Self {
            port,
            password: password.map(str::to_owned),
            tls: None,
            child: None,
        };
        r.spawn();
        r
    }

    /// A server that speaks TLS only (`rediss://`), with `cert` and `key`.
    pub fn start_tls(cert: &std::path::Path, key: &std::path::Path, password: &str) -> Self {
        let mut r = Self {
            port: free_port(),
            password: Some(password.to_owned()),
            tls: Some((cert.to_owned(), key.to_owned())),
            child: None,
        };
        r.spawn();
        r
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    // Blocking, briefly (redis-server is up in a few ms): called once per
    // start, never under load, and simpler than an async harness.
    #[allow(clippy::disallowed_methods)]
    fn spawn(&mut self) {
        let mut cmd = Command::new("redis-server");
        if let Some(p) = &self.password {
            cmd.args(["--requirepass", p]);
        }
        let port = self.port.to_string();
        let plain_port = match &self.tls {
            Some((cert, key)) => {
                cmd.args(["--tls-port", &port, "--tls-auth-clients", "no"])
                    .arg("--tls-cert-file")
                    .arg(cert)
                    .arg("--tls-key-file")
                    .arg(key);
                "0"
            }
            None => &port,
        };
        let child = cmd
            .args([
                "--port",
                plain_port,
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (Debian package redis-server; scripts/test.sh installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        let ready = |r: &Self| match r.tls {
            Some(_) => TcpStream::connect(("127.0.0.1", r.port)).is_ok(),
            None => r.ping(),
        };
        while !ready(self) {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// True when the server answers PING.
    pub fn ping(&self) -> bool {
        self.command("PING").is_some_and(|r| r.contains("+PONG"))
    }

    /// Sends one inline command and returns the raw reply.
    pub fn command(&self, line: &str) -> Option<String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(Duration::from_millis(500))).ok()?;
        let auth = match &self.password {
            Some(p) => format!("AUTH {p}\r\n"),
            None => String::new(),
        };
        s.write_all(format!("{auth}{line}\r\n").as_bytes()).ok()?;
        let mut out = String::new();
        let mut buf = [0u8; 4096];
        // With AUTH first, the two replies may come in two reads.
        for _ in 0..2 {
            let n = s.read(&mut buf).ok()?;
            out.push_str(&String::from_utf8_lossy(&buf[..n]));
            if self.password.is_none() || out.matches("\r\n").count() >= 2 {
                break;
            }
        }
        Some(out)
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("running").id();
        let ok = Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig} {pid}");
    }

    /// Freezes the server: connections stay open, nothing is answered.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    pub fn resume(&self) {
        self.signal("-CONT");
    }

    /// Kills the server; its data is gone.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-CONT", &c.id().to_string()])
                .status();
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts a fresh server on the same port.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Waits (up to 10 s) until the replica `gw` reaches its `[state]` Redis.
pub async fn wait_until_up(gw: &detour::server::Running) {
    let shared = gw.gateway.shared().expect("[state] is redis");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !shared.is_up() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the replica never reached Redis"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
