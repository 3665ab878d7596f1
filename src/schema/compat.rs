//! Compatibility with older data planes: the fields a data plane of an older Kong version does
//! not know, from the `since` each field records in `schema/`.

use serde_json::{Map, Value};

use super::{Field, Registry, version_cmp};

impl Registry {
    /// Removes from `entity` (of `entity_type`) every field that appeared after `dp_version`,
    /// records and plugin configurations included. Returns the removed paths (`config.foo`).
    pub fn strip_newer_fields(
        &self,
        entity_type: &str,
        entity: &mut Value,
        dp_version: &str,
    ) -> Vec<String> {
        let mut removed = Vec::new();
        let Some(schema) = self.get(entity_type) else {
            return removed;
        };
        let Value::Object(map) = entity else {
            return removed;
        };
        strip(&schema.fields, map, dp_version, "", &mut removed);
        if entity_type == "plugins" {
            let plugin = map
                .get("name")
                .and_then(Value::as_str)
                .and_then(|n| self.plugin(n));
            if let (Some(plugin), Some(Value::Object(config))) = (plugin, map.get_mut("config")) {
                strip(
                    plugin.config_fields(),
                    config,
                    dp_version,
                    "config.",
                    &mut removed,
                );
            }
        }
        removed
    }
}

fn newer(field: &Field, dp_version: &str) -> bool {
    field
        .since
        .as_deref()
        .is_some_and(|since| version_cmp(since, dp_version) == std::cmp::Ordering::Greater)
}

fn strip(
    fields: &[Field],
    map: &mut Map<String, Value>,
    dp_version: &str,
    prefix: &str,
    removed: &mut Vec<String>,
) {
    for field in fields {
        if newer(field, dp_version) {
            if map.remove(&field.name).is_some() {
                removed.push(format!("{prefix}{}", field.name));
            }
            continue;
        }
        if let (Some(sub), Some(Value::Object(inner))) = (&field.fields, map.get_mut(&field.name)) {
            let prefix = format!("{prefix}{}.", field.name);
            strip(sub, inner, dp_version, &prefix, removed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_newer_than_the_data_plane_are_removed() {
        let r = Registry::builtin();
        // plugins.instance_name appeared in 3.2 (see schema/plugins.json).
        let mut plugin = serde_json::json!({
            "id": "p", "name": "key-auth", "instance_name": "x", "enabled": true,
            "config": {"key_names": ["apikey"]}
        });
        let removed = r.strip_newer_fields("plugins", &mut plugin, "3.1.0");
        assert!(removed.contains(&"instance_name".to_owned()), "{removed:?}");
        assert!(plugin.get("instance_name").is_none());
        assert_eq!(plugin["enabled"], true);
        // Nothing is removed for a data plane of the same line.
        let mut same = serde_json::json!({"id": "p", "name": "key-auth", "instance_name": "x"});
        assert!(
            r.strip_newer_fields("plugins", &mut same, "3.10.0")
                .is_empty()
        );
        assert_eq!(same["instance_name"], "x");
    }
}
