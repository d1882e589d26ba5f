//! A real container runtime drives meshbpf: Debian 12's podman with its CNI network backend
//! runs containers (a busybox-static root filesystem) on a bridge network whose conflist
//! chains `bridge` + `host-local` + `meshbpf-cni`, and on a second network without it; an
//! init container registers its pod's netns the article's way.
//!
//! Everything podman keeps lives under the test's directory (its own containers.conf,
//! storage, network configs, IPAM state); the bridges get unique names, subnets from the
//! documentation ranges, no gateway address and no masquerading, and are deleted at the end.
//! Podman puts container processes in this machine's cgroup v1 hierarchy, so the test moves
//! a container's workload into a cgroup of its own under the attached test cgroup.

mod common;

use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::k8s::*;
use common::*;
use serde_json::json;

/// Podman as this test's private runtime; removes every container and bridge it made when
/// dropped, also when the test fails.
struct Podman {
    dir: PathBuf,
    rootfs: PathBuf,
    net_dir: PathBuf,
    bridges: Vec<String>,
}

/// Whether podman and the CNI plugins are here. Without them the test skips, except under
/// CI, where it fails.
fn runtime_available() -> bool {
    let ok = Command::new("podman")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
        && Path::new("/usr/lib/cni/bridge").exists()
        && Path::new("/bin/busybox").exists();
    if !ok && std::env::var_os("CI").is_some() {
        panic!("podman, containernetworking-plugins or busybox-static is missing, and CI is set: run scripts/deps.sh");
    }
    if !ok {
        skip("needs podman, containernetworking-plugins and busybox-static (scripts/deps.sh installs them)");
    }
    ok
}

impl Podman {
    fn new(env: &Env) -> Podman {
        let dir = env.root.join("podman");
        let rootfs = dir.join("rootfs");
        let net_dir = dir.join("net.d");
        let cni_bin = dir.join("cni-bin");
        for d in [&net_dir, &cni_bin, &dir.join("tmp"), &dir.join("ipam")] {
            fs::create_dir_all(d).unwrap();
        }
        for plugin in ["bridge", "host-local", "loopback"] {
            std::os::unix::fs::symlink(
                Path::new("/usr/lib/cni").join(plugin),
                cni_bin.join(plugin),
            )
            .unwrap();
        }
        std::os::unix::fs::symlink(cni_plugin(), cni_bin.join("meshbpf-cni")).unwrap();
        busybox_rootfs(&rootfs);
        let d = dir.display();
        fs::write(
            dir.join("containers.conf"),
            format!(
                "[engine]\ncgroup_manager = \"cgroupfs\"\nruntime = \"runc\"\nevents_logger = \"file\"\n\
                 events_logfile_path = \"{d}/events.log\"\ntmp_dir = \"{d}/tmp\"\n\
                 [network]\nnetwork_backend = \"cni\"\ncni_plugin_dirs = [\"{d}/cni-bin\"]\n\
                 network_config_dir = \"{d}/net.d\"\n"
            ),
        )
        .unwrap();
        fs::write(
            dir.join("storage.conf"),
            format!("[storage]\ndriver = \"vfs\"\ngraphroot = \"{d}/root\"\nrunroot = \"{d}/runroot\"\n"),
        )
        .unwrap();
        Podman {
            dir,
            rootfs,
            net_dir,
            bridges: Vec::new(),
        }
    }

    /// `podman` with this test's configuration.
    fn cmd(&self) -> Command {
        let mut cmd = Command::new("podman");
        cmd.env("CONTAINERS_CONF", self.dir.join("containers.conf"))
            .env("CONTAINERS_STORAGE_CONF", self.dir.join("storage.conf"))
            .args(["--runtime", "runc", "--cgroup-manager", "cgroupfs"]);
        cmd
    }

    /// Runs podman to completion, killed after a minute.
    fn run_podman(&self, args: &[&str]) -> Output {
        let child = self
            .cmd()
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run podman");
        output_within(child, scaled(Duration::from_secs(60)))
    }

    fn podman(&self, args: &[&str]) -> String {
        let out = self.run_podman(args);
        assert!(
            out.status.success(),
            "podman {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// A bridge network on `subnet`, with meshbpf-cni chained when `plugin` is given.
    fn network(
        &mut self,
        name: &str,
        bridge: &str,
        subnet: &str,
        plugin: Option<serde_json::Value>,
    ) {
        let mut plugins = vec![json!({
            "type": "bridge",
            "bridge": bridge,
            "isGateway": false,
            "ipMasq": false,
            "ipam": {
                "type": "host-local",
                "dataDir": self.dir.join("ipam"),
                "ranges": [[{"subnet": subnet}]],
            },
        })];
        plugins.extend(plugin);
        let conf = json!({"cniVersion": "1.0.0", "name": name, "plugins": plugins});
        fs::write(
            self.net_dir.join(format!("{name}.conflist")),
            conf.to_string(),
        )
        .unwrap();
        self.bridges.push(bridge.to_string());
    }

    /// `podman run` with the flags this machine needs and the root filesystem last.
    fn run(&self, name: &str, network: &str, extra: &[&str], command: &[&str]) -> Output {
        let mut args = vec![
            "run",
            "--name",
            name,
            "--network",
            network,
            "--ulimit",
            "nofile=1024:20000",
            "--ulimit",
            "nproc=1024:1024",
        ];
        args.extend_from_slice(extra);
        let rootfs = self.rootfs.to_str().unwrap().to_string();
        args.extend_from_slice(&["--rootfs", &rootfs]);
        args.extend_from_slice(command);
        self.run_podman(&args)
    }

    /// Starts a container in the background.
    fn start(&self, name: &str, network: &str, command: &[&str]) {
        let out = self.run(name, network, &["-d"], command);
        assert!(
            out.status.success(),
            "podman run {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn inspect(&self, name: &str, format: &str) -> String {
        self.podman(&["inspect", name, "--format", format])
    }

    fn pid(&self, name: &str) -> u32 {
        self.inspect(name, "{{.State.Pid}}").parse().unwrap()
    }

    fn id(&self, name: &str) -> String {
        self.inspect(name, "{{.Id}}")
    }

    fn ip(&self, name: &str, network: &str) -> Ipv4Addr {
        self.inspect(
            name,
            &format!("{{{{(index .NetworkSettings.Networks \"{network}\").IPAddress}}}}"),
        )
        .parse()
        .unwrap()
    }

    fn netns(&self, name: &str) -> PathBuf {
        PathBuf::from(format!("/proc/{}/ns/net", self.pid(name)))
    }

    fn rm(&self, name: &str) {
        self.podman(&["rm", "--force", "--time", "0", name]);
    }

    /// A file of the containers' root filesystem, from the host.
    fn file(&self, path: &str) -> PathBuf {
        self.rootfs.join(path.trim_start_matches('/'))
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        // A container that others joined (`--network container:NAME`) goes only after
        // them: podman removes what it can per round.
        for _ in 0..4 {
            let _ = self.run_podman(&["rm", "--all", "--force", "--time", "0"]);
            let left = self.run_podman(&["ps", "--all", "--quiet"]);
            if left.status.success() && left.stdout.iter().all(u8::is_ascii_whitespace) {
                break;
            }
        }
        for bridge in &self.bridges {
            let _ = Command::new("ip")
                .args(["link", "del", bridge])
                .stderr(Stdio::null())
                .status();
        }
    }
}

fn output_within(mut child: std::process::Child, limit: Duration) -> Output {
    let deadline = Instant::now() + limit;
    while child.try_wait().ok().flatten().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("podman output")
}

/// A root filesystem of busybox-static, its applets linked, and a page for httpd.
fn busybox_rootfs(root: &Path) {
    for d in ["bin", "proc", "sys", "dev", "etc", "tmp", "www"] {
        fs::create_dir_all(root.join(d)).unwrap();
    }
    fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    for applet in ["sh", "sleep", "wget", "httpd", "cat", "echo", "touch"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
    fs::write(root.join("www/index.html"), "hello from httpd\n").unwrap();
}

/// A container command that waits (at most 60 s) for `/tmp/go-NAME`, then fetches `url`
/// with wget (busybox 1.35's `wget -T` crashes: no timeout option), leaves the page and wget's exit status in `/tmp/out-NAME` and `/tmp/rc-NAME`,
/// and sleeps.
fn fetch_on_signal(name: &str, url: &str) -> Vec<String> {
    let script = format!(
        "i=0; while [ ! -e /tmp/go-{name} ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done; \
         wget -q -O /tmp/out-{name} {url}; echo $? > /tmp/rc-{name}; exec sleep 600"
    );
    vec!["/bin/sh".into(), "-c".into(), script]
}

fn wait_for_file(path: &Path) -> String {
    wait_until(
        || path.exists(),
        || format!("{} never appeared", path.display()),
    );
    std::thread::sleep(Duration::from_millis(50));
    fs::read_to_string(path).unwrap()
}

/// Moves a container's first process (and so what it starts from now on) into `cgroup`.
fn move_into(cgroup: &Path, pid: u32) {
    fs::write(cgroup.join("cgroup.procs"), pid.to_string()).unwrap();
}

#[test]
fn podman_runs_containers_through_meshbpf_cni_and_their_traffic_reaches_the_sidecar() {
    if !privileged() || !runtime_available() {
        return;
    }
    let mut env = Env::new();
    let mesh = env.attach();
    let mut pm = Podman::new(&env);
    let short = env.id.replace('x', "");
    let (mesh_net, plain_net) = (
        format!("mbt-mesh-{}", env.id),
        format!("mbt-plain-{}", env.id),
    );
    let state_dir = pm.dir.join("cni-state");
    let log = pm.dir.join("cni.log");
    pm.network(
        &mesh_net,
        &format!("mbm{short}"),
        "198.51.100.0/24",
        // Inbound capture off: srv has no sidecar, and with inbound capture its server
        // would only be reached through one (what this test is about is the outbound side).
        Some(
            json!({"type": "meshbpf-cni", "pin_dir": env.pin_dir, "state_dir": state_dir,
                    "log_file": log, "no_inbound": true}),
        ),
    );
    pm.network(&plain_net, &format!("mbp{short}"), "203.0.113.0/24", None);

    pm.start(
        "srv",
        &mesh_net,
        &["/bin/httpd", "-f", "-p", "8080", "-h", "/www"],
    );
    pm.start(
        "srv-plain",
        &plain_net,
        &["/bin/httpd", "-f", "-p", "8080", "-h", "/www"],
    );
    let srv = pm.ip("srv", &mesh_net);
    let srv_plain = pm.ip("srv-plain", &plain_net);
    let app_cmd = fetch_on_signal("app", &format!("http://{srv}:8080/index.html"));
    let plain_cmd = fetch_on_signal("plain", &format!("http://{srv_plain}:8080/index.html"));
    pm.start(
        "app",
        &mesh_net,
        &app_cmd.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    pm.start(
        "plain",
        &plain_net,
        &plain_cmd.iter().map(String::as_str).collect::<Vec<_>>(),
    );

    // podman ran the chain: every container on the mesh network is registered, with its
    // attachment remembered; the other network's containers are not.
    let (app_cookie, srv_cookie) = (cookie(&pm.netns("app")), cookie(&pm.netns("srv")));
    let plain_cookie = cookie(&pm.netns("plain"));
    let mut expected = vec![app_cookie, srv_cookie];
    expected.sort();
    assert_eq!(registered_cookies(&env.pin_dir), expected);
    assert!(!registered_cookies(&env.pin_dir).contains(&plain_cookie));
    let app_id = pm.id("app");
    let state = state_dir.join(&mesh_net).join(format!("{app_id}.eth0"));
    assert!(state.exists(), "no state at {}", state.display());
    let logged = fs::read_to_string(&log).unwrap();
    // Its line names the container and the netns podman gave it.
    assert!(
        logged
            .lines()
            .any(|l| l.contains(&format!("ADD container={app_id} netns=/"))
                && l.contains(" ifname=eth0: registered")),
        "{logged}"
    );

    // The workloads run in the attached cgroup; the app's pod gets its sidecar.
    let app = env.adopt("app", pm.netns("app"), pm.ip("app", &mesh_net));
    let plain = env.adopt("plain", pm.netns("plain"), pm.ip("plain", &plain_net));
    move_into(&app.cgroup, pm.pid("app"));
    move_into(&plain.cgroup, pm.pid("plain"));
    let sidecar = app.sidecar();
    for name in ["app", "plain"] {
        fs::write(pm.file(&format!("/tmp/go-{name}")), "").unwrap();
    }
    for name in ["app", "plain"] {
        assert_eq!(
            wait_for_file(&pm.file(&format!("/tmp/rc-{name}"))).trim(),
            "0",
            "{name}"
        );
        assert_eq!(
            fs::read_to_string(pm.file(&format!("/tmp/out-{name}"))).unwrap(),
            "hello from httpd\n"
        );
    }
    // The app's request went through the sidecar, which learned where it was going; the
    // container on the plain network connected straight to its server.
    let events = sidecar.lines("outbound ");
    assert_eq!(events.len(), 1, "{events:?}\n{}", sidecar.output());
    assert!(
        events[0].contains(&format!("original_dst={srv}:8080 upstream=connected")),
        "{events:?}"
    );
    assert_eq!(counter(&mesh, "connect_redirected"), 1);
    assert_eq!(counter(&mesh, "getsockopt_answered"), 1);

    // podman rm runs DEL: the container leaves the mesh and its state goes.
    pm.rm("app");
    assert_eq!(registered_cookies(&env.pin_dir), [srv_cookie]);
    assert!(!state.exists());
    let logged = fs::read_to_string(&log).unwrap();
    assert!(
        logged
            .lines()
            .any(|l| l.contains(&format!("DEL container={app_id} netns="))
                && l.contains(&format!(
                    " ifname=eth0: unregistered netns cookie {app_cookie}"
                ))),
        "{logged}"
    );
    pm.rm("srv");
    pm.rm("plain");
    pm.rm("srv-plain");
    assert!(registered_cookies(&env.pin_dir).is_empty());
    assert!(fs::read_dir(state_dir.join(&mesh_net))
        .unwrap()
        .next()
        .is_none());
}

/// Copies `binary` and the shared libraries it loads into `root`, at their own paths.
fn install_with_libraries(binary: &Path, root: &Path, name: &str) {
    fs::copy(binary, root.join(name)).unwrap();
    let ldd = Command::new("ldd").arg(binary).output().unwrap();
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        let path = line
            .split_whitespace()
            .find(|w| w.starts_with('/'))
            .map(PathBuf::from);
        if let Some(path) = path {
            let to = root.join(path.strip_prefix("/").unwrap());
            fs::create_dir_all(to.parent().unwrap()).unwrap();
            fs::copy(&path, &to).unwrap();
        }
    }
}

#[test]
fn an_init_container_registers_its_pod_with_only_sys_admin_and_the_pin_dir_mounted() {
    if !privileged() || !runtime_available() {
        return;
    }
    let env = Env::new();
    let mesh = env.attach();
    let mut pm = Podman::new(&env);
    let short = env.id.replace('x', "");
    let net = format!("mbt-pod-{}", env.id);
    pm.network(&net, &format!("mbi{short}"), "192.0.2.0/24", None);
    install_with_libraries(&cli(), &pm.rootfs, "meshbpf");
    // The pod: its first container holds the netns; init containers join it, each with a
    // pid namespace of its own where meshbpf is pid 1, as on Kubernetes.
    pm.start("web", &net, &["/bin/sleep", "600"]);
    let web = cookie(&pm.netns("web"));
    let pin = env.pin_dir.to_str().unwrap();
    let volume = format!("{pin}:{pin}");
    let register = [
        "/meshbpf",
        "register",
        "--netns",
        "/proc/self/ns/net",
        "--pin-dir",
        pin,
    ];
    let in_pod = "container:web";

    // Without CAP_SYS_ADMIN it is refused, with the capability named.
    let out = pm.run(
        "init-nocaps",
        in_pod,
        &[
            "--cap-drop",
            "all",
            "--cap-add",
            "bpf,net_admin",
            "-v",
            &volume,
        ],
        &register,
    );
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("CAP_SYS_ADMIN"),
        "{out:?}"
    );
    // In the host's network namespace (a hostNetwork pod) it is refused.
    let out = pm.run(
        "init-host",
        "host",
        &["--cap-drop", "all", "--cap-add", "sys_admin", "-v", &volume],
        &register,
    );
    assert_eq!(out.status.code(), Some(6), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("host's own network namespace"),
        "{out:?}"
    );
    assert!(mesh.pods().unwrap().is_empty());

    // With every capability dropped but CAP_SYS_ADMIN and CAP_NET_ADMIN, no privilege
    // escalation, and the pin dir mounted (deploy/pod-init-container.yaml): registered.
    let out = pm.run(
        "init",
        in_pod,
        &[
            "--cap-drop",
            "all",
            "--cap-add",
            "sys_admin,net_admin",
            "--security-opt",
            "no-new-privileges",
            "-v",
            &volume,
        ],
        &register,
    );
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!("(netns cookie {web})")),
        "{out:?}"
    );
    assert_eq!(registered_cookies(&env.pin_dir), [web]);
}

/// The capabilities deploy/`file` (the chart's rendering: tests/chart.rs) adds to the
/// container `name`.
fn manifest_capabilities(file: &str, name: &str) -> Vec<String> {
    let path = common::repo_root().join("deploy").join(file);
    let text = fs::read_to_string(path).unwrap();
    common::manifests::list_after(&text, &format!("- name: {name}\n"), "add")
}

/// `podman run` flags for the chart's security context: every capability dropped but `caps`,
/// no privilege escalation, a read-only root, AppArmor unconfined, the runtime's default
/// seccomp profile.
fn locked_down(caps: &str) -> Vec<String> {
    [
        "--read-only",
        "--read-only-tmpfs=false",
        "--cap-drop",
        "all",
        "--cap-add",
        caps,
        "--security-opt",
        "no-new-privileges",
        "--security-opt",
        "apparmor=unconfined",
    ]
    .map(String::from)
    .to_vec()
}

#[test]
fn the_agent_runs_in_a_container_as_the_chart_runs_it_with_the_runtime_s_default_seccomp_profile() {
    if !privileged() || !runtime_available() {
        return;
    }
    let mut env = Env::new();
    let dirs = CniDirs::new(&env.root);
    let primary = dirs.primary();
    let (running, _sidecar, outbound) = pod_with_running_sidecar(&mut env, "running");
    let conf_dir = env.root.join("plugin-conf");
    let state_parent = env.root.join("run");
    fs::create_dir_all(&conf_dir).unwrap();
    fs::create_dir_all(state_parent.join("cni")).unwrap();
    fs::write(
        conf_dir.join("plugin.json"),
        json!({"state_dir": state_parent.join("cni"), "outbound_port": outbound}).to_string(),
    )
    .unwrap();
    let pm = Podman::new(&env);
    install_with_libraries(&cli(), &pm.rootfs, "meshbpf");
    install_with_libraries(&cni_plugin(), &pm.rootfs, "meshbpf-cni");
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let caps = manifest_capabilities("meshbpf.yaml", "agent").join(",");
    let bpffs = env.bpffs.to_str().unwrap();
    // The chart's pod: the node's network and pid namespaces, every capability dropped but
    // the chart's, no privilege escalation, a read-only root, the runtime's default seccomp
    // profile, AppArmor unconfined; its volumes at the chart's paths (the test's bpffs, cgroup
    // and CNI dirs in place of the node's).
    let volumes = [
        format!("{bpffs}:{bpffs}:rslave"),
        format!("{}:/host/sys/fs/cgroup:ro", env.cgroup.display()),
        "/run/netns:/run/netns:ro,rslave".to_string(),
        format!("{}:/host/opt/cni/bin", dirs.bin.display()),
        format!("{}:/host/etc/cni/net.d", dirs.conf.display()),
        format!("{}:/etc/meshbpf:ro", conf_dir.display()),
    ];
    let mut extra = locked_down(&caps);
    extra.extend(["-d".into(), "--pid".into(), "host".into()]);
    for v in &volumes {
        extra.extend(["-v".into(), v.clone()]);
    }
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let pin = format!("--pin-dir={}", env.pin_dir.display());
    let listen = format!("--listen={addr}");
    let out = pm.run(
        "agent",
        "host",
        &extra,
        &[
            "/meshbpf",
            "agent",
            "--cgroup=/host/sys/fs/cgroup",
            &pin,
            "--cni-bin-dir=/host/opt/cni/bin",
            "--cni-conf-dir=/host/etc/cni/net.d",
            "--plugin-conf=/etc/meshbpf/plugin.json",
            &listen,
            "--gc-interval=1",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let logs = || pm.podman(&["logs", "agent"]);
    let healthz = || {
        std::net::TcpStream::connect(&addr)
            .and_then(|mut s| {
                use std::io::{Read, Write};
                write!(
                    s,
                    "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                )?;
                let mut r = String::new();
                s.read_to_string(&mut r)?;
                Ok(r)
            })
            .is_ok_and(|r| r.starts_with("HTTP/1.1 200"))
    };
    wait_until(healthz, || {
        format!("the agent never got ready:\n{}", logs())
    });
    assert_eq!(env.attached_hooks().len(), ATTACH_TYPES.len());
    assert!(dirs.bin.join("meshbpf-cni").exists());
    assert!(fs::read_to_string(&primary)
        .unwrap()
        .contains("meshbpf-cni"));
    let running_cookie = cookie(&running.netns);
    wait_until(
        || registered_cookies(&env.pin_dir).contains(&running_cookie),
        || format!("the running pod was not found:\n{}", logs()),
    );
    // A pod whose namespace only the runtime's pin (made after the agent started) holds
    // stays registered through gc; once the namespace is gone, gc unregisters it.
    let pinned = env.pod("pinned");
    let pinned_cookie = meshbpf::Mesh::open(&env.pin_dir)
        .unwrap()
        .register_netns(&pinned.netns, &meshbpf::PodSettings::default())
        .unwrap()
        .netns_cookie;
    std::thread::sleep(scaled(Duration::from_millis(2500)));
    assert!(
        registered_cookies(&env.pin_dir).contains(&pinned_cookie),
        "{}",
        logs()
    );
    sh(Command::new("ip").args(["netns", "del", &pinned.name]));
    wait_until(
        || !registered_cookies(&env.pin_dir).contains(&pinned_cookie),
        || format!("gc never unregistered the deleted pod:\n{}", logs()),
    );
    pm.rm("agent");

    // Uninstall mode's init container, with its capabilities and volumes.
    let caps = manifest_capabilities("uninstall.yaml", "uninstall").join(",");
    let state = format!("{}:{}", state_parent.display(), state_parent.display());
    let mut extra = locked_down(&caps);
    extra.extend(["-v".into(), state]);
    for v in [&volumes[0], &volumes[3], &volumes[4], &volumes[5]] {
        extra.extend(["-v".into(), v.clone()]);
    }
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let out = pm.run(
        "uninstall",
        "host",
        &extra,
        &[
            "/meshbpf",
            "agent",
            "--uninstall",
            &pin,
            "--cni-bin-dir=/host/opt/cni/bin",
            "--cni-conf-dir=/host/etc/cni/net.d",
            "--plugin-conf=/etc/meshbpf/plugin.json",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    assert!(env.attached_hooks().is_empty());
    assert!(!env.pin_dir.exists());
    assert!(!dirs.bin.join("meshbpf-cni").exists());
    assert!(!fs::read_to_string(&primary)
        .unwrap()
        .contains("meshbpf-cni"));
    assert!(!state_parent.join("cni").exists());
}
