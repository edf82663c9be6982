//! `agent-holder`: a test tool that leaves a session at `ch-luod` with no connection open, as a
//! VMM that disconnected would, so the test bed can upgrade a kernel-mode agent in place while
//! it holds a real LUO session (`scripts/e2e-kexec --case agent-upgrade`).
//!
//! ```text
//! agent-holder hold|freeze|check SOCKET SESSION
//! ```
//! `hold` creates the session and preserves a 1 MiB memfd holding a pattern under token 1,
//! closes its connection, prints its line and stays alive until killed: the agent drops a
//! session whose creator exited before handing it over (`docs/faults.md`), so the creator must
//! outlive the upgrade, as a VMM does; `freeze` hands it over (kernel mode: returns only if the kexec fails); `check`, after
//! the kexec, retrieves the session and the memfd, verifies the pattern and finishes the session.
//! Each prints one line saying what it did.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::ExitCode;

use liveupdate::agent::AgentClient;

const USAGE: &str = "usage: agent-holder hold|freeze|check SOCKET SESSION";
const TOKEN: u64 = 1;
const SIZE: usize = 1 << 20;

/// The byte at `offset` of the pattern.
fn pattern(offset: usize) -> u8 {
    u8::try_from(offset % 251).unwrap_or(0)
}

fn hold(client: &mut AgentClient, session: &str) -> Result<String, String> {
    let fd = liveupdate::sys::memfd_create("agent-holder", 0).map_err(|e| e.to_string())?;
    let mut file = File::from(fd);
    let bytes: Vec<u8> = (0..SIZE).map(pattern).collect();
    file.write_all(&bytes).map_err(|e| e.to_string())?;
    client.create_session(session).map_err(|e| e.to_string())?;
    client
        .preserve(session, file.as_fd(), TOKEN)
        .map_err(|e| e.to_string())?;
    Ok(format!(
        "session {session:?} held with {SIZE} bytes under token {TOKEN}"
    ))
}

fn check(client: &mut AgentClient, session: &str) -> Result<String, String> {
    client
        .retrieve_session(session)
        .map_err(|e| e.to_string())?;
    let file = File::from(
        client
            .retrieve_fd(session, TOKEN)
            .map_err(|e| e.to_string())?,
    );
    let mut bytes = vec![0u8; SIZE];
    file.read_exact_at(&mut bytes, 0)
        .map_err(|e| e.to_string())?;
    if let Some(offset) = (0..SIZE).find(|&offset| bytes[offset] != pattern(offset)) {
        return Err(format!(
            "the memfd differs from the pattern at byte {offset}"
        ));
    }
    client.finish(session).map_err(|e| e.to_string())?;
    Ok(format!(
        "session {session:?}: all {SIZE} bytes as preserved; finished"
    ))
}

fn run(args: &[String]) -> Result<String, String> {
    let [command, socket, session] = args else {
        return Err(USAGE.to_string());
    };
    let mut client = AgentClient::connect(Path::new(socket)).map_err(|e| e.to_string())?;
    match command.as_str() {
        "hold" => {
            let line = hold(&mut client, session)?;
            drop(client);
            println!("agent-holder: {line}");
            loop {
                std::thread::sleep(std::time::Duration::from_secs(3600));
            }
        }
        "freeze" => client
            .handover(session)
            .map(|()| format!("session {session:?} handed over"))
            .map_err(|e| e.to_string()),
        "check" => check(&mut client, session),
        _ => Err(USAGE.to_string()),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(line) => {
            println!("agent-holder: {line}");
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("agent-holder: {message}");
            ExitCode::FAILURE
        }
    }
}
