//! Kong's compatibility rules between a control plane and a data plane of another version:
//! which Kong versions may follow this control plane, which plugin sets and versions may run
//! its configuration, and which fields an older data plane must not see.
//!
//! Kong's source: `kong/clustering/compat/init.lua` (`check_kong_version_compatibility`,
//! `check_configuration_compatibility`) and `kong/clustering/compat/removed_fields.lua`.

use std::collections::{BTreeSet, HashMap};

use serde_json::Value;

use crate::proto::SyncStatus;
use crate::schema::Registry;

/// Kong's rule: a data plane of another major version, or of a newer minor, cannot follow this
/// control plane; an older minor can (fields it does not know are removed).
pub fn kong_version_compatible(cp: &str, dp: &str) -> Result<(), String> {
    let (Some((cmaj, cmin)), Some((dmaj, dmin))) = (major_minor(cp), major_minor(dp)) else {
        return Err(format!(
            "cannot compare data plane version '{dp}' with '{cp}'"
        ));
    };
    if cmaj != dmaj {
        return Err(format!(
            "data plane version {dp} has a different major version than the control plane ({cp})"
        ));
    }
    if dmin > cmin {
        return Err(format!(
            "data plane version {dp} is newer than the control plane ({cp})"
        ));
    }
    Ok(())
}

/// Kong's rule for a configured plugin's versions: another major, or a DP minor above the
/// CP's, is incompatible.
fn plugin_version_incompatible(cp: &str, dp: &str) -> bool {
    match (major_minor(cp), major_minor(dp)) {
        (Some((cmaj, cmin)), Some((dmaj, dmin))) => cmaj != dmaj || dmin > cmin,
        _ => false,
    }
}

fn major_minor(v: &str) -> Option<(u64, u64)> {
    let mut it = v.split('.');
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

/// Kong's plugin check for a data plane that announced its plugins (`dp_plugins`, name →
/// version): the configuration may use only plugins it has, at a major version it runs and a
/// minor not above the control plane's (`cp_version`). On failure: the `sync_status` to
/// record and the message (which starts with that status, see `proto::is_withheld`).
pub fn check_plugins(
    used: &BTreeSet<String>,
    dp_plugins: &HashMap<String, Option<String>>,
    cp_version: &str,
) -> Result<(), (SyncStatus, String)> {
    let missing: Vec<&str> = used
        .iter()
        .filter(|p| !dp_plugins.contains_key(*p))
        .map(String::as_str)
        .collect();
    if !missing.is_empty() {
        let status = SyncStatus::PluginSetIncompatible;
        return Err((
            status,
            format!(
                "{status}: the configuration uses plugins this data plane does not have: {}",
                missing.join(", ")
            ),
        ));
    }
    let newer: Vec<String> = used
        .iter()
        .filter_map(|p| {
            let v = dp_plugins.get(p)?.as_deref()?;
            plugin_version_incompatible(cp_version, v).then(|| format!("{p} {v}"))
        })
        .collect();
    if newer.is_empty() {
        return Ok(());
    }
    let status = SyncStatus::PluginVersionIncompatible;
    Err((
        status,
        format!(
            "{status}: the data plane runs plugins of another major or a newer minor version than the control plane ({cp_version}): {}",
            newer.join(", ")
        ),
    ))
}

/// Removes from the deltas at `path` of an answer (JSON text) the fields a data plane of Kong
/// `dp_version` does not know (Kong does this only on v1, and pushes older DPs to v1). Returns
/// the new text and the `type.field` names removed.
pub fn strip_answer(
    registry: &Registry,
    text: &str,
    path: &[&str],
    dp_version: &str,
) -> Result<(String, BTreeSet<String>), serde_json::Error> {
    let mut answer: Value = serde_json::from_str(text)?;
    let mut deltas = &mut answer;
    for key in path {
        deltas = &mut deltas[*key];
    }
    let mut removed = BTreeSet::new();
    if let Some(items) = deltas.as_array_mut() {
        for d in items {
            let ty = d["type"].as_str().unwrap_or_default().to_owned();
            if let Some(entity) = d.get_mut("entity").filter(|e| e.is_object()) {
                for f in registry.strip_newer_fields(&ty, entity, dp_version) {
                    removed.insert(format!("{ty}.{f}"));
                }
            }
        }
    }
    Ok((serde_json::to_string(&answer)?, removed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kong_versions_follow_major_and_minor() {
        assert!(kong_version_compatible("3.10.0", "3.10.2").is_ok());
        assert!(kong_version_compatible("3.10.0", "3.9.1").is_ok());
        assert!(kong_version_compatible("3.10.0", "3.11.0").is_err());
        assert!(kong_version_compatible("3.10.0", "2.8.0").is_err());
        assert!(kong_version_compatible("3.10.0", "x").is_err());
    }

    #[test]
    fn plugin_checks_name_the_status_first() {
        let used: BTreeSet<String> = ["cors".to_owned(), "key-auth".to_owned()].into();
        let dp = |items: &[(&str, Option<&str>)]| -> HashMap<String, Option<String>> {
            items
                .iter()
                .map(|(n, v)| (n.to_string(), v.map(str::to_owned)))
                .collect()
        };
        assert!(check_plugins(&used, &dp(&[("cors", None), ("key-auth", None)]), "3.10.0").is_ok());
        let (status, msg) = check_plugins(&used, &dp(&[("cors", None)]), "3.10.0").unwrap_err();
        assert_eq!(status, SyncStatus::PluginSetIncompatible);
        assert!(msg.starts_with("plugin_set_incompatible:") && msg.ends_with("key-auth"));
        assert!(crate::proto::is_withheld(&msg));
        let (status, msg) = check_plugins(
            &used,
            &dp(&[("cors", Some("3.11.0")), ("key-auth", Some("3.10.0"))]),
            "3.10.0",
        )
        .unwrap_err();
        assert_eq!(status, SyncStatus::PluginVersionIncompatible);
        assert!(msg.ends_with("cors 3.11.0"));
        assert!(crate::proto::is_withheld(&msg));
    }
}
