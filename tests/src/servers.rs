//! Backend servers and clients for the e2e tests.
//!
//! A [`NameServer`] listens on a TCP port inside a backend's namespace and answers every line
//! it reads with its own name, so a client can tell which backend a connection reached. A
//! request line starting with `GET ` gets a one-shot HTTP 200 answer instead (for HTTP health
//! checks). Stopping the server closes the listener and every open connection, like a killed
//! process.

use std::{
    io::{BufRead, BufReader, ErrorKind, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::Duration,
};

use crate::netns::Netns;

pub struct NameServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl NameServer {
    /// Listens on `[::]:port` (IPv4 too) in `ns` and answers with `name`.
    pub fn start(ns: &Netns, name: &str, port: u16) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let listener = ns
            .run(|| TcpListener::bind(("::", port)))
            .expect("binding the backend server");
        listener.set_nonblocking(true).unwrap();
        let name = name.to_string();
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut handlers = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let name = name.clone();
                        let flag = flag.clone();
                        handlers.push(std::thread::spawn(move || serve(stream, &name, &flag)));
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
                handlers.retain(|h: &JoinHandle<()>| !h.is_finished());
            }
            drop(listener);
            for h in handlers {
                let _ = h.join();
            }
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }

    /// Closes the listener and all connections.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for NameServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn serve(stream: TcpStream, name: &str, stop: &AtomicBool) {
    stream.set_nonblocking(false).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    while !stop.load(Ordering::Relaxed) {
        match reader.read_line(&mut line) {
            Ok(0) => return,
            Ok(_) if line.ends_with('\n') => {
                if line.starts_with("GET ") {
                    let body = format!("{name}\n");
                    let _ = write!(
                        writer,
                        "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    return;
                }
                if writer.write_all(format!("{name}\n").as_bytes()).is_err() {
                    return;
                }
                line.clear();
            }
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return,
        }
    }
}

/// Long enough for two SYN retransmissions (1 s, then 2 s later): on a loaded machine a veth
/// may drop a frame now and then, and a retransmitted SYN must not fail the test.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(4);

/// A client connection that asks which backend it reached.
pub struct Conn {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Conn {
    /// Connects from the calling thread's namespace.
    pub fn connect(addr: SocketAddr) -> std::io::Result<Self> {
        let s = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        s.set_nodelay(true)?;
        Ok(Self {
            writer: s.try_clone()?,
            reader: BufReader::new(s),
        })
    }

    /// Sends `payload` (plus a newline) and returns the backend's name.
    pub fn ask_with(&mut self, payload: &str) -> std::io::Result<String> {
        self.writer.write_all(format!("{payload}\n").as_bytes())?;
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(std::io::Error::new(
                ErrorKind::UnexpectedEof,
                "connection closed",
            ));
        }
        Ok(line.trim().to_string())
    }

    pub fn ask(&mut self) -> std::io::Result<String> {
        self.ask_with("which")
    }
}

/// One short connection: connect, ask, close. Returns the backend's name.
pub fn ask_once(addr: SocketAddr) -> std::io::Result<String> {
    Conn::connect(addr)?.ask()
}

/// A UDP server bound to `addr` in `ns` that answers every datagram with its name. Binding
/// the VIP itself (not 0.0.0.0) makes DSR replies leave from the VIP.
pub struct UdpNameServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl UdpNameServer {
    pub fn start(ns: &Netns, name: &str, addr: SocketAddr) -> Self {
        let socket = ns
            .run(|| std::net::UdpSocket::bind(addr))
            .expect("binding the UDP server");
        socket
            .set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let name = name.to_string();
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while !flag.load(Ordering::Relaxed) {
                if let Ok((_, peer)) = socket.recv_from(&mut buf) {
                    let _ = socket.send_to(name.as_bytes(), peer);
                }
            }
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for UdpNameServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Sends one datagram from a fresh socket (a new flow) and returns the answer.
pub fn udp_ask(addr: SocketAddr) -> std::io::Result<String> {
    let s = std::net::UdpSocket::bind("0.0.0.0:0")?;
    s.connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(1)))?;
    s.send(b"which")?;
    let mut buf = [0u8; 64];
    let n = s.recv(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}
