//! `custodyctl completions SHELL` and `custodyctl man`: shell completions
//! and man pages generated from custodyctl's own command line (clap_complete,
//! clap_mangen), so that they never disagree with it. A package runs them at
//! build time (see docs/runbook.md).

use std::path::{Path, PathBuf};

use clap::Args as ClapArgs;

#[derive(ClapArgs)]
pub(crate) struct CompletionsArgs {
    /// The shell: bash, zsh, fish, elvish or powershell.
    #[arg(value_enum)]
    shell: clap_complete::Shell,
}

#[derive(ClapArgs)]
pub(crate) struct ManArgs {
    /// Write custodyctl.1 and a page per command (custodyctl-keys-list.1, …)
    /// into this directory instead of printing custodyctl.1.
    #[arg(long)]
    out_dir: Option<PathBuf>,
}

/// The completion script for `args.shell`, on standard output.
pub(crate) fn completions(args: &CompletionsArgs) -> Result<(), String> {
    let text = completion_script(args.shell);
    out!("{}", String::from_utf8_lossy(&text));
    Ok(())
}

pub(crate) fn completion_script(shell: clap_complete::Shell) -> Vec<u8> {
    let mut buffer = Vec::new();
    clap_complete::generate(shell, &mut crate::command(), "custodyctl", &mut buffer);
    buffer
}

/// The man page of `command` (roff).
pub(crate) fn page(command: clap::Command) -> Result<Vec<u8>, String> {
    let mut buffer = Vec::new();
    clap_mangen::Man::new(command)
        .render(&mut buffer)
        .map_err(|e| format!("rendering the man page: {e}"))?;
    Ok(buffer)
}

/// custodyctl.1 on standard output, or every page into `--out-dir`.
pub(crate) fn man(args: &ManArgs) -> Result<(), String> {
    let Some(dir) = &args.out_dir else {
        out!("{}", String::from_utf8_lossy(&page(crate::command())?));
        return Ok(());
    };
    let written = pages_to(dir)?;
    outln!("wrote {written} man pages to {}", dir.display());
    Ok(())
}

/// Writes custodyctl.1 and a page per command into `dir`; how many.
pub(crate) fn pages_to(dir: &Path) -> Result<usize, String> {
    let fail = |e: std::io::Error| format!("{}: {e}", dir.display());
    std::fs::create_dir_all(dir).map_err(fail)?;
    clap_mangen::generate_to(crate::command(), dir).map_err(fail)?;
    Ok(std::fs::read_dir(dir).map_err(fail)?.count())
}
