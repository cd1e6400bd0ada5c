//! Sample response bodies for benchmarks. Also compiled into l7-proxy's policy_chain bench
//! (through `#[path]`), so both measure the same bytes.

/// A JSON object listing user records (ids, random hex uuids, names, emails, timestamps,
/// scores, tags), whole records only, at most `max` bytes: content that compresses about as
/// well as a real API response, unlike one repeated byte. The same bytes on every call.
pub fn records(max: usize) -> Vec<u8> {
    const FIRST: [&str; 8] = [
        "alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi",
    ];
    const LAST: [&str; 6] = ["smith", "jones", "garcia", "miller", "davis", "lopez"];
    const TAGS: [&str; 6] = ["admin", "beta", "billing", "support", "eu", "us"];
    // xorshift64: fixed seed, so every run serves the same body.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let (head, tail) = ("{\"items\":[", "]}");
    let mut out = String::from(head);
    for id in 10_000.. {
        let (a, b, c) = (next(), next(), next());
        let (first, last) = (FIRST[(a % 8) as usize], LAST[(b % 6) as usize]);
        let record = serde_json::json!({
            "id": id,
            "uuid": format!("{c:016x}"),
            "name": format!("{first} {last}"),
            "email": format!("{first}.{last}@example.com"),
            "created_at": format!(
                "2026-{:02}-{:02}T{:02}:{:02}:{:02}Z",
                1 + a % 12, 1 + b % 28, c % 24, a % 60, b % 60
            ),
            "score": (c % 100_000) as f64 / 100.0,
            "active": a % 3 == 0,
            "tags": [TAGS[(b % 6) as usize], TAGS[(c % 6) as usize]],
        })
        .to_string();
        let sep = usize::from(out.len() > head.len());
        if out.len() + sep + record.len() + tail.len() > max {
            break;
        }
        if sep == 1 {
            out.push(',');
        }
        out += &record;
    }
    out += tail;
    out.into_bytes()
}
