//! The release pipeline (`.buildkite/release.yml`, docs/releases.md) as far as it runs without a
//! registry: the version check that holds a tag to the workspace's version and the overlays' image
//! tag; the install manifests rendered with every image pinned to a (made-up) digest, exactly as
//! the overlays render them otherwise; the check of the manifest list read back from the registry;
//! the release notes' verification commands; and the pipeline file and its step scripts as a shell
//! and Buildkite read them. Building, pushing, signing and attesting need a registry, Sigstore and
//! agents of both architectures, so only the release pipeline does them.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde::Deserialize;
use serde_json::Value;
use stateless_e2e::fake_kube::kubectl_installed;

const REGISTRY: &str = "registry.example.com/team";
/// A digest no registry has: the render only writes it down.
const DIGEST: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
/// What the agent Job template names its image: job-dispatcher replaces it with its own.
const PLACEHOLDER: &str = "stateless-agent";

fn workspace() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

fn pinned() -> String {
    format!("{REGISTRY}/stateless-agent@{DIGEST}")
}

/// The workspace's version: this crate inherits it (`version.workspace = true`).
fn workspace_version() -> String {
    env!("CARGO_PKG_VERSION").to_string()
}

/// A step script of `.buildkite/steps` under `root`, with none of the pipeline's variables set from
/// the environment the tests run in.
fn step_in(root: &Path, script: &str) -> Command {
    let mut cmd = Command::new(root.join(".buildkite/steps").join(script));
    for var in [
        "BUILDKITE_TAG",
        "BUILDKITE_ORGANIZATION_SLUG",
        "BUILDKITE_PIPELINE_SLUG",
        "REGISTRY",
        "SIGNING",
        "IMAGE_DIGEST",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

fn step(script: &str) -> Command {
    step_in(workspace(), script)
}

struct Ran {
    ok: bool,
    stdout: String,
    stderr: String,
}

fn run(cmd: &mut Command) -> Ran {
    let Output {
        status,
        stdout,
        stderr,
    } = cmd.output().expect("the step runs");
    Ran {
        ok: status.success(),
        stdout: String::from_utf8(stdout).unwrap(),
        stderr: String::from_utf8(stderr).unwrap(),
    }
}

/// A failure a person reads in the build log: exactly one line, mentioning each of `words`.
fn assert_one_line_naming(ran: &Ran, words: &[&str]) {
    assert!(!ran.ok, "it should have failed: {}", ran.stderr);
    let text = ran.stderr.trim();
    assert_eq!(text.lines().count(), 1, "one line, not: {text}");
    for word in words {
        assert!(text.contains(word), "{word:?} is not in: {text}");
    }
}

/// Every YAML document of `text`, as JSON.
fn documents(text: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(text)
        .map(|d| Value::deserialize(d).unwrap())
        .filter(|d| !d.is_null())
        .collect()
}

/// Every `image` field anywhere in `value`.
fn images(value: &Value, found: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, v) in map {
                match (key.as_str(), v) {
                    ("image", Value::String(image)) => found.push(image.clone()),
                    _ => images(v, found),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| images(v, found)),
        _ => {}
    }
}

/// `value` with every `image` field that is not the placeholder set to `to`.
fn repinned(value: &Value, to: &str) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(key, v)| match (key.as_str(), v) {
                    ("image", Value::String(image)) if image != PLACEHOLDER => {
                        (key.clone(), Value::String(to.into()))
                    }
                    _ => (key.clone(), repinned(v, to)),
                })
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(|v| repinned(v, to)).collect()),
        other => other.clone(),
    }
}

/// `kubectl kustomize image/overlays/<overlay>`, as the overlay is applied by tag.
fn kustomize(overlay: &str) -> Vec<Value> {
    let out = run(Command::new("kubectl")
        .arg("kustomize")
        .arg(workspace().join("image/overlays").join(overlay)));
    assert!(out.ok, "kubectl kustomize {overlay}: {}", out.stderr);
    documents(&out.stdout)
}

/// Runs render-manifests.sh with the made-up digest; the directory it wrote.
fn render() -> tempfile::TempDir {
    let out = tempfile::tempdir().unwrap();
    let ran = run(step("render-manifests.sh")
        .arg(REGISTRY)
        .arg(DIGEST)
        .arg(out.path()));
    assert!(ran.ok, "render-manifests.sh failed: {}", ran.stderr);
    out
}

/// The rendered `file` of `overlay`: every workload's image is the pinned one, the agent template
/// in the dispatcher's ConfigMap keeps the placeholder (the dispatcher fills it with its own, pinned,
/// image), and nothing else differs from the overlay rendered by tag.
fn assert_pinned(dir: &Path, overlay: &str, file: &str) {
    let text = std::fs::read_to_string(dir.join(file)).unwrap();
    let rendered = documents(&text);
    let pinned = pinned();

    let mut workload_images = Vec::new();
    let mut template_images = Vec::new();
    for doc in &rendered {
        let name = doc["metadata"]["name"].as_str().unwrap_or_default();
        if doc["kind"] == "ConfigMap" && name.contains("job-dispatcher-template") {
            for template in doc["data"].as_object().unwrap().values() {
                for inner in documents(template.as_str().unwrap()) {
                    images(&inner, &mut template_images);
                }
            }
        }
        images(doc, &mut workload_images);
    }
    assert!(
        !workload_images.is_empty(),
        "{file}: no workload names an image"
    );
    assert!(
        workload_images.iter().all(|i| *i == pinned),
        "{file}: not every image is {pinned}: {workload_images:?}"
    );
    assert_eq!(template_images, [PLACEHOLDER], "{file}: the agent template");

    // As text too: every `image:` line is pinned but the template's one placeholder line.
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim_start)
        .map(|l| l.trim_start_matches("- "))
        .filter_map(|l| l.strip_prefix("image:"))
        .map(str::trim)
        .collect();
    let unpinned: Vec<_> = lines.iter().filter(|l| **l != pinned).collect();
    assert_eq!(unpinned, [&PLACEHOLDER], "{file}: the image lines");

    // Nothing but the images changed: the overlay by tag, repinned, is the same documents.
    let by_tag: Vec<Value> = kustomize(overlay)
        .iter()
        .map(|d| repinned(d, &pinned))
        .collect();
    assert_eq!(
        rendered, by_tag,
        "{file} differs from image/overlays/{overlay} by more than the images"
    );
}

#[test]
fn the_quick_start_renders_with_every_image_pinned_by_digest() {
    if !kubectl_installed() {
        return;
    }
    let dir = render();
    assert_pinned(dir.path(), "quick-start", "install.yaml");
    let text = std::fs::read_to_string(dir.path().join("install.yaml")).unwrap();
    assert!(
        text.starts_with("# stateless-agent, image/overlays/quick-start"),
        "a header says what the file is"
    );
}

#[test]
fn the_second_queue_renders_with_every_image_pinned_by_digest() {
    if !kubectl_installed() {
        return;
    }
    let dir = render();
    assert_pinned(dir.path(), "second-queue", "second-queue.yaml");
    let docs = documents(&std::fs::read_to_string(dir.path().join("second-queue.yaml")).unwrap());
    let deployment = docs.iter().find(|d| d["kind"] == "Deployment").unwrap();
    assert!(deployment["metadata"]["name"]
        .as_str()
        .unwrap()
        .starts_with("gpu-"));
}

#[test]
fn the_render_refuses_a_digest_or_registry_it_cannot_pin_to() {
    let out = tempfile::tempdir().unwrap();
    let short = run(step("render-manifests.sh")
        .args([REGISTRY, "sha256:0123"])
        .arg(out.path()));
    assert_one_line_naming(&short, &["sha256:0123", "DIGEST"]);

    let tagged = run(step("render-manifests.sh")
        .args([REGISTRY, "latest"])
        .arg(out.path()));
    assert_one_line_naming(&tagged, &["latest", "DIGEST"]);

    let scheme = run(step("render-manifests.sh")
        .args(["docker://registry.example.com/team", DIGEST])
        .arg(out.path()));
    assert_one_line_naming(&scheme, &["docker://registry.example.com/team", "REGISTRY"]);
    assert_eq!(std::fs::read_dir(out.path()).unwrap().count(), 0);
}

#[test]
fn the_version_check_passes_the_tag_of_the_workspace_version() {
    let version = workspace_version();
    let ran = run(step("check-version.sh").arg(format!("v{version}")));
    assert!(ran.ok, "{}", ran.stderr);
    assert_eq!(ran.stdout, format!("{version}\n"));

    let from_buildkite = run(step("check-version.sh").env("BUILDKITE_TAG", format!("v{version}")));
    assert_eq!(from_buildkite.stdout, format!("{version}\n"));
}

#[test]
fn the_version_check_refuses_another_tag_naming_both_versions() {
    let version = workspace_version();
    let ran = run(step("check-version.sh").arg("v9.9.9"));
    assert_one_line_naming(&ran, &["v9.9.9", "9.9.9", &version, "Cargo.toml"]);
    assert_eq!(ran.stdout, "", "no version to release");

    let not_semver = run(step("check-version.sh").arg("release-1"));
    assert_one_line_naming(&not_semver, &["release-1", "vX.Y.Z"]);

    let no_tag = run(&mut step("check-version.sh"));
    assert_one_line_naming(&no_tag, &["no tag", "vX.Y.Z"]);
}

/// A copy of what the version check reads (Cargo.toml, Cargo.lock, the overlays), with the second
/// queue's image tag left behind at an older release.
#[test]
fn the_version_check_refuses_an_overlay_whose_image_tag_is_another_release() {
    let version = workspace_version();
    let copy = tempfile::tempdir().unwrap();
    let root = copy.path();
    std::fs::create_dir_all(root.join(".buildkite/steps")).unwrap();
    std::fs::copy(
        workspace().join(".buildkite/steps/check-version.sh"),
        root.join(".buildkite/steps/check-version.sh"),
    )
    .unwrap();
    for file in ["Cargo.toml", "Cargo.lock"] {
        std::fs::copy(workspace().join(file), root.join(file)).unwrap();
    }
    for overlay in ["quick-start", "second-queue"] {
        let to = root.join("image/overlays").join(overlay);
        std::fs::create_dir_all(&to).unwrap();
        let mut text = std::fs::read_to_string(
            workspace()
                .join("image/overlays")
                .join(overlay)
                .join("kustomization.yaml"),
        )
        .unwrap();
        if overlay == "second-queue" {
            let tag = format!("newTag: \"{version}\"");
            assert!(text.contains(&tag), "the overlay has {tag}");
            text = text.replace(&tag, "newTag: \"0.0.1-old\"");
        }
        std::fs::write(to.join("kustomization.yaml"), text).unwrap();
    }

    let ran = run(step_in(root, "check-version.sh").arg(format!("v{version}")));
    assert_one_line_naming(
        &ran,
        &[
            &format!("v{version}"),
            "0.0.1-old",
            "image/overlays/second-queue/kustomization.yaml",
            "newTag",
        ],
    );
}

/// A manifest list as a registry serves it, listing `platforms` (architecture, digest).
fn index_json(platforms: &[(&str, &str)]) -> String {
    let manifests: Vec<Value> = platforms
        .iter()
        .map(|(arch, digest)| {
            serde_json::json!({
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": digest,
                "size": 1234,
                "platform": {"architecture": arch, "os": "linux"},
            })
        })
        .collect();
    serde_json::to_string(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": manifests,
    }))
    .unwrap()
}

fn jq_installed() -> bool {
    let ok = Command::new("jq")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("skipping: jq is not installed (apt-get install jq)");
    }
    ok
}

#[test]
fn the_manifest_list_read_back_is_checked_before_its_digest_is_signed() {
    if !jq_installed() {
        return;
    }
    let amd64 = format!("sha256:{}", "a".repeat(64));
    let arm64 = format!("sha256:{}", "b".repeat(64));
    let dir = tempfile::tempdir().unwrap();
    let check = |name: &str, json: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, json).unwrap();
        run(step("check-index.sh")
            .arg(&path)
            .arg(format!("amd64={amd64}"))
            .arg(format!("arm64={arm64}")))
    };

    let good = index_json(&[("amd64", &amd64), ("arm64", &arm64)]);
    let ran = check("good.json", &good);
    assert!(ran.ok, "{}", ran.stderr);
    // The digest is the sha256 of the bytes the registry served.
    let sum = run(Command::new("sha256sum").arg(dir.path().join("good.json")));
    let expected = format!("sha256:{}", sum.stdout.split_whitespace().next().unwrap());
    assert_eq!(ran.stdout.trim(), expected);

    let missing = check("missing.json", &index_json(&[("amd64", &amd64)]));
    assert_one_line_naming(&missing, &["0 linux/arm64"]);

    let other = format!("sha256:{}", "c".repeat(64));
    let replaced = check(
        "replaced.json",
        &index_json(&[("amd64", &amd64), ("arm64", &other)]),
    );
    assert_one_line_naming(&replaced, &["linux/arm64", &other, &arm64]);

    let extra = check(
        "extra.json",
        &index_json(&[("amd64", &amd64), ("arm64", &arm64), ("s390x", &other)]),
    );
    assert_one_line_naming(&extra, &["3 images", "2"]);

    let single = check(
        "single.json",
        r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}"#,
    );
    assert_one_line_naming(&single, &["not a manifest list"]);
}

fn notes(signing: &str) -> Ran {
    run(step("release-notes.sh")
        .args([&workspace_version(), REGISTRY, DIGEST])
        .env("SIGNING", signing)
        .env("BUILDKITE_ORGANIZATION_SLUG", "acme")
        .env("BUILDKITE_PIPELINE_SLUG", "stateless-agent-release"))
}

#[test]
fn the_release_notes_give_the_digest_and_the_commands_that_verify_it() {
    let keyless = notes("keyless");
    assert!(keyless.ok, "{}", keyless.stderr);
    let text = keyless.stdout;
    let pinned = pinned();
    assert!(text.contains(&format!("\n    {pinned}\n")), "{text}");
    assert!(text.contains(&format!("digest: {DIGEST}")), "{text}");
    for command in [
        format!("cosign verify {pinned}"),
        format!("cosign verify-attestation --type spdxjson {pinned}"),
    ] {
        let at = text
            .find(&command)
            .unwrap_or_else(|| panic!("{command}: {text}"));
        let flags: String = text[at..].lines().take(3).collect();
        assert!(
            flags.contains(
                "--certificate-identity https://buildkite.com/acme/stateless-agent-release"
            ),
            "{flags}"
        );
        assert!(
            flags.contains("--certificate-oidc-issuer https://agent.buildkite.com"),
            "{flags}"
        );
    }

    let key = notes("key");
    assert!(key.ok, "{}", key.stderr);
    assert!(key.stdout.contains("--key cosign.pub"), "{}", key.stdout);
    assert!(!key.stdout.contains("--certificate-identity"));

    let unknown = notes("gpg");
    assert_one_line_naming(&unknown, &["SIGNING", "gpg", "keyless", "key"]);

    let outside_buildkite = run(step("release-notes.sh")
        .args([&workspace_version(), REGISTRY, DIGEST])
        .env("SIGNING", "keyless"));
    assert_one_line_naming(
        &outside_buildkite,
        &["BUILDKITE_ORGANIZATION_SLUG", "BUILDKITE_PIPELINE_SLUG"],
    );
}

/// Every `command` of the pipeline's steps, groups included.
fn commands(steps: &Value, found: &mut Vec<(String, Value)>) {
    for step in steps.as_array().expect("steps is a list") {
        if let Some(inner) = step.get("steps") {
            commands(inner, found);
        } else {
            let command = step["command"].as_str().expect("a command step");
            found.push((command.to_string(), step.clone()));
        }
    }
}

#[test]
fn the_release_pipeline_parses_and_runs_only_its_own_scripts_on_release_agents() {
    let text = std::fs::read_to_string(workspace().join(".buildkite/release.yml")).unwrap();
    let pipeline: Value = serde_yaml_ng::from_str(&text).expect("release.yml is YAML");

    // The tools are pinned to exact versions.
    for tool in ["COSIGN_VERSION", "SYFT_VERSION", "KUBECTL_VERSION"] {
        let version = pipeline["env"][tool].as_str().unwrap_or_default();
        let exact = version.strip_prefix('v').is_some_and(|v| {
            v.split('.').count() == 3 && v.split('.').all(|n| n.parse::<u32>().is_ok())
        });
        assert!(exact, "{tool} is {version:?}, not an exact vX.Y.Z");
    }

    let mut steps = Vec::new();
    commands(&pipeline["steps"], &mut steps);
    let mut arches = BTreeSet::new();
    for (command, step) in &steps {
        let script = command.split_whitespace().next().unwrap();
        assert!(
            script.starts_with(".buildkite/steps/") && script.ends_with(".sh"),
            "{command}: steps run the scripts of .buildkite/steps"
        );
        let path = workspace().join(script);
        let mode = std::os::unix::fs::PermissionsExt::mode(&path.metadata().unwrap().permissions());
        assert!(mode & 0o111 != 0, "{script} is not executable");
        assert_eq!(step["agents"]["queue"], "release", "{command}");
        if let Some(arch) = step["agents"]["arch"].as_str() {
            assert!(command.ends_with(arch), "{command} runs on arch={arch}");
            arches.insert(arch.to_string());
        }
    }
    assert_eq!(arches, BTreeSet::from(["amd64".into(), "arm64".into()]));
    let first = &steps[0].0;
    assert_eq!(
        first, ".buildkite/steps/check-version.sh",
        "the tag is checked first"
    );
}

fn step_scripts() -> Vec<PathBuf> {
    let mut scripts: Vec<PathBuf> = std::fs::read_dir(workspace().join(".buildkite/steps"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "sh"))
        .collect();
    scripts.sort();
    scripts
}

#[test]
fn every_step_script_parses_and_passes_shellcheck() {
    let scripts = step_scripts();
    assert!(scripts.len() >= 8, "{scripts:?}");
    for script in &scripts {
        let text = std::fs::read_to_string(script).unwrap();
        let name = script.file_name().unwrap().to_string_lossy();
        let parsed = run(Command::new("bash").arg("-n").arg(script));
        assert!(parsed.ok, "bash -n {name}: {}", parsed.stderr);
        if name != "lib.sh" {
            assert!(
                text.starts_with("#!/usr/bin/env bash\n"),
                "{name}: a bash script"
            );
            assert!(
                text.contains("\nset -euo pipefail\n"),
                "{name}: set -euo pipefail"
            );
        }
    }

    let shellcheck = Command::new("shellcheck").arg("--version").output();
    if !shellcheck.is_ok_and(|o| o.status.success()) {
        eprintln!("skipping: shellcheck is not installed (apt-get install shellcheck)");
        return;
    }
    let checked = run(Command::new("shellcheck")
        .arg("--external-sources")
        .args(&scripts)
        .current_dir(workspace().join(".buildkite/steps")));
    assert!(checked.ok, "shellcheck:\n{}", checked.stdout);
}
