//! ip-restriction (priority 990): `kong/plugins/ip-restriction/handler.lua`.

use std::net::IpAddr;

use bytes::Bytes;
use http::Response;
use http_body_util::Full;
use serde_json::Value;

use super::request::{Ctx, error_response};
use super::util::{opt_num, opt_str, opt_str_list};

/// One allow or deny entry: an address and a prefix length (the full length for a plain IP).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Cidr {
    /// The network address.
    addr: IpAddr,
    /// The prefix length.
    prefix: u8,
}

impl Cidr {
    /// Parses `1.2.3.4`, `1.2.3.0/24`, `::1`, `2001:db8::/32`.
    fn parse(entry: &str) -> Result<Cidr, String> {
        let (ip, prefix) = match entry.split_once('/') {
            Some((ip, prefix)) => (ip, Some(prefix)),
            None => (entry, None),
        };
        let addr: IpAddr = ip
            .trim()
            .parse()
            .map_err(|_| format!("invalid ip or cidr range: '{entry}'"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => match p.trim().parse::<u8>() {
                Ok(p) if p <= max => p,
                _ => return Err(format!("invalid ip or cidr range: '{entry}'")),
            },
        };
        Ok(Cidr { addr, prefix })
    }

    /// Whether `ip` is inside the range (an IPv4 client never matches an IPv6 range, as in
    /// `resty.ipmatcher`).
    fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = if self.prefix == 0 {
                    0
                } else {
                    u32::MAX << (32 - u32::from(self.prefix))
                };
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = if self.prefix == 0 {
                    0
                } else {
                    u128::MAX << (128 - u32::from(self.prefix))
                };
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// ip-restriction's config.
pub(super) struct IpConf {
    /// Allowed ranges (empty: no allow list).
    allow: Vec<Cidr>,
    /// Denied ranges.
    deny: Vec<Cidr>,
    /// The status of a refusal (default 403).
    status: Option<u16>,
    /// The message of a refusal (default "IP address not allowed: <ip>").
    message: Option<String>,
}

impl IpConf {
    /// Parses the config (Kong's shape, defaults filled); a malformed range is an error.
    pub(super) fn parse(conf: &Value) -> Result<IpConf, String> {
        let list = |field: &str| -> Result<Vec<Cidr>, String> {
            opt_str_list(conf, field)?
                .unwrap_or_default()
                .iter()
                .map(|e| Cidr::parse(e).map_err(|m| format!("config.{field}: {m}")))
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
        let c = Cidr::parse("127.0.0.0/24").unwrap();
        assert!(c.contains("127.0.0.9".parse().unwrap()));
        assert!(!c.contains("127.0.1.1".parse().unwrap()));
        assert!(!c.contains("::1".parse().unwrap()));
        let c = Cidr::parse("fe80::/64").unwrap();
        assert!(c.contains("fe80::1".parse().unwrap()));
        assert!(!c.contains("fe81::1".parse().unwrap()));
        let c = Cidr::parse("0.0.0.0/0").unwrap();
        assert!(c.contains("8.8.8.8".parse().unwrap()));
        assert!(
            Cidr::parse("10.0.0.1")
                .unwrap()
                .contains("10.0.0.1".parse().unwrap())
        );
        assert!(
            !Cidr::parse("10.0.0.1")
                .unwrap()
                .contains("10.0.0.2".parse().unwrap())
        );
        assert!(Cidr::parse("10.0.0.0/33").is_err());
        assert!(Cidr::parse("nope").is_err());
    }
}
