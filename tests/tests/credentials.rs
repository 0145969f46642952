//! Git credentials as the manifests wire them (docs/credentials.md): the `GIT_CONFIG_*` variables
//! a manifest's container sets, read from the manifest itself, pointing at its optional Secrets
//! laid out as the kubelet lays them out (root's files, the pod's fsGroup, the volume's mode), run
//! as the pod's user where that matters. An SSH key with strict host keys, a `.git-credentials`
//! file, and a GitHub App whose tokens a fake GitHub API mints; the checkout hook, the agent's
//! job and populate-mirror all use them, and no credential reaches a log, a record, a report or
//! the volume.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;
use serde_json::Value;
use stateless_e2e::fake_github::{self, FakeGitHub};
use stateless_e2e::loopback;
use stateless_e2e::sandbox::{bin, Invocation, Sandbox};
use stateless_e2e::scenario::Served;
use stateless_e2e::sshd::Sshd;
use stateless_e2e::tls_front::TlsFront;

const REPO: &str = "acme/widgets.git";
const REFERENCE: &str = "acme/widgets.reference";
const AGENT_JOB: &str = "image/k8s/agent-job.yaml";
const POPULATE_CRONJOB: &str = "image/storage/shared/populate-cronjob.yaml";
const NODE_LOCAL_DAEMONSET: &str = "image/storage/node-local/daemonset.yaml";
/// Where the manifests mount the credentials' Secrets.
const SECRETS_ROOT: &str = "/etc/stateless-agent";
const GITHUB: &str = "https://github.com";
const APP_ID: &str = "123456";
const INSTALLATION: &str = "7890123";

// ---------------------------------------------------------------------------------------------
// SSH: the git-ssh Secret.

#[test]
fn an_ssh_key_secret_checks_out_as_the_pods_user_with_host_keys_from_the_secret() {
    let Some(mut w) = SshWorld::new() else { return };
    let commit = w.newer_than_the_mirror();
    let known_hosts = format!("{} {}\n", w.sshd.known_hosts_name(), w.sshd.host_key);
    let agent = Pod::of(AGENT_JOB, "agent");
    let secrets = agent.secrets(
        &w.served.sandbox,
        &[("git-ssh", w.ssh_secret(&known_hosts))],
    );

    let out = agent
        .as_its_user(secrets.env(w.served.sandbox.hook()), &w.served.sandbox)
        .job(&w.url, &commit, "main")
        .run();

    assert_eq!(out.code(), Some(0), "{}", out.log());
    let checkout = std::fs::metadata(w.served.sandbox.checkout.join(".git")).unwrap();
    let owner = std::os::unix::fs::MetadataExt::uid(&checkout);
    assert_eq!(owner, agent.user.0, "checked out as the pod's user");
    let record = w.served.sandbox.record();
    assert_eq!(record["commit"], commit.as_str(), "{record}");
    assert_eq!(record["mirror"]["status"], "hit", "{record}");
    assert!(
        record["bytes_fetched"].as_u64() > Some(0),
        "the commit the mirror lacks came over SSH: {record}"
    );
}

#[test]
fn a_host_the_secrets_known_hosts_does_not_vouch_for_fails_once_naming_known_hosts() {
    let Some(mut w) = SshWorld::new() else { return };
    let commit = w.newer_than_the_mirror();
    let impostor = w.served.sandbox.dir.path().join("impostor");
    keygen(&impostor);
    let impostor = std::fs::read_to_string(impostor.with_extension("pub")).unwrap();
    let impostor: Vec<&str> = impostor.split_whitespace().take(2).collect();
    let changed = format!("{} {}\n", w.sshd.known_hosts_name(), impostor.join(" "));
    let agent = Pod::of(AGENT_JOB, "agent");
    // A host named with another key, and a host not named at all: the hook's own policy would
    // accept the second on first contact; the Secret's strict checking wins.
    for known_hosts in [changed.as_str(), ""] {
        let sandbox = &w.served.sandbox;
        sandbox.fresh_checkout_dir();
        let secrets = agent.secrets(sandbox, &[("git-ssh", w.ssh_secret(known_hosts))]);

        let out = agent
            .as_its_user(secrets.env(sandbox.hook()), sandbox)
            .job(&w.url, &commit, "main")
            .run();

        assert_eq!(out.code(), Some(128), "{}", out.log());
        let last = out.log().lines().last().unwrap_or_default().to_string();
        assert!(last.contains("Host key verification failed"), "{last}");
        assert!(last.contains("known_hosts"), "{last}");
        let record = sandbox.record();
        assert_eq!(record["cause"], "config", "{record}");
        assert_eq!(record["attempts"], 1, "a host key is not retried: {record}");
    }
}

#[test]
fn populate_mirror_as_the_node_local_daemonset_runs_it_reads_the_key_as_root() {
    let Some(w) = SshWorld::new() else { return };
    let known_hosts = format!("{} {}\n", w.sshd.known_hosts_name(), w.sshd.host_key);
    let daemon = Pod::of(NODE_LOCAL_DAEMONSET, "populate-mirror");
    assert_eq!(daemon.user, (0, 0), "the DaemonSet runs as root");
    let sandbox = &w.served.sandbox;
    let secrets = daemon.secrets(sandbox, &[("git-ssh", w.ssh_secret(&known_hosts))]);
    let mirrors = tempfile::tempdir().unwrap();

    let out = secrets
        .env(sandbox.populate_mirror())
        .env("BUILDKITE_GIT_MIRRORS_PATH", mirrors.path())
        .arg(&w.url)
        .run();

    assert_eq!(out.code(), Some(0), "{}", out.log());
    assert!(
        !out.log().contains("UNPROTECTED PRIVATE KEY"),
        "{}",
        out.log()
    );
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(mirrors.path().join("manifest.json")).unwrap())
            .unwrap();
    assert_eq!(manifest["repositories"][0]["status"], "ok", "{manifest}");
}

// ---------------------------------------------------------------------------------------------
// HTTPS: the git-credentials Secret.

#[test]
fn a_git_credentials_secret_reaches_a_private_https_server() {
    let Some(mut w) = HttpsWorld::new("bob:s3cret-t0ken") else {
        return;
    };
    let commit = w.newer_than_the_mirror();
    let line = format!("https://bob:s3cret-t0ken@{}\n", w.host);
    let agent = Pod::of(AGENT_JOB, "agent");
    let sandbox = &w.served.sandbox;
    let secrets = agent.secrets(
        sandbox,
        &[(
            "git-credentials",
            vec![(".git-credentials", line.into_bytes())],
        )],
    );

    let out = agent
        .as_its_user(w.trusting(secrets.env(sandbox.hook())), sandbox)
        .job(&w.url, &commit, "main")
        .run();

    assert_eq!(out.code(), Some(0), "{}", out.log());
    let record = sandbox.record();
    assert_eq!(record["commit"], commit.as_str(), "{record}");
    assert_eq!(record["mirror"]["status"], "hit", "{record}");
    assert!(
        !out.log().contains("credential storage lock"),
        "git never tries to write the read-only Secret: {}",
        out.log()
    );
    let record = record.to_string();
    assert_nowhere("s3cret-t0ken", &[&out.log(), &record], sandbox.dir.path());
}

#[test]
fn without_credentials_a_private_https_server_fails_once_with_the_fix() {
    let Some(mut w) = HttpsWorld::new("bob:s3cret-t0ken") else {
        return;
    };
    let commit = w.newer_than_the_mirror();
    let agent = Pod::of(AGENT_JOB, "agent");
    let sandbox = &w.served.sandbox;
    let no_secrets = agent.secrets(sandbox, &[]);

    let out = agent
        .as_its_user(w.trusting(no_secrets.env(sandbox.hook())), sandbox)
        .job(&w.url, &commit, "main")
        .run();

    assert_eq!(out.code(), Some(128), "{}", out.log());
    let last = out.log().lines().last().unwrap_or_default().to_string();
    assert!(last.contains("could not read Username"), "{last}");
    assert!(last.contains("docs/credentials.md"), "{last}");
    let record = sandbox.record();
    assert_eq!(record["cause"], "config", "{record}");
    assert_eq!(record["attempts"], 1, "missing credentials are not retried");
}

// ---------------------------------------------------------------------------------------------
// GitHub App: the github-app Secret, tokens from a fake GitHub API.

#[test]
fn github_app_tokens_fetch_a_private_repository_for_populate_mirror_the_hook_and_the_job() {
    let Some(mut w) = AppWorld::new() else {
        return;
    };
    let app = [("github-app", w.app_secret(APP_ID, INSTALLATION, &w.app_key))];
    // As root: the pod's user reading the Secret through its fsGroup is the SSH and HTTPS
    // scenarios' business; here it is what the helper does with the files.
    let cronjob = Pod::of(POPULATE_CRONJOB, "populate-mirror").secrets(w.sandbox(), &app);
    let populated = w
        .wired(&cronjob, w.sandbox().populate_mirror())
        .arg(&w.https.url)
        .run();
    assert_eq!(populated.code(), Some(0), "{}", populated.log());
    let commit = w.https.served.upstream.advance(1);
    let agent = Pod::of(AGENT_JOB, "agent").secrets(w.sandbox(), &app);

    let job = w
        .wired(&agent, w.sandbox().agent_wrapper())
        .env("AGENT_WRAPPER_IDLE_TIMEOUT", "20s")
        .env("BUILDKITE_STANDIN_JOB_AFTER", "0")
        .env(
            "BUILDKITE_STANDIN_COMMAND",
            format!(
                "git ls-remote {} main >/dev/null && echo the job git is authenticated too",
                w.https.url
            ),
        )
        .job(&w.https.url, &commit, "main")
        .run();

    let sandbox = w.sandbox();
    assert_eq!(job.code(), Some(0), "{}", job.log());
    let report = sandbox.exit_report(&job);
    assert_eq!(report["checkout"]["outcome"], "succeeded", "{report}");
    assert_eq!(report["checkout"]["mirror"], "hit", "{report}");
    assert_eq!(report["checkout"]["commit"], commit.as_str(), "{report}");
    assert!(job.stdout.contains("the job git is authenticated too"));
    let asked = w.github.asked();
    assert!(asked.len() >= 3, "populate, the hook, the job: {asked:?}");
    for request in &asked {
        assert_eq!(request.status, 201, "{asked:?}");
        assert_eq!(
            request.body,
            serde_json::json!({"permissions": {"contents": "read"}, "repositories": ["widgets"]}),
            "each token is narrowed to the repository and to reading it"
        );
    }
    let key = std::fs::read_to_string(&w.app_key).unwrap();
    let key_line = key.lines().nth(1).unwrap();
    let record = std::fs::read_to_string(&sandbox.record).unwrap();
    let texts = [populated.log(), job.log(), report.to_string(), record];
    let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
    for secret in [w.token.as_str(), key_line] {
        assert_nowhere(secret, &texts, sandbox.dir.path());
    }
}

#[test]
fn each_way_the_app_can_be_wrong_fails_with_one_line_naming_the_fix() {
    let Some(w) = AppWorld::new() else {
        return;
    };
    let sandbox = w.sandbox();
    let other_key = sandbox.dir.path().join("secrets/not-the-apps-key.pem");
    fake_github::generate_key(&other_key, false);
    let api = w.api.url("");
    let dead_api = format!("https://127.0.0.1:{}/", loopback::free_port());
    // What is wrong, the Secret and the API, what the error line says, the attempts it gets:
    // GitHub's refusals are final, an API out of reach is the network's.
    let cases = [
        (
            "a key of another App",
            w.app_secret(APP_ID, INSTALLATION, &other_key),
            &api,
            "git-credential-github-app: GitHub refused App 123456's JWT (401 A JSON web token could not be decoded); the private key must be one of that App's keys",
            1,
        ),
        (
            "another App's ID",
            w.app_secret("654321", INSTALLATION, &w.app_key),
            &api,
            "git-credential-github-app: GitHub knows no App 654321 (401 Integration not found); set the App ID",
            1,
        ),
        (
            "an API out of reach",
            w.app_secret(APP_ID, INSTALLATION, &w.app_key),
            &dead_api,
            "git-credential-github-app: unable to access the GitHub API at https://127.0.0.1:",
            2,
        ),
    ];
    for (what, secret, api, says, attempts) in cases {
        sandbox.fresh_checkout_dir();
        let agent = Pod::of(AGENT_JOB, "agent").secrets(sandbox, &[("github-app", secret)]);

        let out = w
            .wired_to(&agent, sandbox.hook(), api)
            .env("BUILDKITE_CHECKOUT_ATTEMPTS", "2")
            .job(&w.https.url, "HEAD", "main")
            .run();

        assert_eq!(out.code(), Some(128), "{what}: {}", out.log());
        let last = out.log().lines().last().unwrap_or_default().to_string();
        assert!(last.contains(says), "{what}: {last}");
        assert_eq!(sandbox.record()["attempts"], attempts, "{what}");
    }

    let wrong_installation = [("github-app", w.app_secret(APP_ID, "999", &w.app_key))];
    let cronjob =
        Pod::of(POPULATE_CRONJOB, "populate-mirror").secrets(sandbox, &wrong_installation);
    let out = w
        .wired(&cronjob, sandbox.populate_mirror())
        .arg(&w.https.url)
        .run();

    assert_eq!(out.code(), Some(3), "{}", out.log());
    assert!(!out.log().contains("retrying"), "a refusal is final");
    let cause =
        "installation 999 of App 123456 was not found (404 Not Found); set the installation ID";
    assert!(
        out.log().lines().any(|l| l.contains(cause)),
        "{}",
        out.log()
    );
    let manifest = std::fs::read_to_string(sandbox.mirrors.join("manifest.json")).unwrap();
    assert!(manifest.contains(cause), "{manifest}");
}

// ---------------------------------------------------------------------------------------------
// The worlds.

/// An upstream served over SSH by an `sshd` on loopback, with a mirror of it at the SSH URL.
struct SshWorld {
    served: Served,
    sshd: Sshd,
    url: String,
}

impl SshWorld {
    fn new() -> Option<SshWorld> {
        if !running_as_root() {
            return None;
        }
        let served = Served::new(REPO);
        let sshd = Sshd::start(&served.sandbox.dir.path().join("sshd"))?;
        let bare = &served.upstream.bare;
        let url = sshd.url(bare);
        // An SSH URL's mirror is named by its whole path.
        let reference = bare.strip_prefix("/").unwrap().with_extension("reference");
        served
            .sandbox
            .mirror_of(bare, &url, reference.to_str().unwrap());
        Some(SshWorld { served, sshd, url })
    }

    /// A commit pushed after the mirror was made.
    fn newer_than_the_mirror(&mut self) -> String {
        self.served.upstream.advance(1)
    }

    /// The git-ssh Secret: the key sshd authorizes, and `known_hosts`.
    fn ssh_secret(&self, known_hosts: &str) -> SecretFiles {
        vec![
            (
                "ssh-privatekey",
                std::fs::read(&self.sshd.client_key).unwrap(),
            ),
            ("known_hosts", known_hosts.as_bytes().to_vec()),
        ]
    }
}

/// An upstream behind HTTPS (`socat` before the smart-HTTP server) that wants `userinfo`.
struct HttpsWorld {
    served: Served,
    tls: TlsFront,
    /// `127.0.0.1:PORT`.
    host: String,
    url: String,
}

impl HttpsWorld {
    fn new(userinfo: &str) -> Option<HttpsWorld> {
        if !running_as_root() {
            return None;
        }
        let served = Served::new(REPO);
        served.server.require_credentials(userinfo);
        let tls_dir = served.sandbox.dir.path().join("tls");
        std::fs::create_dir_all(&tls_dir).unwrap();
        let tls = TlsFront::start(&tls_dir, &served.server.url(""))?;
        let url = tls.url(REPO);
        let host = url
            .trim_start_matches("https://")
            .split('/')
            .next()
            .unwrap()
            .to_string();
        Some(HttpsWorld {
            served,
            tls,
            host,
            url,
        })
    }

    /// A mirror at the HTTPS URL, then a commit it lacks.
    fn newer_than_the_mirror(&mut self) -> String {
        let sandbox = &self.served.sandbox;
        sandbox.mirror_of(&self.served.upstream.bare, &self.url, REFERENCE);
        self.served.upstream.advance(1)
    }

    /// git trusting the front's certificate, as it would a real server's.
    fn trusting(&self, invocation: Invocation) -> Invocation {
        invocation.env("GIT_SSL_CAINFO", &self.tls.certificate)
    }
}

/// [`HttpsWorld`] whose server takes only a GitHub App's installation token, minted by a fake
/// GitHub API (behind TLS too) for the App whose key is `app_key`.
struct AppWorld {
    https: HttpsWorld,
    github: FakeGitHub,
    api: TlsFront,
    app_key: PathBuf,
    token: String,
}

impl AppWorld {
    fn new() -> Option<AppWorld> {
        let token = format!("ghs_{:x}{}", std::process::id(), nanos());
        let https = HttpsWorld::new(&format!("x-access-token:{token}"))?;
        let dir = https.served.sandbox.dir.path().join("github");
        std::fs::create_dir_all(&dir).unwrap();
        let api_dir = dir.join("tls");
        std::fs::create_dir_all(&api_dir).unwrap();
        // Under `secrets/`, which the search for leaked credentials leaves out.
        let app_key = https.served.sandbox.dir.path().join("secrets/app-key.pem");
        std::fs::create_dir_all(app_key.parent().unwrap()).unwrap();
        fake_github::generate_key(&app_key, true);
        let app = fake_github::App {
            id: APP_ID,
            installation_id: INSTALLATION.parse().unwrap(),
            private_key: &app_key,
            repositories: &["widgets"],
        };
        let github = FakeGitHub::start(&dir, app, &token);
        let api = TlsFront::start_with_ca(&api_dir, &github.url())?;
        std::os::unix::fs::symlink(
            bin("git-credential-github-app"),
            https.served.sandbox.bin.join("git-credential-github-app"),
        )
        .unwrap();
        Some(AppWorld {
            https,
            github,
            api,
            app_key,
            token,
        })
    }

    fn sandbox(&self) -> &Sandbox {
        &self.https.served.sandbox
    }

    /// The github-app Secret's files.
    fn app_secret(&self, app_id: &str, installation: &str, key: &Path) -> SecretFiles {
        vec![
            ("app-id", app_id.as_bytes().to_vec()),
            ("installation-id", installation.as_bytes().to_vec()),
            ("private-key.pem", std::fs::read(key).unwrap()),
        ]
    }

    /// `pod`'s wiring for github.com pointed at the loopback server and API instead, as for
    /// GitHub Enterprise Server: the host in the keys, `--api-url` on the helper; the API's
    /// certificate trusted as a private CA's (`SSL_CERT_FILE`).
    fn wired(&self, pod: &Mounted, invocation: Invocation) -> Invocation {
        self.wired_to(pod, invocation, &self.api.url(""))
    }

    /// [`AppWorld::wired`], with the API at `api`.
    fn wired_to(&self, pod: &Mounted, invocation: Invocation, api: &str) -> Invocation {
        let server = self.https.url.trim_end_matches(REPO).trim_end_matches('/');
        let helper_args = format!("--api-url {api}");
        let wired = pod.for_host(GITHUB, server, &helper_args).env(invocation);
        let wired = wired.env("SSL_CERT_FILE", &self.api.certificate);
        self.https.trusting(wired)
    }
}

// ---------------------------------------------------------------------------------------------
// A manifest's pod, for git.

/// A Secret's files: key, content.
type SecretFiles = Vec<(&'static str, Vec<u8>)>;

/// What a manifest gives its container for git: the `GIT_*` variables it sets, its Secret
/// volumes and their modes, its user and fsGroup.
struct Pod {
    env: Vec<(String, String)>,
    /// Secret name, mount path, defaultMode.
    secrets: Vec<(String, String, u32)>,
    /// runAsUser, runAsGroup.
    user: (u32, u32),
    fs_group: Option<u32>,
}

impl Pod {
    fn of(manifest: &str, container: &str) -> Pod {
        let text = std::fs::read_to_string(workspace().join(manifest)).unwrap();
        let doc = serde_yaml_ng::Deserializer::from_str(&text)
            .map(|d| Value::deserialize(d).unwrap())
            .next()
            .unwrap();
        let spec = [
            "/spec/template/spec",
            "/spec/jobTemplate/spec/template/spec",
        ]
        .iter()
        .find_map(|p| doc.pointer(p))
        .unwrap();
        let containers = spec["containers"].as_array().unwrap();
        let c = containers.iter().find(|c| c["name"] == container).unwrap();
        let env = c["env"].as_array().unwrap().iter().filter_map(|e| {
            let name = e["name"].as_str()?;
            let value = e["value"].as_str()?;
            name.starts_with("GIT_")
                .then(|| (name.to_string(), value.to_string()))
        });
        let volume = |name: &str| {
            let volumes = spec["volumes"].as_array().unwrap();
            volumes.iter().find(|v| v["name"] == name).cloned().unwrap()
        };
        let mounts = c["volumeMounts"].as_array().unwrap().iter();
        let secrets = mounts.filter_map(|m| {
            let secret = volume(m["name"].as_str()?)["secret"].clone();
            let name = secret["secretName"].as_str()?.to_string();
            let mode = secret["defaultMode"].as_u64().unwrap_or(0o644) as u32;
            Some((name, m["mountPath"].as_str()?.to_string(), mode))
        });
        let id = |field: &str| spec["securityContext"][field].as_u64().map(|v| v as u32);
        Pod {
            env: env.collect(),
            secrets: secrets.collect(),
            user: (id("runAsUser").unwrap_or(0), id("runAsGroup").unwrap_or(0)),
            fs_group: id("fsGroup"),
        }
    }

    /// Every Secret volume of the pod laid out under the sandbox, those in `given` with their
    /// files and the others empty, as optional Secrets that do not exist are mounted.
    fn secrets(&self, sandbox: &Sandbox, given: &[(&str, SecretFiles)]) -> Mounted {
        let root = sandbox.dir.path().join("secrets").join(nanos().to_string());
        for (name, path, mode) in &self.secrets {
            let dir = root.join(
                path.strip_prefix(SECRETS_ROOT)
                    .unwrap()
                    .trim_start_matches('/'),
            );
            let files = given.iter().find(|(g, _)| g == name);
            let files = files.map(|(_, f)| f.as_slice()).unwrap_or_default();
            secret_volume(&dir, files, *mode, self.fs_group);
        }
        let env = self.env.iter().map(|(name, value)| {
            let moved = value.replace(SECRETS_ROOT, root.to_str().unwrap());
            (name.clone(), moved)
        });
        Mounted { env: env.collect() }
    }

    /// `invocation` run as the pod's user, its groups the fsGroup's, in a mount namespace whose
    /// `/etc/passwd` knows the user as the image's does (ssh refuses to run for a uid without
    /// one); what the hook writes in the sandbox is given to it.
    fn as_its_user(&self, invocation: Invocation, sandbox: &Sandbox) -> Invocation {
        let (uid, gid) = self.user;
        if uid == 0 {
            return invocation;
        }
        let owner = format!("{uid}:{gid}");
        let records = sandbox.record.parent().unwrap();
        std::fs::create_dir_all(records).unwrap();
        for dir in [
            &sandbox.checkout,
            &sandbox.agent_state,
            &records.to_path_buf(),
        ] {
            run(Command::new("chown").args(["-R", &owner]).arg(dir));
        }
        let open = std::fs::Permissions::from_mode(0o755);
        std::fs::set_permissions(sandbox.dir.path(), open).unwrap();
        let mut passwd = std::fs::read_to_string("/etc/passwd").unwrap();
        passwd.push_str(&format!(
            "buildkite:x:{uid}:{gid}::{}:/bin/sh\n",
            sandbox.home.display()
        ));
        let passwd_file = sandbox.dir.path().join("passwd");
        std::fs::write(&passwd_file, passwd).unwrap();
        let groups = self.fs_group.unwrap_or(gid).to_string();
        let script = format!(
            "mount --bind \"$0\" /etc/passwd && exec setpriv --reuid={uid} --regid={gid} --groups={groups} \"$@\""
        );
        let passwd = passwd_file.to_str().unwrap();
        invocation.in_mount_namespace(&script, passwd)
    }
}

/// A pod's git environment, its Secrets laid out.
struct Mounted {
    env: Vec<(String, String)>,
}

impl Mounted {
    fn env(&self, invocation: Invocation) -> Invocation {
        self.env
            .iter()
            .fold(invocation, |inv, (name, value)| inv.env(name, value))
    }

    /// The same wiring with the configuration keys naming `from` naming `to`, and
    /// `helper_args` added to the helpers registered for it.
    fn for_host(&self, from: &str, to: &str, helper_args: &str) -> Mounted {
        let mut env = self.env.clone();
        let helpers: Vec<String> = env
            .iter()
            .filter(|(name, key)| name.starts_with("GIT_CONFIG_KEY_") && key.contains(from))
            .filter(|(_, key)| key.ends_with(".helper"))
            .map(|(name, _)| name.replace("KEY", "VALUE"))
            .collect();
        for (name, value) in env.iter_mut() {
            if name.starts_with("GIT_CONFIG_KEY_") {
                *value = value.replace(from, to);
            }
            if helpers.contains(name) {
                value.push_str(&format!(" {helper_args}"));
            }
        }
        Mounted { env }
    }
}

/// A Secret volume as the kubelet lays it out (`pkg/volume/util/atomic_writer.go`): the files
/// in a timestamped directory, `..data` a link to it, each key a link through `..data`, all
/// root's, with the volume's `mode`; with an fsGroup, given to that group and made
/// group-readable, directories setgid (`pkg/volume/volume_linux.go`, `SetVolumeOwnership` on a
/// read-only volume: mode | 0440).
fn secret_volume(dir: &Path, files: &[(&str, Vec<u8>)], mode: u32, fs_group: Option<u32>) {
    let data = dir.join("..2026_01_01_00_00_00.000000001");
    std::fs::create_dir_all(&data).unwrap();
    let file_mode = fs_group.map_or(mode, |_| mode | 0o440);
    for (key, content) in files {
        let file = data.join(key);
        std::fs::write(&file, content).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(file_mode)).unwrap();
        std::os::unix::fs::chown(&file, Some(0), fs_group).unwrap();
        std::os::unix::fs::symlink(Path::new("..data").join(key), dir.join(key)).unwrap();
    }
    std::os::unix::fs::symlink(data.file_name().unwrap(), dir.join("..data")).unwrap();
    let dir_mode = fs_group.map_or(0o755, |_| 0o2755);
    for d in [dir, data.as_path()] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(dir_mode)).unwrap();
        std::os::unix::fs::chown(d, Some(0), fs_group).unwrap();
    }
}

/// Fails unless `secret` is in none of `texts` and in no file under `dir` (the Secrets' own
/// `secrets/` aside): the mirror root, the checkout, the records, the agent's state.
fn assert_nowhere(secret: &str, texts: &[&str], dir: &Path) {
    for text in texts {
        assert!(!text.contains(secret), "a credential was printed: {text}");
    }
    for entry in walkdir::WalkDir::new(dir).into_iter().flatten() {
        let in_secrets = entry
            .path()
            .components()
            .any(|c| c.as_os_str() == "secrets");
        if in_secrets || !entry.file_type().is_file() {
            continue;
        }
        let bytes = std::fs::read(entry.path()).unwrap_or_default();
        let found = bytes.windows(secret.len()).any(|w| w == secret.as_bytes());
        assert!(!found, "{} holds a credential", entry.path().display());
    }
}

// ---------------------------------------------------------------------------------------------

/// Laying Secrets out as root's and switching users need root, as CI runs.
fn running_as_root() -> bool {
    // /proc/self belongs to the process's effective user.
    let root =
        std::fs::metadata("/proc/self").is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0);
    if !root {
        eprintln!("skipping: laying Secrets out as the kubelet does needs root");
    }
    root
}

fn workspace() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

fn keygen(path: &Path) {
    run(Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(path));
}

fn run(cmd: &mut Command) {
    let status = cmd.status().unwrap();
    assert!(status.success(), "{cmd:?}");
}

fn nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}
