//! A TCP relay between a client under test and its server that a test can cut, to show what the
//! client does when the server's host vanishes from the network: no refusal and no reset, just
//! silence. Cut, the relay passes no more bytes on any connection and holds new ones without
//! passing anything; the client's sockets stay open. Restored, new connections pass again, while
//! those open at the cut stay silent, as connections to a host that went away do.

use std::net::SocketAddr;

use tokio::{
    io::copy_bidirectional,
    net::{TcpListener, TcpStream},
    sync::watch,
};

/// A relay from a loopback port to `upstream`; it stops, and drops every connection, when
/// dropped.
#[derive(Debug)]
pub struct TcpRelay {
    addr: SocketAddr,
    cut: watch::Sender<bool>,
}

impl TcpRelay {
    /// Listens on a free loopback port and relays each connection to `upstream`.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (cut, watched) = watch::channel(false);
        tokio::spawn(accept(listener, upstream, watched));
        Ok(Self { addr, cut })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Silences every connection, open or new.
    pub fn cut(&self) {
        self.cut.send_replace(true);
    }

    /// Relays new connections again.
    pub fn restore(&self) {
        self.cut.send_replace(false);
    }
}

async fn accept(listener: TcpListener, upstream: SocketAddr, mut cut: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((client, _)) => {
                    tokio::spawn(relay(client, upstream, cut.clone()));
                }
                Err(_) => return,
            },
            changed = cut.changed() => if changed.is_err() {
                return;
            },
        }
    }
}

async fn relay(mut client: TcpStream, upstream: SocketAddr, mut cut: watch::Receiver<bool>) {
    if *cut.borrow_and_update() {
        hold_until_dropped(&mut cut).await;
        return;
    }
    let Ok(mut server) = TcpStream::connect(upstream).await else {
        return;
    };
    let was_cut = tokio::select! {
        _ = copy_bidirectional(&mut client, &mut server) => false,
        waited = cut.wait_for(|cut| *cut) => waited.is_ok(),
    };
    if was_cut {
        // Both sockets stay open, unread and unwritten.
        hold_until_dropped(&mut cut).await;
    }
}

/// Waits until the relay is dropped, whatever it is told meanwhile.
async fn hold_until_dropped(cut: &mut watch::Receiver<bool>) {
    while cut.changed().await.is_ok() {}
}
