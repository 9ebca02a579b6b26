//! Debian's `docker-registry` (distribution 2.8) on 127.0.0.1, with its access log for counting fetches.

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::lab::{free_port, wait_for, Lab};

/// Starts `docker-registry serve` as lab daemon `name` on storage `data` with the `http:` section
/// `http` (its indented body), access log on.
fn spawn(lab: &Lab, name: &str, data: &std::path::Path, http: &str) {
    let dir = lab.join(name);
    fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("config.yml");
    fs::write(
        &cfg,
        format!(
            "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n  cache:\n    blobdescriptor: inmemory\nhttp:\n{http}",
            data.display()
        ),
    )
    .unwrap();
    let mut cmd = Command::new("docker-registry");
    cmd.arg("serve").arg(&cfg);
    lab.spawn(name, cmd);
}

/// A running private registry.
pub struct Registry<'a> {
    lab: &'a Lab,
    name: String,
    port: u16,
    data: PathBuf,
}

impl<'a> Registry<'a> {
    /// Starts `docker-registry serve` on a free loopback port with storage under the lab.
    pub fn start(lab: &'a Lab) -> Registry<'a> {
        Self::start_named(lab, "registry")
    }

    /// Like [`Registry::start`], with a distinct daemon name so one lab can run several.
    pub fn start_named(lab: &'a Lab, name: &str) -> Registry<'a> {
        Lab::require_cmd("docker-registry", "docker-registry");
        let port = free_port();
        let data = lab.join(name).join("data");
        fs::create_dir_all(&data).unwrap();
        spawn(
            lab,
            name,
            &data,
            &format!(
                "  addr: 127.0.0.1:{port}\n  headers:\n    X-Content-Type-Options: [nosniff]\n"
            ),
        );
        let reg = Registry {
            lab,
            name: name.to_string(),
            port,
            data,
        };
        wait_for(
            "the registry to answer /v2/",
            Duration::from_secs(20),
            || matches!(reg.http_get("/v2/"), Some((200, _))),
        );
        reg
    }

    /// A second `docker-registry` serving this one's storage over HTTPS with `cert`/`key` (PEM
    /// files), so a test can push over HTTP and pull over TLS from a private CA.
    pub fn start_tls_view(
        &self,
        name: &str,
        cert: &std::path::Path,
        key: &std::path::Path,
    ) -> Registry<'a> {
        let port = free_port();
        spawn(
            self.lab,
            name,
            &self.data,
            &format!(
                "  addr: 127.0.0.1:{port}\n  tls:\n    certificate: {}\n    key: {}\n",
                cert.display(),
                key.display()
            ),
        );
        wait_for(
            "the TLS registry to accept connections",
            Duration::from_secs(20),
            || TcpStream::connect(("127.0.0.1", port)).is_ok(),
        );
        Registry {
            lab: self.lab,
            name: name.to_string(),
            port,
            data: self.data.clone(),
        }
    }

    /// `127.0.0.1:<port>`, the registry host part of image references.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The registry's storage root (for tests that corrupt blobs on purpose).
    pub fn data_dir(&self) -> &PathBuf {
        &self.data
    }

    /// The path of a blob's data file in the registry storage.
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.data
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    /// The access log so far.
    pub fn log(&self) -> String {
        self.lab.log(&self.name)
    }

    /// Number of `GET /v2/<repo>/blobs/…` requests logged (HEAD requests do not count).
    pub fn blob_gets(&self, repo: &str) -> usize {
        let needle = format!("\"GET /v2/{repo}/blobs/");
        self.log().lines().filter(|l| l.contains(&needle)).count()
    }

    /// Number of `GET` requests logged for one blob digest in `repo`.
    pub fn blob_gets_of(&self, repo: &str, digest: &str) -> usize {
        let needle = format!("\"GET /v2/{repo}/blobs/{digest}");
        self.log().lines().filter(|l| l.contains(&needle)).count()
    }

    /// Number of log lines about `digest` whose request named `host` in its `Host` header (the
    /// registry logs it as `http.request.host`): how a guest reaching it through a forward
    /// under another name is told from the host's own tools, which use 127.0.0.1.
    pub fn requests_for_via(&self, digest: &str, host: &str) -> usize {
        let via = format!("http.request.host=\"{host}\"");
        self.log()
            .lines()
            .filter(|l| l.contains(digest) && l.contains(&via))
            .count()
    }

    /// A minimal HTTP/1.0 GET against the registry: (status, body). None if it is not reachable.
    pub fn http_get(&self, path: &str) -> Option<(u16, Vec<u8>)> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        write!(
            s,
            "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{}\r\nAccept: application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json\r\n\r\n",
            self.port
        )
        .ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).ok()?;
        let split = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
        let head = String::from_utf8_lossy(&buf[..split]).to_string();
        let status = head.split_whitespace().nth(1)?.parse().ok()?;
        Some((status, buf[split + 4..].to_vec()))
    }
}
