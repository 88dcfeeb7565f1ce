//! `wss://` and `https://` for real (feature `tls`): a TLS-terminating proxy
//! (tokio-rustls, a self-signed certificate for `localhost`) in front of a
//! real `tether-worker`, as a deployment puts one. The client trusts the
//! certificate through `ClientOptions::tls` / `Rest::with_tls`; with the
//! default (webpki) roots it refuses it and says why.
#![cfg(feature = "tls")]

mod common;

use common::*;
use std::net::SocketAddr;
use std::sync::Arc;
use tether_client::{Client, ClientError, ClientEvent, ClientOptions, Rest};

/// Accepts TLS on a local port and relays each connection to `backend`.
async fn tls_proxy(backend: SocketAddr, cert: &rcgen::CertifiedKey) -> u16 {
    let key = rustls::pki_types::PrivateKeyDer::try_from(cert.key_pair.serialize_der()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.der().clone()], key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut up) = tokio::net::TcpStream::connect(backend).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut up).await;
            });
        }
    });
    port
}

fn trusting(cert: &rcgen::CertifiedKey) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.cert.der().clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_and_https_through_a_tls_proxy() {
    let pg = start_db();
    let w = start_worker(&pg, "w1").await;
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let port = tls_proxy(w.addr, &cert).await;
    let base = format!("https://localhost:{port}");

    let alice = Rest::new(&base, token("alice")).with_tls(trusting(&cert));
    let conv = alice.create_conversation(&["bob"], "tls").await.unwrap().id;
    let mut o = ClientOptions::new(base.replace("https", "wss"), token("bob"));
    o.tls = Some(trusting(&cert));
    let mut bob = Client::connect(o);
    assert!(bob.wait_synced(T).await.is_some());
    let sent = bob.send(conv, "over TLS").await.unwrap();
    assert_eq!(sent.seq, 2);
    let e = next_in(&mut bob, conv).await;
    assert_eq!((e.seq, e.body.as_deref()), (2, Some("over TLS")));
    close(bob).await;

    // The default roots do not know this certificate: refused, and said so.
    let mut c = Client::connect(ClientOptions::new(base.clone(), token("bob")));
    let why = loop {
        if let ClientEvent::Error(ClientError::Connect(m)) = next(&mut c).await {
            break m;
        }
    };
    assert!(
        why.contains("certificate") || why.contains("UnknownIssuer"),
        "{why}"
    );
    close(c).await;
    let err = Rest::new(&base, token("alice"))
        .get("/ready")
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("certificate") || err.to_string().contains("UnknownIssuer"),
        "{err}"
    );
}
