//! What the peer received, byte for byte: an `AF_PACKET` socket on the
//! kernel's NIC at the other end of the link, for the EtherType the driver
//! transmits, drained from the poll loop. Each frame must be exactly the
//! one `build_tx` wrote for its sequence number; a transmit buffer the
//! device read from anywhere else (the shared zero page pinned instead of
//! the page the CPU wrote, on Linux before 6.2) shows up as a bad frame.

use std::collections::HashSet;
use std::ffi::CString;
use std::io;

use crate::frame::{build_tx, Mac, ETH_MAX, TX_ETHERTYPE, TX_MAGIC};

/// The capture socket and what it has seen.
pub struct PeerCapture {
    fd: std::os::fd::OwnedFd,
    src: Mac,
    /// Sequence numbers received intact.
    pub good: HashSet<u64>,
    /// Frames of ours whose bytes differ from what was written.
    pub bad: u64,
    /// The first bad frame, described.
    pub first_bad: Option<String>,
}

impl PeerCapture {
    /// Opens the socket on `ifname` for frames from `src`.
    pub fn open(ifname: &str, src: Mac) -> io::Result<PeerCapture> {
        use std::os::fd::FromRawFd;
        let name = CString::new(ifname).map_err(|_| io::ErrorKind::InvalidInput)?;
        // SAFETY: `name` is a valid C string for the call.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if index == 0 {
            return Err(io::Error::last_os_error());
        }
        let proto = TX_ETHERTYPE.to_be();
        // SAFETY: plain socket creation.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                i32::from(proto),
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh fd nobody else owns.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        // SAFETY: all-zero is a valid `sockaddr_ll`.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = proto;
        addr.sll_ifindex = index as i32;
        use std::os::fd::AsRawFd;
        // SAFETY: `addr` is a `sockaddr_ll` of the size given.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&raw const addr).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(PeerCapture {
            fd,
            src,
            good: HashSet::new(),
            bad: 0,
            first_bad: None,
        })
    }

    /// Reads every frame waiting and checks those from the driver.
    pub fn drain(&mut self) {
        use std::os::fd::AsRawFd;
        let mut frame = [0u8; ETH_MAX + 64];
        let mut want = [0u8; ETH_MAX + 64];
        loop {
            // SAFETY: `frame` is writable for its length.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    frame.as_mut_ptr().cast(),
                    frame.len(),
                    0,
                )
            };
            if n <= 0 {
                return;
            }
            let got = &frame[..n as usize];
            if got.len() < 38 || got[6..12] != self.src.0 || &got[14..30] != TX_MAGIC {
                continue;
            }
            let seq = u64::from_le_bytes(got[30..38].try_into().unwrap());
            let len = build_tx(&mut want, self.src, seq);
            if got == &want[..len] {
                self.good.insert(seq);
            } else {
                self.bad += 1;
                if self.first_bad.is_none() {
                    let at = got
                        .iter()
                        .zip(&want[..len])
                        .position(|(a, b)| a != b)
                        .unwrap_or(len.min(got.len()));
                    let zeros = got.iter().filter(|&&b| b == 0).count();
                    self.first_bad = Some(format!(
                        "frame {seq}: {} bytes (expected {len}), first difference at byte {at}, \
                         {zeros} zero bytes",
                        got.len()
                    ));
                }
            }
        }
    }
}
