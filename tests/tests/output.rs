//! What a newcomer reads: an error says its cause once, human logs carry no colour codes
//! when they go to a pipe, and the build does not print the nested eBPF build as warnings.

mod common;

use std::process::{Command, Stdio};

use common::*;
use simnode::{workspace_bin, AgentConfig};

/// Runs `agent run` in the foreground with `config`, human logs, and returns its stderr.
fn run_to_exit(config: &AgentConfig, dir: &std::path::Path) -> (Option<i32>, String) {
    let path = dir.join("agent.toml");
    std::fs::write(&path, config.text()).expect("write the config");
    let out = Command::new(workspace_bin("agent"))
        .args(["run", "--log-format", "human", "--config"])
        .arg(&path)
        .stdin(Stdio::null())
        .output()
        .expect("run the agent");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_missing_certificate_is_said_once_with_what_to_do_and_no_colour_codes() {
    let Some(node) = node("output_missing_cert", &["a"]) else {
        return;
    };
    let missing = node.tmp().join("nowhere/a.crt");
    let config = AgentConfig::new(&node).pod_table(node.pod("a"), "closed", {
        let mut t = toml::Table::new();
        t.insert("cert".into(), missing.display().to_string().into());
        t.insert(
            "key".into(),
            node.tmp()
                .join("nowhere/a.key")
                .display()
                .to_string()
                .into(),
        );
        t.insert(
            "bundle".into(),
            node.tmp()
                .join("nowhere/ca.crt")
                .display()
                .to_string()
                .into(),
        );
        t
    });
    let (code, err) = run_to_exit(&config, node.tmp());
    assert_ne!(
        code,
        Some(0),
        "the agent started without its certificate:\n{err}"
    );
    let cause = "No such file or directory";
    let said = err.matches(cause).count();
    assert_eq!(
        said, 1,
        "the cause should be said once, not {said} times:\n{err}"
    );
    let line = err
        .lines()
        .find(|l| l.contains(cause))
        .expect("the line with the cause");
    assert!(line.contains(&missing.display().to_string()), "{line}");
    assert!(
        line.contains("agent ca issue"),
        "no hint of what to do: {line}"
    );
    assert!(
        !err.contains('\u{1b}'),
        "human logs into a pipe carry ANSI escape codes:\n{err:?}"
    );
}

/// The build script's directives, as cargo recorded them for the build that made the
/// agent binary the suite runs: the nested eBPF build must not appear as warnings.
#[test]
fn the_nested_ebpf_build_prints_no_warnings() {
    let agent = workspace_bin("agent");
    let profile_dir = agent.parent().expect("the profile directory");
    let outputs: Vec<_> = std::fs::read_dir(profile_dir.join("build"))
        .expect("the build directory")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("agent-"))
        .map(|e| e.path().join("output"))
        .filter(|p| p.exists())
        .collect();
    // The newest is the build of the binary under test.
    let newest = outputs
        .iter()
        .max_by_key(|p| p.metadata().and_then(|m| m.modified()).ok())
        .expect("agent's build script has run");
    let text = std::fs::read_to_string(newest).expect("read the build script output");
    assert!(
        text.contains("cargo:rerun-if-changed="),
        "the build script's directives were lost ({}):\n{text}",
        newest.display()
    );
    let warnings: Vec<_> = text
        .lines()
        .filter(|l| l.starts_with("cargo:warning="))
        .collect();
    assert!(
        warnings.is_empty(),
        "the eBPF build prints {} warning lines ({}):\n{}",
        warnings.len(),
        newest.display(),
        warnings.join("\n")
    );
}

#[test]
fn the_open_files_soft_limit_is_raised_to_the_hard_limit_and_said() {
    let Some(node) = node("output_nofile", &[]) else {
        return;
    };
    // Started with a low soft limit, as a shell or a runtime may hand it over.
    let mut cmd = Command::new("prlimit");
    cmd.arg("--nofile=256:8192")
        .arg("--")
        .arg(workspace_bin("agent"));
    let mut agent = simnode::Agent::start_cmd(cmd, &AgentConfig::new(&node));
    let said = agent.wait_for(
        "the open files limit line",
        |e| e["message"] == "raised the open files soft limit to the hard limit",
        WAIT,
    );
    assert_eq!(said["from"], 256, "{said}");
    assert_eq!(said["to"], 8192, "{said}");
    let pid = agent.pid().expect("agent pid");
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let fields: Vec<_> = line.split_whitespace().collect();
    assert_eq!(&fields[3..5], ["8192", "8192"], "{line}");
    assert!(agent.stop().success());
}
