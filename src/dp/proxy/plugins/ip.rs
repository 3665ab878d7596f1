//! ip-restriction (priority 990): `kong/plugins/ip-restriction/handler.lua`.

use std::net::IpAddr;

use bytes::Bytes;
use http::Response;
use http_body_util::Full;
use serde_json::Value;

use super::request::{Ctx, error_response};
use super::util::{opt_num, opt_str, opt_str_list};
use crate::dp::proxy::ipnet::IpNet;

/// Parses one allow or deny entry (`1.2.3.4`, `1.2.3.0/24`, `::1`, `2001:db8::/32`) with
/// Kong's message for a bad one.
fn cidr(entry: &str) -> Result<IpNet, String> {
    entry
        .parse()
        .map_err(|_| format!("invalid ip or cidr range: '{entry}'"))
}

/// ip-restriction's config.
pub(super) struct IpConf {
    /// Allowed ranges (empty: no allow list).
    allow: Vec<IpNet>,
    /// Denied ranges.
    deny: Vec<IpNet>,
    /// The status of a refusal (default 403).
    status: Option<u16>,
    /// The message of a refusal (default "IP address not allowed: <ip>").
    message: Option<String>,
}

impl IpConf {
    /// Parses the config (Kong's shape, defaults filled); a malformed range is an error.
    pub(super) fn parse(conf: &Value) -> Result<IpConf, String> {
        let list = |field: &str| -> Result<Vec<IpNet>, String> {
            opt_str_list(conf, field)?
                .unwrap_or_default()
                .iter()
                .map(|e| cidr(e).map_err(|m| format!("config.{field}: {m}")))
                .collect()
        };
        let status = match opt_num(conf, "status") {
            None => None,
            Some(s) if (100.0..=599.0).contains(&s) && s.fract() == 0.0 => Some(s as u16),
            Some(s) => return Err(format!("config.status: invalid status {s}")),
        };
        Ok(IpConf {
            allow: list("allow")?,
            deny: list("deny")?,
            status,
            message: opt_str(conf, "message"),
        })
    }
}

/// Kong's `do_exit`.
fn refuse(conf: &IpConf, ip: IpAddr) -> Option<Response<Full<Bytes>>> {
    let message = conf
        .message
        .clone()
        .unwrap_or_else(|| format!("IP address not allowed: {ip}"));
    tracing::warn!("{message}");
    Some(error_response(conf.status.unwrap_or(403), &message, &[]))
}

/// The access phase: deny first, then allow.
pub(super) fn access(conf: &IpConf, ctx: &mut Ctx) -> Option<Response<Full<Bytes>>> {
    // An IPv4 client seen on a dual-stack socket (`::ffff:a.b.c.d`) is the IPv4 address.
    let ip = ctx.client_ip.to_canonical();
    if conf.deny.iter().any(|c| c.contains(ip)) {
        return refuse(conf, ip);
    }
    if !conf.allow.is_empty() && !conf.allow.iter().any(|c| c.contains(ip)) {
        return refuse(conf, ip);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// CIDR parsing and matching, v4 and v6 (cases from spec/03-plugins/17-ip-restriction).
    #[test]
    fn cidrs() {
        let c = cidr("127.0.0.0/24").unwrap();
        assert!(c.contains("127.0.0.9".parse().unwrap()));
        assert!(!c.contains("127.0.1.1".parse().unwrap()));
        assert!(!c.contains("::1".parse().unwrap()));
        let c = cidr("fe80::/64").unwrap();
        assert!(c.contains("fe80::1".parse().unwrap()));
        assert!(!c.contains("fe81::1".parse().unwrap()));
        let c = cidr("0.0.0.0/0").unwrap();
        assert!(c.contains("8.8.8.8".parse().unwrap()));
        assert!(
            cidr("10.0.0.1")
                .unwrap()
                .contains("10.0.0.1".parse().unwrap())
        );
        assert!(
            !cidr("10.0.0.1")
                .unwrap()
                .contains("10.0.0.2".parse().unwrap())
        );
        assert!(cidr("10.0.0.0/33").is_err());
        assert!(cidr("nope").is_err());
    }
}
