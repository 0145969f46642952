//! SSH remotes: an `sshd` on loopback with a test key, serving the same fixtures. Parity with the
//! default checkout, host keys accepted on first contact (the agent 4.x policy) or refused with
//! `BUILDKITE_SSH_KEYSCAN=false`, and a deploy key given as `BUILDKITE_GIT_SSH_KEY` that never
//! reaches a log.

use stateless_e2e::parity::{MirrorState, Parity};
use stateless_e2e::scenario::Served;
use stateless_e2e::sshd::Sshd;

/// The fixture served over SSH as well, with `state`; `None` when sshd is not installed.
fn over_ssh(state: MirrorState) -> Option<(Parity, Sshd)> {
    let served = Served::new("acme/widgets.git");
    let sshd = Sshd::start(&served.sandbox.dir.path().join("sshd"))?;
    std::fs::create_dir_all(served.sandbox.home.join(".ssh")).unwrap();
    let url = sshd.url(&served.upstream.bare);
    Some((Parity::around_url(served, url, state), sshd))
}

/// ssh as the job's environment would configure it, isolated from this machine's config: its
/// known_hosts in the sandbox's HOME.
fn ssh_command(p: &Parity, key: Option<&std::path::Path>) -> String {
    let known = p.sandbox().home.join(".ssh/known_hosts");
    let mut cmd = format!(
        "ssh -F /dev/null -o BatchMode=yes -o GlobalKnownHostsFile=/dev/null -o UserKnownHostsFile={}",
        known.display()
    );
    if let Some(key) = key {
        cmd.push_str(&format!(" -i {} -o IdentitiesOnly=yes", key.display()));
    }
    cmd
}

#[test]
fn ssh_checkouts_match_the_default_checkout_and_trust_the_host_on_first_contact() {
    for state in MirrorState::ALL {
        let Some((p, sshd)) = over_ssh(state) else {
            return;
        };
        let main = p.served.upstream.rev("main");
        let ssh = ssh_command(&p, Some(&sshd.client_key));
        for (commit, branch) in [(main.as_str(), "main"), ("HEAD", "feature")] {
            p.next_job();
            let Some(c) = p.compare(&[
                ("BUILDKITE_COMMIT", commit),
                ("BUILDKITE_BRANCH", branch),
                ("GIT_SSH_COMMAND", ssh.as_str()),
                // The replay's 4.x host-key policy, which the hook follows: 3.x scans port 22
                // whatever the URL's port, so it cannot reach a server on another port.
                ("BK_AGENT_COMPAT", "v4"),
            ]) else {
                return;
            };
            c.assert_same();
        }
        let known = std::fs::read_to_string(p.sandbox().home.join(".ssh/known_hosts")).unwrap();
        assert!(known.contains(&sshd.known_hosts_name()), "{known}");
        assert!(known.contains(&sshd.host_key), "{known}");
    }
}

#[test]
fn a_deploy_key_given_by_value_is_used_and_never_logged() {
    let Some((p, sshd)) = over_ssh(MirrorState::UpToDate) else {
        return;
    };
    let key = std::fs::read_to_string(&sshd.client_key).unwrap();
    let main = p.served.upstream.rev("main");

    let out = p
        .sandbox()
        .hook()
        .job(&p.url, &main, "main")
        .env("GIT_SSH_COMMAND", ssh_command(&p, None))
        .env("BUILDKITE_GIT_SSH_KEY", &key)
        .run();

    assert_eq!(out.code(), Some(0), "{}", out.log());
    assert_eq!(p.sandbox().git(&["rev-parse", "HEAD"]), main);
    let key_body = key.lines().nth(1).unwrap();
    assert!(!out.log().contains(key_body));
    let record = std::fs::read_to_string(&p.sandbox().record).unwrap();
    assert!(!record.contains(key_body));
    let leftovers: Vec<_> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("checkout-ssh-"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "the key file is removed: {leftovers:?}"
    );
}

#[test]
fn an_unknown_host_is_refused_when_keyscan_is_off() {
    let Some((p, sshd)) = over_ssh(MirrorState::Absent) else {
        return;
    };
    let main = p.served.upstream.rev("main");

    let out = p
        .sandbox()
        .hook()
        .job(&p.url, &main, "main")
        .env("GIT_SSH_COMMAND", ssh_command(&p, Some(&sshd.client_key)))
        .env("BUILDKITE_SSH_KEYSCAN", "false")
        .run();

    // git's own status, as the agent passes it on.
    assert_eq!(out.code(), Some(128), "{}", out.log());
    assert!(
        out.log().contains("Host key verification failed"),
        "{}",
        out.log()
    );
    assert!(out.log().contains("known_hosts"), "{}", out.log());
    assert_eq!(p.sandbox().record()["attempts"], 1, "not retried");
}
