//! The byte stream an SMTP session runs over: plain TCP, TLS (after STARTTLS
//! or from the first byte), or any other async stream (an in-memory pair in
//! tests).
//!
//! Invariants:
//! - No read buffer lives in a connection between reads: bytes are read into
//!   a buffer on the stack of one poll and handed to the protocol engine at
//!   once, so an idle session costs its socket and its state only (memory per
//!   idle session is measured by `bench/run.sh`). TLS keeps rustls's own
//!   buffers: the price of encryption, paid only by TLS sessions.
//! - Plain TCP keeps its hand-tuned read path (`read_available`): one `recv`
//!   per readable edge.
//!
//! Not here: the TLS configuration and certificates (`tls.rs`), SMTP.
//!
//! Errors: `io::Error` from the socket or the TLS layer, as is.

use std::io;
use std::mem::MaybeUninit;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, Interest, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

/// Anything a session can run over.
pub trait ByteStream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> ByteStream for T {}

/// Octets read in one go: a full TLS record (16 KiB) or a large BDAT piece.
const READ_CHUNK: usize = 16 * 1024;

/// One client connection.
pub enum Conn {
    Tcp(TcpStream),
    /// TLS over any of these (boxed: a TLS session is large, and most
    /// sessions on port 25 never start one).
    Tls(Box<TlsStream<Conn>>),
    Other(Box<dyn ByteStream>),
    /// Only while the stream is being moved into a TLS session; every
    /// operation on it fails.
    Taken,
}

impl Conn {
    /// Waits for input and hands what is there to `sink`; `Ok(0)` at end of
    /// stream.
    pub async fn read_into(&mut self, sink: &mut impl FnMut(&[u8])) -> io::Result<usize> {
        if let Conn::Tcp(stream) = self {
            loop {
                stream.readable().await?;
                match read_available(stream, sink) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    other => return other,
                }
            }
        }
        std::future::poll_fn(|cx| {
            let mut buf = [MaybeUninit::<u8>::uninit(); READ_CHUNK];
            let mut read = ReadBuf::uninit(&mut buf);
            match Pin::new(&mut *self).poll_read(cx, &mut read) {
                Poll::Ready(Ok(())) => {
                    let data = read.filled();
                    if !data.is_empty() {
                        sink(data);
                    }
                    Poll::Ready(Ok(data.len()))
                }
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                Poll::Pending => Poll::Pending,
            }
        })
        .await
    }

    /// Writes all of `bytes` and pushes them out (TLS buffers records).
    pub async fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.write_all(bytes).await?;
        self.flush().await
    }

    /// The TLS session, once there is one.
    pub fn tls(&self) -> Option<&rustls::ServerConnection> {
        match self {
            Conn::Tls(tls) => Some(tls.get_ref().1),
            _ => None,
        }
    }
}

fn taken() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "connection handed to TLS")
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Conn::Other(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Conn::Taken => Poll::Ready(Err(taken())),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Conn::Other(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Conn::Taken => Poll::Ready(Err(taken())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Tcp(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Conn::Other(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Conn::Taken => Poll::Ready(Err(taken())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Conn::Other(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Conn::Taken => Poll::Ready(Ok(())),
        }
    }
}

/// Reads what the socket has into a stack buffer: no per-session buffer
/// survives between reads.
///
/// A short read almost always means the socket is drained (TCP urgent data
/// is the exception, as for tokio's own `poll_read`, which makes the same
/// assumption), so its readiness is cleared right away; `try_read` would leave it
/// set and cost an extra `recv` that fails with EAGAIN after every command.
/// Clearing is race-free: tokio only clears the readiness observed before
/// the `recv`, and data arriving later raises a new edge.
fn read_available(stream: &TcpStream, sink: &mut impl FnMut(&[u8])) -> io::Result<usize> {
    // Not zeroed first: recv(2) writes what it returns, and zeroing 16 KiB
    // before every read was 1% of a session thread's time.
    let mut buf = [MaybeUninit::<u8>::uninit(); READ_CHUNK];
    let mut received = 0;
    let res = stream.try_io(Interest::READABLE, || {
        // SAFETY: recv(2) into a buffer we own, of the length we pass, on the
        // stream's own fd, which is open for the duration of the borrow.
        let n = unsafe { libc::recv(stream.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
        received = n;
        if n > 0 && n < buf.len() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    });
    match res {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock && received == 0 => return Err(e),
        Err(e) if e.kind() != io::ErrorKind::WouldBlock => return Err(e),
        _ => {}
    }
    if received > 0 {
        // SAFETY: recv(2) initialised the first `received` bytes (it returned
        // that count, which is at most the buffer's length).
        let data = unsafe { std::slice::from_raw_parts(buf.as_ptr().cast::<u8>(), received) };
        sink(data);
    }
    Ok(received)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn reads_and_writes_any_stream() {
        let (a, mut b) = tokio::io::duplex(64);
        let mut conn = Conn::Other(Box::new(a));
        b.write_all(b"EHLO x\r\n").await.unwrap();
        let mut got = Vec::new();
        let n = conn
            .read_into(&mut |d| got.extend_from_slice(d))
            .await
            .unwrap();
        assert_eq!((n, got.as_slice()), (8, &b"EHLO x\r\n"[..]));
        conn.send(b"250 ok\r\n").await.unwrap();
        let mut reply = [0u8; 8];
        b.read_exact(&mut reply).await.unwrap();
        assert_eq!(&reply, b"250 ok\r\n");
        drop(b);
        assert_eq!(conn.read_into(&mut |_| {}).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn a_taken_connection_fails_instead_of_hanging() {
        let mut conn = Conn::Taken;
        assert!(conn.read_into(&mut |_| {}).await.is_err());
        assert!(conn.send(b"x").await.is_err());
    }
}
