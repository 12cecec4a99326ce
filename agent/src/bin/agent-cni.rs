//! `agent-cni`: the CNI chained plugin that hands each new pod to the node's agent.
//! The logic is in `agent::cni`; this is the process around it (environment, stdin,
//! one admin-API call, stdout and the exit code as the CNI spec wants them).

use std::{io::Read, process::ExitCode, time::Duration};

use agent::{
    admin::client,
    cni::{self, code, CniCommand, CniError, Step},
};

/// A runtime waits for the plugin; the agent answers an ADD in milliseconds, so anything
/// near this is an agent in trouble.
const CALL_TIMEOUT: Duration = Duration::from_secs(20);

fn main() -> ExitCode {
    let env = cni::Env::from_process();
    let mut stdin = String::new();
    if env.command != "VERSION" {
        let _ = std::io::stdin().read_to_string(&mut stdin);
    }
    let (conf, step) = match cni::plan(&env, &stdin) {
        Ok(x) => x,
        Err(e) => return fail(&e, "1.0.0"),
    };
    let version = conf.cni_version.clone();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            return fail(
                &CniError::new(code::TRY_AGAIN_LATER, "no runtime", e.to_string()),
                &version,
            )
        }
    };
    match step {
        Step::Print(v) => {
            println!("{v}");
            ExitCode::SUCCESS
        }
        Step::Status { socket } => {
            match rt.block_on(call(&socket, "GET", "/readyz", String::new())) {
                Ok((200, _)) => ExitCode::SUCCESS,
                Ok((_, v)) => fail(
                    &CniError::new(
                        code::NOT_AVAILABLE,
                        "the node's agent is not ready",
                        v.to_string(),
                    ),
                    &version,
                ),
                Err(e) => fail(
                    &CniError::new(code::NOT_AVAILABLE, "the node's agent does not answer", e),
                    &version,
                ),
            }
        }
        Step::Ask { socket, request } => {
            let body = serde_json::to_string(&request).unwrap_or_default();
            let pod = request.pod.to_string();
            let answer = rt.block_on(call(&socket, "POST", "/cni", body));
            match (request.command, answer) {
                (CniCommand::Add, Ok((200, _))) => {
                    println!("{}", cni::add_result(&conf));
                    ExitCode::SUCCESS
                }
                (CniCommand::Add, refused) => {
                    let (c, msg, details) = match refused {
                        Ok((_, v)) => (
                            code::REFUSED,
                            format!("the node's agent refused pod {pod}"),
                            v["error"].as_str().unwrap_or("no reason given").to_string(),
                        ),
                        Err(e) => (
                            code::TRY_AGAIN_LATER,
                            format!("the node's agent does not answer on {}: pod {pod} would start unprotected", socket.display()),
                            e,
                        ),
                    };
                    if conf.fail_open {
                        eprintln!("agent-cni: FAIL-OPEN: {msg} ({details}); network {:?} says failOpen, so the pod starts WITHOUT interception, mutual TLS or policy", conf.name);
                        println!("{}", cni::add_result(&conf));
                        return ExitCode::SUCCESS;
                    }
                    fail(&CniError::new(c, msg, details), &version)
                }
                (CniCommand::Del, Ok((200, _))) => ExitCode::SUCCESS,
                (CniCommand::Del, other) => {
                    // DEL must succeed (runtimes retry it forever otherwise); the agent
                    // releases pods whose namespace is gone by itself.
                    eprintln!("agent-cni: DEL of pod {pod}: the agent did not release it ({}); it will reap the pod once its namespace is gone", describe(&other));
                    ExitCode::SUCCESS
                }
                (CniCommand::Check, Ok((200, _))) => ExitCode::SUCCESS,
                (CniCommand::Check, other) => fail(
                    &CniError::new(
                        code::NOT_ENROLLED,
                        format!("pod {pod} is not enrolled and attached"),
                        describe(&other),
                    ),
                    &version,
                ),
            }
        }
    }
}

/// One admin-API call with a deadline: (status, JSON body), or why there was no answer.
async fn call(
    socket: &std::path::Path,
    method: &str,
    path: &str,
    body: String,
) -> Result<(u16, serde_json::Value), String> {
    match tokio::time::timeout(CALL_TIMEOUT, client::call(socket, method, path, &body)).await {
        Err(_) => Err(format!("no answer within {} s", CALL_TIMEOUT.as_secs())),
        Ok(Err(f)) => Err(f.message),
        Ok(Ok((status, v, _))) => Ok((status, v)),
    }
}

fn describe(answer: &Result<(u16, serde_json::Value), String>) -> String {
    match answer {
        Ok((status, v)) => format!(
            "status {status}: {}",
            v["error"].as_str().unwrap_or("no reason given")
        ),
        Err(e) => e.clone(),
    }
}

fn fail(e: &CniError, version: &str) -> ExitCode {
    println!("{}", e.to_json(version));
    eprintln!("agent-cni: {} ({})", e.msg, e.details);
    ExitCode::FAILURE
}
