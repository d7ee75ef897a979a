//! Client connections before and after their requests: what the proxy hooks cannot see.
//!
//! [`ConnectionPolicy`] wraps the proxy app of one listening service and sees every accepted
//! connection first:
//! - a connection that sends nothing within `downstream.client_timeout_ms` is closed (Pingora
//!   alone would hold a silent connection for 60 s, or forever while waiting for an HTTP/2
//!   preface); TLS streams cannot be peeked, so their first read gets a deadline instead
//!   (`FirstReadDeadline`);
//! - on h2c listeners, only a connection that starts with the HTTP/2 preface goes to the h2c
//!   proxy; anything else (a short HTTP/1.0 health check, say) goes to the same proxy with h2c off;
//! - at shutdown and graceful upgrade, Pingora's cleanup (which aborts every keep-alive
//!   connection waiting for its next request) is deferred to the end of the drain, so requests
//!   that arrive meanwhile are served with `Connection: close` instead of being reset.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::protocols::{self, Stream};
use pingora::server::ShutdownWatch;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{sleep, Sleep};

/// The first three bytes of the HTTP/2 connection preface (`PRI * HTTP/2.0`).
const H2_PREFACE_START: &[u8; 3] = b"PRI";

/// Per-connection policy around one service's proxy app (see the module doc).
///
/// Why the deferred cleanup makes upgrades lossless: Pingora's own cleanup, run as soon as the
/// listeners stop, aborts every keep-alive connection that is waiting for its next request, and
/// a client that is sending a request on one of them at that moment sees a reset. Deferred, those
/// connections stay readable during the drain: a request that arrives is served normally, with
/// keep-alive off (Pingora does that once shutdown is flagged), so the client learns from
/// `Connection: close` to reconnect, and reaches the new process. Connections still idle at the
/// end of the drain are closed then.
pub struct ConnectionPolicy<A> {
    /// The proxy app (with h2c on, on h2c listeners).
    pub inner: Arc<A>,
    /// On h2c listeners: the same proxy with h2c off, for clients whose first bytes are not the
    /// HTTP/2 preface.
    pub h1_only: Option<Arc<A>>,
    /// How long idle keep-alive connections stay open once shutdown has started.
    pub drain: Duration,
    /// How long a new connection may stay silent (nginx's `client_header_timeout`).
    pub first_request: Duration,
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for ConnectionPolicy<A> {
    async fn process_new(
        self: &Arc<Self>,
        mut session: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        if session.get_ssl_digest().is_some() {
            // TLS streams cannot be peeked: bound the first read instead.
            let session: Stream = Box::new(FirstReadDeadline::new(session, self.first_request));
            return self.inner.process_new(session, shutdown).await;
        }
        let mut first = [0u8; 3];
        match tokio::time::timeout(self.first_request, session.try_peek(&mut first)).await {
            Ok(Ok(_)) => {}
            _ => return None,
        }
        match &self.h1_only {
            Some(h1) if &first != H2_PREFACE_START => h1.process_new(session, shutdown).await,
            _ => self.inner.process_new(session, shutdown).await,
        }
    }

    async fn cleanup(&self) {
        sleep(self.drain).await;
        self.inner.cleanup().await;
        if let Some(h1) = &self.h1_only {
            h1.cleanup().await;
        }
    }
}

/// A client stream whose reads fail with `TimedOut` if nothing at all arrives within the first
/// deadline; after the first byte it is transparent.
#[derive(Debug)]
struct FirstReadDeadline {
    inner: Stream,
    deadline: Option<Pin<Box<Sleep>>>,
}

impl FirstReadDeadline {
    fn new(inner: Stream, within: Duration) -> Self {
        FirstReadDeadline {
            inner,
            deadline: Some(Box::pin(sleep(within))),
        }
    }
}

impl AsyncRead for FirstReadDeadline {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    self.deadline = None;
                }
                Poll::Ready(r)
            }
            Poll::Pending => {
                let expired = match self.deadline.as_mut() {
                    Some(d) => d.as_mut().poll(cx).is_ready(),
                    None => false,
                };
                if expired {
                    Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "no request")))
                } else {
                    Poll::Pending
                }
            }
        }
    }
}

impl AsyncWrite for FirstReadDeadline {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[async_trait]
impl protocols::Shutdown for FirstReadDeadline {
    async fn shutdown(&mut self) {
        self.inner.shutdown().await
    }
}

impl protocols::UniqueID for FirstReadDeadline {
    fn id(&self) -> protocols::UniqueIDType {
        self.inner.id()
    }
}

impl protocols::Ssl for FirstReadDeadline {
    fn get_ssl(&self) -> Option<&protocols::tls::TlsRef> {
        self.inner.get_ssl()
    }
    fn get_ssl_digest(&self) -> Option<Arc<protocols::tls::SslDigest>> {
        self.inner.get_ssl_digest()
    }
    fn selected_alpn_proto(&self) -> Option<protocols::ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl protocols::GetTimingDigest for FirstReadDeadline {
    fn get_timing_digest(&self) -> Vec<Option<protocols::TimingDigest>> {
        self.inner.get_timing_digest()
    }
}

impl protocols::GetProxyDigest for FirstReadDeadline {
    fn get_proxy_digest(&self) -> Option<Arc<protocols::raw_connect::ProxyDigest>> {
        self.inner.get_proxy_digest()
    }
}

impl protocols::GetSocketDigest for FirstReadDeadline {
    fn get_socket_digest(&self) -> Option<Arc<protocols::SocketDigest>> {
        self.inner.get_socket_digest()
    }
}

#[async_trait]
impl protocols::Peek for FirstReadDeadline {}
