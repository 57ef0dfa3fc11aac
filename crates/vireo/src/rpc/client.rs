//! `vireo rpc`: send one JSON-RPC request to `vireo serve` and print the result.

use std::io::{BufReader, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

#[derive(clap::Args, Debug)]
pub struct RpcArgs {
    /// Unix socket of `vireo serve`.
    #[arg(short = 'r', long = "rpc-socket")]
    socket: PathBuf,
    /// Method name (e.g. bdev_get_bdevs).
    method: String,
    /// Params as a JSON object.
    params: Option<String>,
    /// Seconds to wait for the answer (attaching a controller can take a while).
    #[arg(short = 't', long = "timeout", default_value_t = 60.0)]
    timeout: f64,
}

/// `vireo rpc`: send one request, print the result. Ok(false) on an error response.
pub fn cmd_rpc(a: RpcArgs) -> Result<bool> {
    let timeout = std::time::Duration::try_from_secs_f64(a.timeout)
        .ok()
        .filter(|d| !d.is_zero())
        .context("--timeout must be a positive number of seconds")?;
    send(&a.socket, &a.method, a.params.as_deref(), timeout)
}

/// Send one request to `socket`, print the result or the error.
fn send(socket: &Path, method: &str, params: Option<&str>, timeout: Duration) -> Result<bool> {
    let params: Option<Value> = match params {
        Some(p) => Some(
            serde_json::from_str(p)
                .with_context(|| format!("PARAMS_JSON is not valid JSON: {p}"))?,
        ),
        None => None,
    };
    // Bounded too: a server that stopped accepting (frozen) leaves its queue full.
    let mut stream = match vireo_virtio::unix::connect_unix(socket, timeout) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => bail!(
            "the RPC server at {} did not accept the connection within {} (is `vireo serve` stopped or busy? raise --timeout if it is busy)",
            socket.display(),
            vireo_virtio::unix::secs(timeout)
        ),
        Err(e) => {
            return Err(e).with_context(|| {
                format!(
                    "cannot connect to the RPC socket {} (is `vireo serve` running?)",
                    socket.display()
                )
            })
        }
    };
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|_| stream.set_write_timeout(Some(timeout)))
        .context("cannot set the socket timeout")?;
    let mut req = json!({"jsonrpc": "2.0", "method": method, "id": 1});
    if let Some(p) = params {
        req["params"] = p;
    }
    stream
        .write_all(req.to_string().as_bytes())
        .and_then(|_| stream.write_all(b"\n"))
        .with_context(|| format!("cannot send the request to {}", socket.display()))?;
    let resp: Value = serde_json::Deserializer::from_reader(BufReader::new(&stream))
        .into_iter::<Value>()
        .next()
        .context("the server closed the connection without answering")?
        .with_context(|| {
            format!(
                "no answer from {} within {} s (raise --timeout if the server is busy)",
                socket.display(),
                timeout.as_secs_f64()
            )
        })?;
    if let Some(e) = resp.get("error") {
        let code = e.get("code").and_then(Value::as_i64).unwrap_or(0);
        let msg = e.get("message").and_then(Value::as_str).unwrap_or("");
        eprintln!("vireo: {method}: error {code}: {msg}");
        if let Some(d) = e.get("data") {
            match d {
                Value::String(s) => eprintln!("vireo: {s}"),
                d => eprintln!("vireo: {d}"),
            }
        }
        return Ok(false);
    }
    match resp.get("result") {
        Some(r) => {
            crate::outln!("{}", serde_json::to_string_pretty(r)?)?;
            Ok(true)
        }
        None => bail!("the response has neither \"result\" nor \"error\": {resp}"),
    }
}
