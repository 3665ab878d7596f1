//! acl (priority 950): `kong/plugins/acl/handler.lua` and `groups.lua`.

use bytes::Bytes;
use http::Response;
use http_body_util::Full;
use serde_json::Value;

use super::request::{Ctx, error_response};
use super::table::Plugins;
use super::util::{bool_or, opt_str_list};

/// `X-Consumer-Groups`.
const CONSUMER_GROUPS: &str = "x-consumer-groups";
/// `X-Authenticated-Groups`.
const AUTHENTICATED_GROUPS: &str = "x-authenticated-groups";

/// acl's config.
pub(super) struct AclConf {
    /// Whether `groups` is a deny list (`deny` has an element), else an allow list.
    deny: bool,
    /// The groups of the list in use.
    groups: Vec<String>,
    /// Whether to send no groups header upstream.
    hide_groups_header: bool,
    /// Whether authenticated groups win over the consumer's.
    always_use_authenticated_groups: bool,
}

impl AclConf {
    /// Parses the config (Kong's shape, defaults filled).
    pub(super) fn parse(conf: &Value) -> Result<AclConf, String> {
        let deny = opt_str_list(conf, "deny")?.unwrap_or_default();
        let allow = opt_str_list(conf, "allow")?.unwrap_or_default();
        let is_deny = !deny.is_empty();
        Ok(AclConf {
            deny: is_deny,
            groups: if is_deny { deny } else { allow },
            hide_groups_header: bool_or(conf, "hide_groups_header", false),
            always_use_authenticated_groups: bool_or(
                conf,
                "always_use_authenticated_groups",
                false,
            ),
        })
    }

    /// Kong's `get_to_be_blocked`: `None` when blocked, else the groups header value.
    fn check(&self, groups: &[String]) -> Option<String> {
        let in_group = self.groups.iter().any(|g| groups.contains(g));
        let blocked = if self.deny { in_group } else { !in_group };
        if blocked {
            None
        } else {
            Some(groups.join(", "))
        }
    }
}

/// The 403 of a blocked request.
fn forbidden() -> Option<Response<Full<Bytes>>> {
    Some(error_response(403, "You cannot consume this service", &[]))
}

/// The access phase.
pub(super) fn access(
    plugins: &Plugins,
    conf: &AclConf,
    ctx: &mut Ctx,
) -> Option<Response<Full<Bytes>>> {
    let consumer_id = ctx
        .consumer
        .as_ref()
        .map(|c| c.id.clone())
        .or_else(|| ctx.credential.as_ref().map(|c| c.consumer_id.clone()));
    let authenticated = ctx.authenticated_groups.clone();
    let (header, value) = match consumer_id {
        None => {
            let Some(groups) = authenticated else {
                if ctx.credential.is_some() {
                    return forbidden();
                }
                return Some(error_response(401, "Unauthorized", &[]));
            };
            match conf.check(&groups) {
                Some(value) => (AUTHENTICATED_GROUPS, value),
                None => return forbidden(),
            }
        }
        Some(consumer_id) => {
            let use_authenticated =
                ctx.credential.is_none() || conf.always_use_authenticated_groups;
            match authenticated.filter(|_| use_authenticated) {
                Some(groups) => match conf.check(&groups) {
                    Some(value) => (AUTHENTICATED_GROUPS, value),
                    None => return forbidden(),
                },
                None => {
                    let groups = plugins
                        .ws_data(&ctx.ws_id)
                        .acls
                        .get(&consumer_id)
                        .filter(|g| !g.is_empty());
                    let empty = Vec::new();
                    let groups = match groups {
                        Some(groups) => groups,
                        None if conf.deny => &empty,
                        None => {
                            if ctx.credential.is_some() {
                                return forbidden();
                            }
                            return Some(error_response(401, "Unauthorized", &[]));
                        }
                    };
                    match conf.check(groups) {
                        Some(value) => (CONSUMER_GROUPS, value),
                        None => return forbidden(),
                    }
                }
            }
        }
    };
    if !conf.hide_groups_header {
        ctx.set_header(header, &value);
    }
    None
}
