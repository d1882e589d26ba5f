//! `meshbpf-cni`: the chained CNI plugin over the meshbpf library (the plugin is this crate's library).
//! Stdout carries only the result or the error JSON; log lines go to stderr.

use std::io::{Read, Write};
use std::process::ExitCode;

use meshbpf_cni as cni;

fn main() -> ExitCode {
    let env: cni::Environment = std::env::vars()
        .filter(|(k, _)| k.starts_with("CNI_"))
        .collect();
    let mut stdin = Vec::new();
    let outcome = match std::io::stdin().read_to_end(&mut stdin) {
        Ok(_) => cni::run(&env, &stdin, &mut std::io::stderr()),
        Err(err) => cni::Outcome {
            stdout: serde_json::json!({
                "cniVersion": "1.1.0",
                "code": cni::code::IO_FAILURE,
                "msg": "reading the network configuration from stdin",
                "details": err.to_string(),
            })
            .to_string()
            .into_bytes(),
            ok: false,
        },
    };
    let mut stdout = std::io::stdout().lock();
    if stdout
        .write_all(&outcome.stdout)
        .and_then(|()| stdout.flush())
        .is_err()
        || !outcome.ok
    {
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
