//! A real redis-server for the tests that need one (`apt-get install -y
//! redis-server`; .ci/run installs it): on a free port, killed on drop.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::free_port;

pub fn require_redis() {
    let found = Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(found, "redis-server is not installed: run `apt-get install -y redis-server` (the Redis tests never skip)");
}

/// A redis-server on a free port, killed on drop.
pub struct Redis {
    pub child: Child,
    pub port: u16,
    dir: tempfile::TempDir,
    extra: Vec<String>,
}

impl Redis {
    pub async fn start() -> Self {
        require_redis();
        let dir = tempfile::tempdir().unwrap();
        Self::on_port(free_port(), dir, &[]).await
    }

    /// A redis-server that keeps its data across restarts (AOF, every
    /// write on disk before it answers), as production must.
    pub async fn persistent() -> Self {
        require_redis();
        let dir = tempfile::tempdir().unwrap();
        let keep = ["--appendonly", "yes", "--appendfsync", "always"];
        Self::on_port(free_port(), dir, &keep).await
    }

    pub async fn on_port(port: u16, dir: tempfile::TempDir, extra: &[&str]) -> Self {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(extra)
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server");
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "redis-server did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let extra = extra.iter().map(|s| s.to_string()).collect();
        Self {
            child,
            port,
            dir,
            extra,
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts redis-server again on the same port and folder, with the same
    /// settings (without persistence: empty).
    pub async fn restart(&mut self) {
        self.kill();
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
        let extra: Vec<&str> = self.extra.iter().map(String::as_str).collect();
        let fresh = Self::on_port(self.port, dir, &extra).await;
        let _ = std::mem::replace(self, fresh);
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `redis-cli` against `redis`, its output trimmed.
pub fn redis_cli(redis: &Redis, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-p", &redis.port.to_string()])
        .args(args)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}
