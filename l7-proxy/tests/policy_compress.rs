//! Compression over real HTTP: each algorithm's output is decoded by an independent decoder
//! and compared byte for byte with what the upstream sent; negotiation and skip rules.

mod policy_harness;

use std::io::Read;
use std::net::SocketAddr;

use policy_harness::*;

/// A compressible but not trivially repetitive text body.
fn text_body() -> Vec<u8> {
    let mut out = Vec::new();
    let mut x: u64 = 42;
    for i in 0..5_000 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        out.extend_from_slice(format!("line {i} value {} ", x >> 52).as_bytes());
        if i % 8 == 0 {
            out.push(b'\n');
        }
    }
    out
}

async fn compress_gateway() -> (Upstream, SocketAddr) {
    compress_gateway_with("algorithms = [\"zstd\", \"br\", \"gzip\"]\nmin_size = 256").await
}

/// A gateway with one compress policy configured by `settings` (TOML lines).
async fn compress_gateway_with(settings: &str) -> (Upstream, SocketAddr) {
    let up = upstream(|parts, _| async move {
        let body = text_body();
        match parts.uri.path() {
            "/small" => reply(200, &[("content-type", "text/plain")], "tiny"),
            // Known length under the one-shot limit: compressed whole, sent with a length.
            "/short" => reply(
                200,
                &[("content-type", "application/json")],
                body[..20_000].to_vec(),
            ),
            "/range" => reply(
                206,
                &[
                    ("content-type", "text/plain"),
                    ("content-range", "bytes 0-999/5000"),
                ],
                vec![b'a'; 1000],
            ),
            "/png" => reply(200, &[("content-type", "image/png")], body),
            "/encoded" => reply(
                200,
                &[("content-type", "text/plain"), ("content-encoding", "gzip")],
                "pretend-gzip",
            ),
            _ => reply(
                200,
                &[
                    ("content-type", "text/plain; charset=utf-8"),
                    ("etag", "\"abc\""),
                ],
                body,
            ),
        }
    })
    .await;
    let chain = chain_from_toml(&format!("[[policies]]\ntype = \"compress\"\n{settings}"));
    let gw = gateway(chain, one_group("app", up.addr), "app").await;
    (up, gw)
}

fn decode(encoding: &str, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    match encoding {
        "gzip" => {
            flate2::read::GzDecoder::new(data)
                .read_to_end(&mut out)
                .unwrap();
        }
        "br" => {
            brotli::Decompressor::new(data, 4096)
                .read_to_end(&mut out)
                .unwrap();
        }
        "zstd" => out = zstd::stream::decode_all(data).unwrap(),
        other => panic!("{other}"),
    }
    out
}

#[tokio::test]
async fn each_algorithm_round_trips_byte_for_byte() {
    let (_up, gw) = compress_gateway().await;
    let original = text_body();
    for encoding in ["gzip", "br", "zstd"] {
        let got = get(gw, "/text", &[("accept-encoding", encoding)]).await;
        assert_eq!(got.status, 200);
        assert_eq!(got.header("content-encoding"), Some(encoding));
        assert_eq!(got.header("content-length"), None);
        assert!(got.header("vary").unwrap().contains("Accept-Encoding"));
        assert_eq!(
            got.header("etag"),
            Some("W/\"abc\""),
            "strong ETag weakened"
        );
        assert!(
            got.body.len() < original.len() / 2,
            "{encoding}: {} bytes",
            got.body.len()
        );
        assert!(
            decode(encoding, &got.body) == original,
            "{encoding}: decoded body differs"
        );
    }
}

/// zstd's fast modes (negative levels), streamed and in one piece.
#[tokio::test]
async fn zstd_fast_levels_round_trip() {
    let (_up, gw) = compress_gateway_with("algorithms = [\"zstd\"]\nzstd_level = -3").await;
    let original = text_body();
    for (path, want) in [("/text", &original[..]), ("/short", &original[..20_000])] {
        let got = get(gw, path, &[("accept-encoding", "zstd")]).await;
        assert_eq!(got.status, 200);
        assert_eq!(got.header("content-encoding"), Some("zstd"), "{path}");
        assert!(
            got.body.len() < want.len() / 2,
            "{path}: {} bytes",
            got.body.len()
        );
        assert!(
            decode("zstd", &got.body) == want,
            "{path}: decoded body differs"
        );
    }
}

/// gzip with fixed Huffman codes (`gzip_strategy = "fixed"`): a whole body (known length up
/// to 64 KiB) gets fixed-code blocks; a streamed one is ordinary level-1 gzip. Both decode.
#[tokio::test]
async fn gzip_fixed_strategy_round_trips() {
    let (_up, gw) =
        compress_gateway_with("algorithms = [\"gzip\"]\ngzip_level = 1\ngzip_strategy = \"fixed\"")
            .await;
    let (_up2, dynamic_gw) = compress_gateway_with("algorithms = [\"gzip\"]").await;
    let original = text_body();
    // Bits 1-2 of the first deflate byte, after the 10-byte gzip header (RFC 1951 3.2.3).
    let block_type = |gz: &[u8]| (gz[10] >> 1) & 3;
    // Twice: the second response comes from the reused per-thread stream.
    for _ in 0..2 {
        let got = get(gw, "/short", &[("accept-encoding", "gzip")]).await;
        assert_eq!(got.status, 200);
        assert_eq!(got.header("content-encoding"), Some("gzip"));
        assert_eq!(
            got.header("content-length"),
            Some(got.body.len().to_string().as_str())
        );
        assert_eq!(block_type(&got.body), 1, "fixed codes");
        assert!(decode("gzip", &got.body) == original[..20_000]);
        let dynamic = get(dynamic_gw, "/short", &[("accept-encoding", "gzip")]).await;
        assert_eq!(block_type(&dynamic.body), 2, "dynamic codes by default");
        assert!(
            got.body.len() < 20_000 / 2 && got.body.len() > dynamic.body.len(),
            "fixed {} bytes, dynamic {}",
            got.body.len(),
            dynamic.body.len()
        );
    }
    let streamed = get(gw, "/text", &[("accept-encoding", "gzip")]).await;
    assert_eq!(streamed.header("content-encoding"), Some("gzip"));
    assert!(decode("gzip", &streamed.body) == original);
}

#[tokio::test]
async fn short_known_length_bodies_get_a_compressed_content_length() {
    let (_up, gw) = compress_gateway().await;
    let original = &text_body()[..20_000];
    // Twice per algorithm: the second response comes from the reused per-thread encoder.
    for encoding in ["gzip", "br", "zstd", "gzip", "br", "zstd"] {
        let got = get(gw, "/short", &[("accept-encoding", encoding)]).await;
        assert_eq!(got.status, 200);
        assert_eq!(got.header("content-encoding"), Some(encoding));
        assert_eq!(
            got.header("content-length"),
            Some(got.body.len().to_string().as_str()),
            "{encoding}: content-length must be the compressed size"
        );
        assert!(got.body.len() < original.len() / 2, "{encoding}");
        assert!(
            decode(encoding, &got.body) == original,
            "{encoding}: decoded body differs"
        );
    }
}

#[tokio::test]
async fn negotiation_uses_q_values_and_server_preference() {
    let (_up, gw) = compress_gateway().await;
    let enc = |ae: &'static str| async move {
        get(gw, "/text", &[("accept-encoding", ae)])
            .await
            .header("content-encoding")
            .map(str::to_string)
    };
    assert_eq!(enc("gzip;q=0.5, br;q=0.9").await.as_deref(), Some("br"));
    assert_eq!(enc("gzip, br, zstd").await.as_deref(), Some("zstd"));
    assert_eq!(enc("zstd;q=0, br;q=0, gzip").await.as_deref(), Some("gzip"));
    assert_eq!(enc("identity").await, None);
    let plain = get(gw, "/text", &[]).await;
    assert_eq!(plain.header("content-encoding"), None);
    assert_eq!(plain.body, text_body());
}

#[tokio::test]
async fn small_binary_partial_and_encoded_responses_are_untouched() {
    let (_up, gw) = compress_gateway().await;
    let ae = [("accept-encoding", "gzip, br")];
    let small = get(gw, "/small", &ae).await;
    assert_eq!(small.header("content-encoding"), None);
    assert_eq!(&small.body[..], b"tiny");
    let png = get(gw, "/png", &ae).await;
    assert_eq!(png.header("content-encoding"), None);
    assert_eq!(png.body, text_body());
    let range = get(gw, "/range", &ae).await;
    assert_eq!(range.status, 206);
    assert_eq!(range.header("content-encoding"), None);
    let encoded = get(gw, "/encoded", &ae).await;
    assert_eq!(encoded.header("content-encoding"), Some("gzip"));
    assert_eq!(&encoded.body[..], b"pretend-gzip");
}

/// `cache` listed before `compress` stores the compressed response, one variant per
/// `Accept-Encoding` (compress adds `Vary: Accept-Encoding`), so a hit is answered with the
/// stored bytes and nothing is compressed again; a client asking for another encoding gets its
/// own variant.
#[tokio::test]
async fn cache_before_compress_stores_compressed_variants() {
    let up = upstream(|_, _| async move {
        reply(
            200,
            &[
                ("content-type", "application/json"),
                ("cache-control", "max-age=60"),
            ],
            text_body()[..20_000].to_vec(),
        )
    })
    .await;
    let chain = chain_from_toml(
        "[[policies]]\ntype = \"cache\"\n\n[[policies]]\ntype = \"compress\"\nalgorithms = [\"gzip\", \"zstd\"]",
    );
    let gw = gateway(chain, one_group("app", up.addr), "app").await;
    let original = &text_body()[..20_000];

    let first = get(gw, "/list", &[("accept-encoding", "gzip")]).await;
    let second = get(gw, "/list", &[("accept-encoding", "gzip")]).await;
    assert_eq!(first.header("x-cache"), Some("MISS"));
    assert_eq!(second.header("x-cache"), Some("HIT"));
    for got in [&first, &second] {
        assert_eq!(got.status, 200);
        assert_eq!(got.header("content-encoding"), Some("gzip"));
        assert!(got.header("vary").unwrap().contains("Accept-Encoding"));
        assert!(
            decode("gzip", &got.body) == original,
            "gzip variant decodes"
        );
    }
    assert!(
        second.body == first.body,
        "the hit is the stored compressed bytes"
    );

    // Another Accept-Encoding is another variant: fetched once, then a hit of its own.
    let zstd = get(gw, "/list", &[("accept-encoding", "zstd")]).await;
    let zstd_again = get(gw, "/list", &[("accept-encoding", "zstd")]).await;
    assert_eq!(zstd.header("x-cache"), Some("MISS"));
    assert_eq!(zstd_again.header("x-cache"), Some("HIT"));
    assert_eq!(zstd_again.header("content-encoding"), Some("zstd"));
    assert!(decode("zstd", &zstd_again.body) == original);
    let plain = get(gw, "/list", &[]).await;
    assert_eq!(plain.header("content-encoding"), None);
    assert!(
        plain.body == original,
        "a client without Accept-Encoding gets identity"
    );
    assert_eq!(up.hits(), 3, "one upstream request per variant");
}

/// A response that could have been compressed names `Accept-Encoding` in `Vary` even when the
/// client accepts no offered encoding (nginx's `gzip_vary`); one that could not does not.
#[tokio::test]
async fn vary_is_sent_on_compressible_responses_sent_as_is() {
    let (_up, gw) = compress_gateway().await;
    for ae in [&[][..], &[("accept-encoding", "identity")][..]] {
        let plain = get(gw, "/text", ae).await;
        assert_eq!(plain.header("content-encoding"), None);
        assert_eq!(plain.header("vary"), Some("Accept-Encoding"), "{ae:?}");
        assert_eq!(
            plain.header("etag"),
            Some("\"abc\""),
            "identity keeps its strong ETag"
        );
        assert_eq!(plain.body, text_body());
    }
    for path in ["/small", "/png", "/encoded"] {
        assert_eq!(get(gw, path, &[]).await.header("vary"), None, "{path}");
    }
}

/// `[cache, compress]`: a client without `Accept-Encoding` gets its own identity variant
/// instead of replacing the key's `Vary` list, so later gzip clients still get gzip hits.
#[tokio::test]
async fn cache_keeps_the_identity_variant_apart() {
    let up = upstream(|_, _| async move {
        reply(
            200,
            &[
                ("content-type", "text/plain"),
                ("cache-control", "max-age=60"),
            ],
            text_body()[..20_000].to_vec(),
        )
    })
    .await;
    let chain =
        chain_from_toml("[[policies]]\ntype = \"cache\"\n[[policies]]\ntype = \"compress\"");
    let gw = gateway(chain, one_group("app", up.addr), "app").await;
    let gz = [("accept-encoding", "gzip")];
    assert_eq!(
        get(gw, "/c", &gz).await.header("content-encoding"),
        Some("gzip")
    );
    let plain = get(gw, "/c", &[]).await;
    assert_eq!(
        (plain.header("content-encoding"), plain.header("x-cache")),
        (None, Some("MISS"))
    );
    let again = get(gw, "/c", &gz).await;
    assert_eq!(
        (again.header("content-encoding"), again.header("x-cache")),
        (Some("gzip"), Some("HIT"))
    );
    assert!(decode("gzip", &again.body) == text_body()[..20_000]);
    let plain_again = get(gw, "/c", &[]).await;
    assert_eq!(
        (
            plain_again.header("content-encoding"),
            plain_again.header("x-cache")
        ),
        (None, Some("HIT"))
    );
    assert_eq!(up.hits(), 2);
}

/// An upstream that promises more bytes than it sends: the body is read whole before it is
/// compressed, so nothing has reached the client yet, which gets a 502 rather than a
/// connection closed without any response.
#[tokio::test]
async fn a_truncated_upstream_body_is_a_502() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let mut out =
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 5000\r\n\r\n"
                        .to_vec();
                out.extend(std::iter::repeat_n(b'a', 2000));
                let _ = stream.write_all(&out).await;
                // Closed 3000 bytes short.
            });
        }
    });
    let chain = chain_from_toml("[[policies]]\ntype = \"compress\"\nalgorithms = [\"gzip\"]");
    let gw = gateway(chain, one_group("app", up), "app").await;
    let got = get(gw, "/", &[("accept-encoding", "gzip")]).await;
    assert_eq!(got.status, 502, "{:?}", got.body);
    assert_eq!(got.header("content-encoding"), None);
}
