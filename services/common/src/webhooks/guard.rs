//! The guard against server-side request forgery: a webhook URL must not make Sluice call its
//! own network. Addresses that are loopback, private, shared (carrier-grade NAT), link-local
//! (where cloud metadata services live), multicast, broadcast, unspecified or reserved are
//! refused, for IPv4 and IPv6 alike, IPv4-mapped and NAT64 IPv6 forms judged by the IPv4
//! address inside. The check is made on the addresses the HTTP client will connect to (the
//! resolver below hands it only allowed ones), so a name that resolves differently the second
//! time (DNS rebinding) cannot get around it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Why an address may not be called, or `None` if it may.
pub fn forbidden(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(ip) => forbidden_v4(ip),
        IpAddr::V6(ip) => forbidden_v6(ip),
    }
}

fn forbidden_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, ..] = ip.octets();
    if ip.is_loopback() {
        Some("a loopback address")
    } else if ip.is_private() {
        Some("a private address")
    } else if ip.is_link_local() {
        Some("a link-local address (where cloud metadata services answer)")
    } else if a == 100 && (64..128).contains(&b) {
        Some("a shared (carrier-grade NAT) address")
    } else if ip.is_multicast() || ip.is_broadcast() {
        Some("a multicast or broadcast address")
    } else if ip.is_unspecified() || a == 0 {
        Some("an unspecified address")
    } else if a >= 240 || (a == 192 && b == 0 && ip.octets()[2] == 0) {
        Some("a reserved address")
    } else {
        None
    }
}

fn forbidden_v6(ip: Ipv6Addr) -> Option<&'static str> {
    // Judged by the IPv4 address they carry: ::ffff:a.b.c.d, and NAT64's 64:ff9b::a.b.c.d.
    if let Some(v4) = ip.to_ipv4_mapped() {
        return forbidden_v4(v4);
    }
    let segments = ip.segments();
    if segments[0] == 0x64 && segments[1] == 0xff9b && segments[2..6] == [0, 0, 0, 0] {
        let [.., c, d] = segments;
        let v4 = Ipv4Addr::new((c >> 8) as u8, c as u8, (d >> 8) as u8, d as u8);
        return forbidden_v4(v4);
    }
    if ip.is_loopback() {
        Some("a loopback address")
    } else if ip.is_unspecified() {
        Some("an unspecified address")
    } else if segments[0] & 0xfe00 == 0xfc00 {
        Some("a unique local (private) address")
    } else if segments[0] & 0xffc0 == 0xfe80 {
        Some("a link-local address")
    } else if ip.is_multicast() {
        Some("a multicast address")
    } else if segments[..6] == [0, 0, 0, 0, 0, 0] {
        Some("an IPv4-compatible (deprecated) address")
    } else {
        None
    }
}

/// A resolver for the webhook client that hands it only allowed addresses.
#[derive(Debug, Default)]
pub struct GuardedResolver;

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let mut refused = None;
            let allowed: Vec<SocketAddr> = found
                .into_iter()
                .filter(|address| match forbidden(address.ip()) {
                    Some(reason) => {
                        refused.get_or_insert((address.ip(), reason));
                        false
                    }
                    None => true,
                })
                .collect();
            if allowed.is_empty() {
                let message = match refused {
                    Some((ip, reason)) => format!(
                        "refused by the private-network guard: {host} resolves to {ip}, {reason}"
                    ),
                    None => format!("{host} has no address"),
                };
                return Err(message.into());
            }
            Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_addresses_are_refused_in_every_spelling() {
        for refused in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "240.0.0.1",
            "::1",
            "::",
            "fd00:ec2::254",
            "fe80::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a9fe:a9fe",
            "::127.0.0.1",
        ] {
            let ip: IpAddr = refused.parse().unwrap();
            assert!(forbidden(ip).is_some(), "{refused} must be refused");
        }
        for allowed in [
            "93.184.215.14",
            "8.8.8.8",
            "2606:4700:4700::1111",
            "::ffff:8.8.8.8",
        ] {
            let ip: IpAddr = allowed.parse().unwrap();
            assert_eq!(forbidden(ip), None, "{allowed} must be allowed");
        }
    }
}
