//! What `--help` tells someone holding only the binary: populate-mirror and job-dispatcher end
//! their help with the exit codes, the same codes their docs' "Exit codes" tables give.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use stateless_e2e::sandbox::bin;

/// The codes in the first column of the doc's "## Exit codes" table (`130, 143` is two).
fn documented(doc: &str) -> BTreeSet<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../docs")
        .join(doc);
    let text = std::fs::read_to_string(path).unwrap();
    let section = text
        .split("## Exit codes")
        .nth(1)
        .expect("an Exit codes section");
    let rows = section
        .lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'));
    let first = rows.filter_map(|row| row.split('|').nth(1).map(str::trim).map(String::from));
    first
        .flat_map(|cell| {
            cell.split(',')
                .map(|c| c.trim().to_string())
                .collect::<Vec<_>>()
        })
        .filter(|c| c.parse::<u8>().is_ok())
        .collect()
}

/// The codes `binary --help` lists after its "Exit codes:" line.
fn helped(binary: &str) -> BTreeSet<String> {
    let out = Command::new(bin(binary)).arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let section = text
        .split("Exit codes:")
        .nth(1)
        .unwrap_or_else(|| panic!("{binary} --help lists no exit codes"));
    let codes = section
        .lines()
        .map(|l| l.trim_start())
        .filter(|l| l.starts_with(|c: char| c.is_ascii_digit()));
    codes
        .flat_map(|line| {
            let column = line.split("  ").next().unwrap();
            column
                .split(',')
                .map(|c| c.trim().to_string())
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn populate_mirror_help_lists_the_documented_exit_codes() {
    assert_eq!(helped("populate-mirror"), documented("populate-mirror.md"));
}

#[test]
fn job_dispatcher_help_lists_the_documented_exit_codes() {
    assert_eq!(helped("job-dispatcher"), documented("job-dispatcher.md"));
}
