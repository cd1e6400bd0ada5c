//! The PROXY protocol (HAProxy, v1 text and v2 binary) on listeners with
//! `proxy_protocol = true`: the load balancer in front tells us who the client is before the
//! first byte of TLS or HTTP. We read exactly the header, byte-precise, so nothing after it
//! is consumed, and parse it with the `ppp` crate.

use std::io;
use std::net::SocketAddr;

use ppp::{v1, v2, HeaderResult};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Longest v1 header, CRLF included.
const V1_MAX: usize = 107;
/// The v2 signature.
const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

fn invalid(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("PROXY protocol: {msg}"))
}

/// Reads a PROXY header and returns the client address it carries (`None` for `UNKNOWN` or
/// `LOCAL`, where the socket's peer address stands).
pub async fn read_header<S: AsyncRead + Unpin>(stream: &mut S) -> io::Result<Option<SocketAddr>> {
    let mut buf = vec![stream.read_u8().await?];
    match buf[0] {
        b'P' => loop {
            buf.push(stream.read_u8().await?);
            if buf.ends_with(b"\r\n") {
                break;
            }
            if buf.len() >= V1_MAX {
                return Err(invalid("v1 header too long"));
            }
        },
        b'\r' => {
            let mut rest = [0u8; 15];
            stream.read_exact(&mut rest).await?;
            buf.extend_from_slice(&rest);
            if buf[..12] != V2_SIGNATURE {
                return Err(invalid("bad v2 signature"));
            }
            let len = u16::from_be_bytes([buf[14], buf[15]]) as usize;
            let start = buf.len();
            buf.resize(start + len, 0);
            stream.read_exact(&mut buf[start..]).await?;
        }
        _ => return Err(invalid("no header")),
    }
    match HeaderResult::parse(&buf) {
        HeaderResult::V1(Ok(header)) => Ok(match header.addresses {
            v1::Addresses::Tcp4(a) => Some(SocketAddr::new(a.source_address.into(), a.source_port)),
            v1::Addresses::Tcp6(a) => Some(SocketAddr::new(a.source_address.into(), a.source_port)),
            v1::Addresses::Unknown => None,
        }),
        HeaderResult::V2(Ok(header)) => Ok(match (header.command, header.addresses) {
            (v2::Command::Proxy, v2::Addresses::IPv4(a)) => {
                Some(SocketAddr::new(a.source_address.into(), a.source_port))
            }
            (v2::Command::Proxy, v2::Addresses::IPv6(a)) => {
                Some(SocketAddr::new(a.source_address.into(), a.source_port))
            }
            _ => None,
        }),
        _ => Err(invalid("malformed header")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn v1_and_following_bytes_are_kept() {
        let mut input: &[u8] = b"PROXY TCP4 192.0.2.7 10.0.0.1 5555 443\r\nGET / HTTP/1.1\r\n";
        let addr = read_header(&mut input).await.unwrap();
        assert_eq!(addr, Some("192.0.2.7:5555".parse().unwrap()));
        assert_eq!(input, b"GET / HTTP/1.1\r\n");
    }

    #[tokio::test]
    async fn v2_ipv6() {
        let header = v2::Builder::with_addresses(
            v2::Version::Two | v2::Command::Proxy,
            v2::Protocol::Stream,
            (
                "[2001:db8::1]:4000".parse::<SocketAddr>().unwrap(),
                "[2001:db8::2]:443".parse::<SocketAddr>().unwrap(),
            ),
        )
        .build()
        .unwrap();
        let mut bytes = header.clone();
        bytes.extend_from_slice(b"rest");
        let mut input: &[u8] = &bytes;
        let addr = read_header(&mut input).await.unwrap();
        assert_eq!(addr, Some("[2001:db8::1]:4000".parse().unwrap()));
        assert_eq!(input, b"rest");
    }

    #[tokio::test]
    async fn garbage_is_rejected() {
        let mut input: &[u8] = b"GET / HTTP/1.1\r\n\r\n";
        assert!(read_header(&mut input).await.is_err());
        let mut input: &[u8] = b"PROXY TCP4 nonsense\r\n";
        assert!(read_header(&mut input).await.is_err());
    }
}
