//! Free TCP ports on 127.0.0.1 for servers started later (`pgkeel up`, test clusters).

/// `n` distinct ports, each held open until all are chosen so none is handed out twice.
///
/// They come from below the kernel's ephemeral range (`ip_local_port_range`, usually from
/// 32768) when there is room: outgoing connections take their source ports from that range,
/// so one of them (a replication connection, a client, another test) could grab a port picked
/// there before postgres binds it, and the server would never start.
pub fn free_ports(n: usize) -> std::io::Result<Vec<u16>> {
    use std::hash::BuildHasher;
    let ephemeral_start: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768);
    let (lo, hi) = (10_000u16, ephemeral_start);
    let random = std::collections::hash_map::RandomState::new();
    let mut listeners: Vec<std::net::TcpListener> = Vec::with_capacity(n);
    let mut attempt = 0u64;
    while listeners.len() < n && hi > lo + 1000 && attempt < 500 {
        attempt += 1;
        let port = lo + (random.hash_one(attempt) % u64::from(hi - lo)) as u16;
        if let Ok(l) = std::net::TcpListener::bind(("127.0.0.1", port)) {
            listeners.push(l);
        }
    }
    while listeners.len() < n {
        listeners.push(std::net::TcpListener::bind("127.0.0.1:0")?);
    }
    listeners.iter().map(|l| Ok(l.local_addr()?.port())).collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn distinct_ports_below_the_ephemeral_range() {
        let ports = super::free_ports(20).unwrap();
        let mut sorted = ports.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 20, "{ports:?}");
        assert!(ports.iter().all(|p| *p >= 10_000), "{ports:?}");
        for p in ports {
            std::net::TcpListener::bind(("127.0.0.1", p)).expect("free again once returned");
        }
    }
}
