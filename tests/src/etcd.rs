//! A real etcd 3.4 cluster (Debian `etcd-server`) for the cluster tests: three members in one test
//! namespace, each on its own address (client port 2379, peer port 2380), data on tmpfs
//! (/dev/shm), optionally with client TLS from a throw-away CA. Members can be killed and started
//! again; everything is killed by PID and removed on drop, also when a test panics.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::agent::wait_for;
use crate::netns::Netns;

/// Client TLS material: a CA and a server certificate for the members' addresses.
pub struct Tls {
    pub dir: PathBuf,
}

impl Tls {
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// A CA and a server certificate valid for `ips` (PEM files in `dir`).
    pub fn generate(dir: &Path, ips: &[&str]) -> Tls {
        std::fs::create_dir_all(dir).expect("tls dir");
        let san: Vec<String> = ips.iter().map(|i| format!("IP:{i}")).collect();
        let ext = format!(
            "subjectAltName={}\nextendedKeyUsage=serverAuth,clientAuth\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n",
            san.join(",")
        );
        std::fs::write(dir.join("ext.cnf"), ext).expect("ext.cnf");
        let sh = |cmd: &str| {
            let out = Command::new("sh")
                .arg("-c")
                .arg(cmd)
                .current_dir(dir)
                .output()
                .expect("openssl");
            assert!(
                out.status.success(),
                "{cmd}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        sh(
            "openssl req -x509 -newkey rsa:2048 -nodes -days 2 -keyout ca.key -out ca.pem -subj /CN=vpnlb-test-ca",
        );
        sh("openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj /CN=etcd");
        sh(
            "openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -extfile ext.cnf -out server.pem",
        );
        // A second, unrelated CA: what a member with the wrong trust anchor has.
        sh(
            "openssl req -x509 -newkey rsa:2048 -nodes -days 2 -keyout other.key -out other-ca.pem -subj /CN=other-ca",
        );
        Tls {
            dir: dir.to_path_buf(),
        }
    }
}

/// Writes a cluster peer key (`[cluster] peer_key_file`) at `path`: 32 bytes of `byte`, mode 0600.
pub fn write_peer_key(path: &Path, byte: u8) {
    std::fs::write(path, [byte; 32]).expect("peer key");
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("chmod peer key");
}

/// A namespace `<prefix>-etcd` on `switch` (port `etcd`) with the three member addresses
/// `<net>.51`-`.53` (`net`: the first three octets), and the members started in it.
pub fn etcd_on_switch(switch: &Netns, prefix: &str, net: &str) -> (Netns, EtcdCluster) {
    let ns = Netns::new(&format!("{prefix}-etcd"));
    crate::netns::cable(switch, "etcd", &ns, &format!("{net}.51/24"));
    ns.sh(&format!(
        "ip addr add {net}.52/24 dev eth0 && ip addr add {net}.53/24 dev eth0"
    ));
    let addrs: Vec<String> = (51..=53).map(|h| format!("{net}.{h}")).collect();
    let refs: Vec<&str> = addrs.iter().map(String::as_str).collect();
    let etcd = EtcdCluster::start(&ns, &refs, None, &[]);
    (ns, etcd)
}

/// Three etcd members in namespace `ns`.
pub struct EtcdCluster {
    ns: String,
    pub addrs: Vec<String>,
    data: PathBuf,
    tls: Option<PathBuf>,
    extra: Vec<String>,
    members: Vec<Option<Child>>,
}

impl EtcdCluster {
    /// Starts a member on each of `addrs` (already configured in `ns`) and waits until the
    /// cluster answers. `tls`: serve clients over TLS with that material. `extra`: more etcd
    /// flags (e.g. a fast raft tick).
    pub fn start(ns: &Netns, addrs: &[&str], tls: Option<&Tls>, extra: &[&str]) -> EtcdCluster {
        let data = PathBuf::from(format!(
            "/dev/shm/vpnlb-etcd-{}-{}",
            std::process::id(),
            ns.name()
        ));
        let _ = std::fs::remove_dir_all(&data);
        std::fs::create_dir_all(&data).expect("etcd data dir");
        let mut c = EtcdCluster {
            ns: ns.name().to_string(),
            addrs: addrs.iter().map(|s| s.to_string()).collect(),
            data,
            tls: tls.map(|t| t.dir.clone()),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            members: addrs.iter().map(|_| None).collect(),
        };
        for i in 0..addrs.len() {
            c.spawn(i, "new");
        }
        c.wait_healthy();
        c
    }

    fn scheme(&self) -> &'static str {
        if self.tls.is_some() { "https" } else { "http" }
    }

    /// The client URLs.
    pub fn endpoints(&self) -> Vec<String> {
        self.addrs
            .iter()
            .map(|a| format!("{}://{a}:2379", self.scheme()))
            .collect()
    }

    /// The `[cluster]` lines naming this cluster (and its CA when it speaks TLS).
    pub fn cluster_toml(&self) -> String {
        let eps: Vec<String> = self.endpoints().iter().map(|e| format!("{e:?}")).collect();
        let mut s = format!("etcd_endpoints = [{}]\n", eps.join(", "));
        if let Some(t) = &self.tls {
            s.push_str(&format!("etcd_ca_file = {:?}\n", t.join("ca.pem")));
        }
        s
    }

    fn spawn(&mut self, i: usize, state: &str) {
        let initial: Vec<String> = self
            .addrs
            .iter()
            .enumerate()
            .map(|(j, a)| format!("m{j}=http://{a}:2380"))
            .collect();
        let a = &self.addrs[i];
        let log = File::create(self.data.join(format!("m{i}.log"))).expect("etcd log");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns, "etcd"])
            .arg(format!("--name=m{i}"))
            .arg(format!(
                "--data-dir={}",
                self.data.join(format!("m{i}.etcd")).display()
            ))
            .arg(format!("--listen-client-urls={}://{a}:2379", self.scheme()))
            .arg(format!(
                "--advertise-client-urls={}://{a}:2379",
                self.scheme()
            ))
            .arg(format!("--listen-peer-urls=http://{a}:2380"))
            .arg(format!("--initial-advertise-peer-urls=http://{a}:2380"))
            .arg(format!("--initial-cluster={}", initial.join(",")))
            .arg(format!("--initial-cluster-state={state}"))
            .arg("--initial-cluster-token=vpnlb-test")
            .args(["--logger=zap", "--log-outputs=stderr"]);
        if let Some(t) = &self.tls {
            cmd.arg(format!("--cert-file={}", t.join("server.pem").display()))
                .arg(format!("--key-file={}", t.join("server.key").display()));
        }
        cmd.args(&self.extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup"))
            .stderr(log);
        // The member dies with the test process.
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        self.members[i] = Some(
            cmd.spawn()
                .expect("spawn etcd (apt-get install etcd-server)"),
        );
    }

    fn etcdctl(&self, args: &[&str]) -> std::process::Output {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns, "etcdctl"])
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.endpoints().join(",")))
            .arg("--command-timeout=3s");
        if let Some(t) = &self.tls {
            cmd.arg(format!("--cacert={}", t.join("ca.pem").display()));
        }
        cmd.args(args).output().expect("etcdctl")
    }

    /// `etcdctl ARGS` against the cluster; panics on failure.
    pub fn ctl(&self, args: &[&str]) -> String {
        let out = self.etcdctl(args);
        assert!(
            out.status.success(),
            "etcdctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Waits until a put and a get go through.
    pub fn wait_healthy(&self) {
        wait_for(Duration::from_secs(30), || {
            let out = self.etcdctl(&["put", "/vpnlb-test-health", "ok"]);
            out.status.success().then_some(())
        })
        .unwrap_or_else(|| panic!("etcd did not come up; logs:\n{}", self.logs()));
    }

    /// SIGKILLs member `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts member `i` again on its data (it rejoins the cluster).
    pub fn restart(&mut self, i: usize) {
        assert!(self.members[i].is_none(), "member {i} is running");
        self.spawn(i, "existing");
    }

    pub fn logs(&self) -> String {
        (0..self.addrs.len())
            .map(|i| {
                let t = std::fs::read_to_string(self.data.join(format!("m{i}.log")))
                    .unwrap_or_default();
                let tail: Vec<&str> = t.lines().rev().take(15).collect();
                format!(
                    "--- etcd m{i}:\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
        let _ = std::fs::remove_dir_all(&self.data);
    }
}
