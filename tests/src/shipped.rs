//! The Envoy configurations and deploy examples a user copies (`envoy/*.yaml`, `deploy/`), as
//! the tests take them: the commands their headers tell the user to run, run as written; and a
//! shipped file turned into one that runs on a test's free ports and files, by replacing its
//! site-specific values (addresses, paths, keys) and nothing else.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

use crate::envoy::{envoy_binary, filter_wasm};
use crate::process::workspace_root;

/// Runs a command in [`WITH_ETC_ENVOY`]'s namespace; it prepares `/etc/envoy` as a deployment
/// has it (the checkout's `envoy/` plus the built filter).
pub const WITH_ETC_ENVOY: &str = "scripts/with-etc-envoy.sh";

/// A shipped file's text (`path` relative to the workspace root).
pub fn read(path: &str) -> anyhow::Result<String> {
    let full = workspace_root().join(path);
    std::fs::read_to_string(&full).with_context(|| format!("cannot read {}", full.display()))
}

/// The commands a shipped file's header tells the user to run: its leading `#` lines that
/// are indented by three spaces after the `#`, each split into words.
pub fn header_commands(path: &str) -> anyhow::Result<Vec<Vec<String>>> {
    let text = read(path)?;
    Ok(text
        .lines()
        .take_while(|line| line.starts_with('#'))
        .filter_map(|line| line.strip_prefix("#   "))
        .map(|command| command.split_whitespace().map(str::to_owned).collect())
        .collect())
}

/// The header command of `path` that starts with `first_words` (e.g. `["envoy", "--mode",
/// "validate"]`); an error if there is none, or more than one.
pub fn header_command(path: &str, first_words: &[&str]) -> anyhow::Result<Vec<String>> {
    let mut found = header_commands(path)?.into_iter().filter(|words| {
        words.len() >= first_words.len() && words[..first_words.len()] == *first_words
    });
    let Some(command) = found.next() else {
        bail!(
            "the header of {path} has no `{}` command",
            first_words.join(" ")
        );
    };
    if found.next().is_some() {
        bail!(
            "the header of {path} has several `{}` commands",
            first_words.join(" ")
        );
    }
    Ok(command)
}

/// What a command printed (stdout then stderr) and whether it succeeded.
#[derive(Debug)]
pub struct Ran {
    pub ok: bool,
    pub output: String,
}

/// Runs `command` (words, as a header writes it) from the workspace root, the program
/// resolved there when it is a path (`scripts/...`). The filter and Envoy are the ones the
/// tests use, passed on to [`WITH_ETC_ENVOY`] through its environment.
pub fn run_from_root(command: &[String]) -> anyhow::Result<Ran> {
    let Some((program, args)) = command.split_first() else {
        bail!("empty command");
    };
    let root = workspace_root();
    let program: PathBuf = if program.contains('/') {
        root.join(program)
    } else {
        PathBuf::from(program)
    };
    let output = Command::new(&program)
        .args(args)
        .current_dir(&root)
        .env("SECKILL_FILTER_WASM", filter_wasm()?)
        .env("SECKILL_ENVOY_BIN", envoy_binary()?)
        // As on the host that runs the gate: the filter reads its credential from here.
        .env("SECKILL_EDGE_SECRET", crate::stack::EDGE_SECRET)
        .output()
        .with_context(|| format!("cannot run {}", program.display()))?;
    Ok(Ran {
        ok: output.status.success(),
        output: format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    })
}

/// `envoy --mode validate -c CONFIG` for any config file, with `/etc/envoy` staged as for the
/// shipped ones.
pub fn validate_staged(config: &Path) -> anyhow::Result<Ran> {
    let command = [WITH_ETC_ENVOY, "envoy", "--mode", "validate", "-c"]
        .into_iter()
        .map(str::to_owned)
        .chain([config.display().to_string()])
        .collect::<Vec<_>>();
    run_from_root(&command)
}

/// Replaces each `(shipped, replacement)` in `text`. Every shipped value must occur exactly
/// once: a value that moved or doubled in the shipped file fails the test loudly instead of
/// leaving a test running against something else.
pub fn replace_each(text: &str, replacements: &[(&str, String)]) -> anyhow::Result<String> {
    let mut out = text.to_owned();
    for (shipped, replacement) in replacements {
        let count = out.matches(shipped).count();
        if count != 1 {
            bail!("expected {shipped:?} once in the shipped file, found it {count} times");
        }
        out = out.replace(shipped, replacement);
    }
    Ok(out)
}

/// The replacements that put a shipped Envoy configuration's addresses (those of
/// `envoy/production.yaml`) on this machine: admin and public listeners on free ports of
/// 127.0.0.1 (read back by [`crate::envoy::Envoy::start_config`]), the shop and the syncer at
/// these ports.
pub fn local_addresses(shop_port: u16, syncer_port: u16) -> Vec<(&'static str, String)> {
    let local = |port: u16| format!("address: 127.0.0.1, port_value: {port}");
    vec![
        ("address: 127.0.0.1, port_value: 9901", local(0)),
        ("address: 0.0.0.0, port_value: 8080", local(0)),
        (
            "address: shop-api.internal, port_value: 8080",
            local(shop_port),
        ),
        (
            "address: seckill-syncer.internal, port_value: 8081",
            local(syncer_port),
        ),
    ]
}

/// The replacement that loads the built filter where a shipped file names the deployed one
/// (`/etc/envoy/seckill_filter.wasm`; headers may name it too, so the key is included).
pub fn built_filter() -> anyhow::Result<(&'static str, String)> {
    let wasm = filter_wasm()?;
    Ok((
        "filename: /etc/envoy/seckill_filter.wasm",
        format!("filename: {}", wasm.display()),
    ))
}
