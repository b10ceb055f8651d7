//! A TCP proxy for fault injection: it forwards both ways until armed, then keeps
//! forwarding requests upstream but drops every response byte. A request sent while
//! armed is applied by etcd but its answer never arrives: the indeterminate failure
//! ("the write may or may not have happened") made deterministic.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

pub struct Proxy {
    addr: SocketAddr,
    armed: Arc<AtomicBool>,
}

impl Proxy {
    /// A proxy on a free loopback port to `upstream` (host:port).
    pub fn start(upstream: &str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let armed = Arc::new(AtomicBool::new(false));
        let upstream = upstream.to_string();
        let flag = Arc::clone(&armed);
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(server) = TcpStream::connect(&upstream) else {
                    continue;
                };
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || pump(client, server, None));
                let flag = Arc::clone(&flag);
                std::thread::spawn(move || pump(s2, c2, Some(flag)));
            }
        });
        Proxy { addr, armed }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// From now on, answers are dropped.
    pub fn arm(&self) {
        self.armed.store(true, Ordering::SeqCst);
    }

    pub fn disarm(&self) {
        self.armed.store(false, Ordering::SeqCst);
    }
}

/// Copies `from` to `to`; while `drop_when` is set, reads and discards instead.
fn pump(mut from: TcpStream, mut to: TcpStream, drop_when: Option<Arc<AtomicBool>>) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if drop_when.as_ref().is_some_and(|f| f.load(Ordering::SeqCst)) {
            continue;
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Both);
}
