//! A TCP proxy for fault injection: it forwards both ways until armed, then keeps
//! forwarding requests upstream but drops every response byte. A request sent while
//! armed is applied by etcd but its answer never arrives: the indeterminate failure
//! ("the write may or may not have happened") made deterministic.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Response bytes are dropped once the client has sent at least `threshold` bytes since
/// the proxy was armed (`usize::MAX`: never).
struct Switch {
    threshold: AtomicUsize,
    sent: AtomicUsize,
}

impl Switch {
    fn dropping(&self) -> bool {
        self.sent.load(Ordering::SeqCst) >= self.threshold.load(Ordering::SeqCst)
    }
}

pub struct Proxy {
    addr: SocketAddr,
    switch: Arc<Switch>,
}

impl Proxy {
    /// A proxy on a free loopback port to `upstream` (host:port).
    pub fn start(upstream: &str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let switch = Arc::new(Switch {
            threshold: AtomicUsize::new(usize::MAX),
            sent: AtomicUsize::new(0),
        });
        let upstream = upstream.to_string();
        let flag = Arc::clone(&switch);
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(server) = TcpStream::connect(&upstream) else {
                    continue;
                };
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let up = Arc::clone(&flag);
                std::thread::spawn(move || pump(client, server, Direction::Request(up)));
                let down = Arc::clone(&flag);
                std::thread::spawn(move || pump(s2, c2, Direction::Response(down)));
            }
        });
        Proxy { addr, switch }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// From now on, answers are dropped.
    pub fn arm(&self) {
        self.arm_after_request_bytes(0);
    }

    /// Answers are dropped once the client has sent `n` more bytes: small requests still
    /// get through, and the first large one loses its answer.
    pub fn arm_after_request_bytes(&self, n: usize) {
        self.switch.sent.store(0, Ordering::SeqCst);
        self.switch.threshold.store(n, Ordering::SeqCst);
    }

    pub fn disarm(&self) {
        self.switch.threshold.store(usize::MAX, Ordering::SeqCst);
    }
}

enum Direction {
    /// Client to etcd: counted.
    Request(Arc<Switch>),
    /// etcd to client: dropped while the switch says so.
    Response(Arc<Switch>),
}

/// Copies `from` to `to`, counting requests and dropping responses as the switch says.
fn pump(mut from: TcpStream, mut to: TcpStream, direction: Direction) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        match &direction {
            Direction::Request(switch) => {
                switch.sent.fetch_add(n, Ordering::SeqCst);
            }
            Direction::Response(switch) => {
                if switch.dropping() {
                    continue;
                }
            }
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Both);
}
