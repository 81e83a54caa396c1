//! Reading the kernel log (`/dev/kmsg`) for the IOMMU's verdict: the DMAR
//! fault lines Linux's intel-iommu driver prints for a device's DMA that
//! its page tables refused.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;

/// A reader of kernel log records from some point on.
pub struct Kmsg {
    file: File,
}

impl Kmsg {
    /// Opens the log at its oldest record.
    pub fn from_start() -> std::io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open("/dev/kmsg")?;
        Ok(Self { file })
    }

    /// Opens the log after its newest record: only later lines are read.
    pub fn from_now() -> std::io::Result<Self> {
        let mut kmsg = Self::from_start()?;
        kmsg.file.seek(SeekFrom::End(0))?;
        Ok(kmsg)
    }

    /// The messages logged since the last call (or since the opening point).
    pub fn read_new(&mut self) -> Vec<String> {
        let mut lines = Vec::new();
        let mut buf = vec![0u8; 8192];
        loop {
            match self.file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    let record = String::from_utf8_lossy(&buf[..n]);
                    // "prio,seq,usec,flags;message\n" plus continuation lines.
                    if let Some((_, msg)) = record.split_once(';') {
                        lines.push(msg.lines().next().unwrap_or("").to_owned());
                    }
                }
                // A record was overwritten before we read it: go on.
                Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => break,
            }
        }
        lines
    }
}

/// One DMAR fault line.
#[derive(Clone, Debug)]
pub struct DmarFault {
    pub write: bool,
    /// The faulting page's address (the kernel prints it page-aligned).
    pub addr: u64,
    pub line: String,
}

/// The DMAR fault lines among `lines` for PCI device `bdf` (`00:03.0`
/// form, as the kernel prints it; a leading `0000:` domain is ignored).
pub fn dmar_faults(lines: &[String], bdf: &str) -> Vec<DmarFault> {
    let short = bdf.strip_prefix("0000:").unwrap_or(bdf);
    let tag = format!("Request device [{short}]");
    lines
        .iter()
        .filter(|l| l.contains("DMAR: [DMA ") && l.contains(&tag))
        .filter_map(|l| {
            let rest = l.split("fault addr 0x").nth(1)?;
            let hex: String = rest.chars().take_while(char::is_ascii_hexdigit).collect();
            Some(DmarFault {
                write: l.contains("[DMA Write"),
                addr: u64::from_str_radix(&hex, 16).ok()?,
                line: l.clone(),
            })
        })
        .collect()
}

/// Every DMAR fault line, for any device.
pub fn any_dmar_faults(lines: &[String]) -> Vec<String> {
    lines
        .iter()
        .filter(|l| l.contains("DMAR: [DMA "))
        .cloned()
        .collect()
}
