//! Running commands with their output shown, failing with the command line in the error.

use std::process::Command;

use anyhow::{bail, Context, Result};

pub fn run(cmd: &str, args: &[&str]) -> Result<()> {
    run_env(cmd, args, &[])
}

pub fn run_env(cmd: &str, args: &[&str], env: &[(&str, &str)]) -> Result<()> {
    let status = Command::new(cmd)
        .args(args)
        .envs(env.iter().copied())
        .status()
        .with_context(|| format!("cannot run `{cmd}`: is it installed?"))?;
    if !status.success() {
        bail!("`{cmd} {}` failed ({status})", args.join(" "));
    }
    Ok(())
}

pub fn output(cmd: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .with_context(|| format!("cannot run `{cmd}`"))?;
    if !out.status.success() {
        bail!(
            "`{cmd} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
