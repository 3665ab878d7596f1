//! `deltaplane-cp status`: the control plane's sync version and its data planes, from `/rpc`.

use serde_json::Value;

use super::config::StatusArgs;
use crate::net::operator;

pub async fn print(args: &StatusArgs) -> anyhow::Result<()> {
    let token = args.admin_token.as_deref();
    let version = operator::call(&args.rpc, token, "deltaplane.sync_version", None).await?;
    let planes = operator::call(&args.rpc, token, "deltaplane.data_planes", None).await?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "sync_version": version,
                "data_planes": planes,
            }))?
        );
        return Ok(());
    }
    let head = version["version"].as_i64().unwrap_or(0);
    println!(
        "control plane: version {} ({}), oldest retained {}, epoch {}",
        head,
        version["version_string"].as_str().unwrap_or("?"),
        version["oldest_version"],
        version["epoch"].as_str().unwrap_or("?"),
    );
    println!(
        "state hash: {}",
        version["state_hash"].as_str().unwrap_or("?")
    );
    let planes = planes.as_array().cloned().unwrap_or_default();
    println!("data planes: {}", planes.len());
    for p in &planes {
        let v = p["version"].as_i64().unwrap_or(0);
        let state = p["health"].as_str().unwrap_or("unknown").replace('_', " ");
        println!(
            "  {}  {:<20} {:<4} version {:<8} {:<12} {}{}",
            p["node_id"].as_str().unwrap_or("?"),
            p["hostname"].as_str().unwrap_or("?"),
            p["protocol"].as_str().unwrap_or("?"),
            v,
            state,
            p["address"].as_str().unwrap_or(""),
            match (p["sync_status"].as_str(), p["last_error"].as_str()) {
                (Some(s), Some(e)) if s != "normal" => format!("  {s}: {e}"),
                (_, Some(e)) => format!("  last error: {e}"),
                _ => String::new(),
            }
        );
    }
    Ok(())
}

/// `deltaplane.sync_version` on the control plane.
pub(crate) fn sync_version_json(info: &crate::cp::store::VersionInfo) -> Value {
    serde_json::json!({
        "version": info.version,
        "version_string": crate::proto::version_string(info.version),
        "oldest_version": info.oldest_version,
        "epoch": info.epoch,
        "state_hash": info.state_hash.to_hex(),
    })
}
