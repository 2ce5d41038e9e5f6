//! A TCP proxy that delays every chunk of bytes by a fixed time in each direction: a distant
//! server without the `netem` qdisc this kernel lacks. It adds latency, not a bandwidth limit:
//! a chunk read while another one waits goes out right after it, not a whole delay later.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

pub struct DelayProxy {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl DelayProxy {
    /// Listens on `bind` and forwards every connection to `upstream`, each chunk `delay` late
    /// in each direction, on a thread of its own until stopped or dropped.
    pub fn start(bind: SocketAddr, upstream: SocketAddr, delay: Duration) -> DelayProxy {
        let listener = std::net::TcpListener::bind(bind).expect("bind proxy");
        Self::start_on(listener, upstream, delay)
    }

    /// As [`DelayProxy::start`], on a listener of the caller's: one bound in another network
    /// namespace forwards from there to `upstream` in this process's own.
    pub fn start_on(
        listener: std::net::TcpListener,
        upstream: SocketAddr,
        delay: Duration,
    ) -> DelayProxy {
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                let listener = TcpListener::from_std(listener).expect("listener");
                tokio::select! {
                    _ = stopped => {}
                    () = accept(listener, upstream, delay) => {}
                }
            });
            // Dropping the runtime cancels every connection's tasks and closes their sockets.
        });
        DelayProxy {
            addr,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        self.shutdown();
    }
}

async fn accept(listener: TcpListener, upstream: SocketAddr, delay: Duration) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            // An upstream that refuses: the client sees its connection closed.
            let Ok(server) = TcpStream::connect(upstream).await else {
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (client_read, client_write) = client.into_split();
            let (server_read, server_write) = server.into_split();
            tokio::join!(
                forward(client_read, server_write, delay),
                forward(server_read, client_write, delay),
            );
        });
    }
}

/// Copies `from` to `to`, each chunk `delay` after it was read; an end of stream is passed on
/// (as a shutdown) just as late.
async fn forward(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, delay: Duration) {
    let (chunks, mut due) = mpsc::unbounded_channel::<(Instant, Option<Vec<u8>>)>();
    let reading = async move {
        loop {
            let mut buffer = vec![0; 16 * 1024];
            let chunk = match from.read(&mut buffer).await {
                Ok(0) | Err(_) => None,
                Ok(n) => {
                    buffer.truncate(n);
                    Some(buffer)
                }
            };
            let end = chunk.is_none();
            if chunks.send((Instant::now() + delay, chunk)).is_err() || end {
                return;
            }
        }
    };
    let writing = async move {
        while let Some((at, chunk)) = due.recv().await {
            tokio::time::sleep_until(at).await;
            match chunk {
                Some(bytes) => {
                    if to.write_all(&bytes).await.is_err() {
                        return;
                    }
                }
                None => {
                    let _ = to.shutdown().await;
                    return;
                }
            }
        }
    };
    tokio::join!(reading, writing);
}
