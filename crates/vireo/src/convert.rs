//! `vireo config convert FILE`: print the SPDK JSON equivalent of a config file (INI
//! or JSON).

use std::path::PathBuf;

use anyhow::{bail, Result};

#[derive(clap::Args, Debug)]
pub struct ConfigArgs {
    /// `convert`.
    #[arg(value_parser = ["convert"])]
    action: String,
    /// The config file.
    file: PathBuf,
}

/// `vireo config convert FILE`.
pub fn cmd_config(a: ConfigArgs) -> Result<bool> {
    if a.action != "convert" {
        bail!("unknown config action {:?} (convert)", a.action);
    }
    let calls = crate::ini::load(&a.file)?;
    vireo::outln!(
        "{}",
        serde_json::to_string_pretty(&crate::ini::to_json(&calls))?
    )?;
    Ok(true)
}
