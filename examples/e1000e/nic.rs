//! The device: probe (open, BAR0, bus master, reset, interrupts masked,
//! link up), the receive and transmit queues, and stopping DMA in remove.

use std::collections::HashSet;
use std::fmt;
use std::sync::atomic::{fence, Ordering};
use std::thread::sleep;
use std::time::{Duration, Instant};

use pagepool::vfio::{MmioRegion, VfioDevice, VfioError, BAR0_REGION_INDEX};
use pagepool::{AllocError, DmaAddr, Page, PagePool};

use crate::coherent::CoherentPage;
use crate::frame::Mac;
use crate::regs::*;

/// PCI IDs of the 82574L, which QEMU's `e1000e` models.
pub const VENDOR_INTEL: u16 = 0x8086;
pub const DEVICE_82574L: u16 = 0x10d3;

/// Descriptors per ring: 256 x 16 bytes fill exactly one page.
pub const RING_LEN: usize = 256;

/// Why probe failed, each with what to check.
#[derive(Debug)]
pub enum ProbeError {
    /// The VFIO container, group or device fd could not be opened.
    Open { bdf: String, source: VfioError },
    /// Config space could not be read.
    ConfigSpace(VfioError),
    /// The function is not an 82574L.
    NotE1000e { vendor: u16, device: u16 },
    /// BAR0 could not be mapped.
    MapBar0(VfioError),
    /// BAR0 is smaller than the register file.
    Bar0TooSmall { size: usize },
    /// Registers read all ones: the device does not answer.
    NotResponding,
    /// Bus Master Enable could not be set.
    BusMaster(VfioError),
    /// CTRL.RST did not clear.
    ResetTimeout { waited: Duration },
    /// STATUS.LU stayed clear after CTRL.SLU.
    LinkDown { status: u32, waited: Duration },
    /// The EEPROM left no valid MAC address in RAL0/RAH0.
    NoMacAddress,
    /// The descriptor rings could not be mapped for the device.
    RingMap(VfioError),
}

impl fmt::Display for ProbeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Open { bdf, source } => write!(
                f,
                "cannot open {bdf} through VFIO: {source}. Check: the device is bound to \
                 vfio-pci (echo vfio-pci > /sys/bus/pci/devices/{bdf}/driver_override; echo \
                 {bdf} > /sys/bus/pci/drivers_probe), /dev/vfio/<group> exists, the IOMMU is on \
                 (intel_iommu=on), and you are root"
            ),
            Self::ConfigSpace(e) => write!(
                f,
                "cannot read PCI config space: {e}. Check that vfio-pci owns the device"
            ),
            Self::NotE1000e { vendor, device } => write!(
                f,
                "device {vendor:04x}:{device:04x} is not an 82574L ({VENDOR_INTEL:04x}:\
                 {DEVICE_82574L:04x}, QEMU's e1000e). Check the PCI address (lspci -nn)"
            ),
            Self::MapBar0(e) => write!(
                f,
                "cannot mmap BAR0: {e}. Check that BAR0 is a memory BAR vfio-pci lets you map \
                 (VFIO_DEVICE_GET_REGION_INFO index 0 with the MMAP flag)"
            ),
            Self::Bar0TooSmall { size } => write!(
                f,
                "BAR0 is {size:#x} bytes, the 82574 register file needs 128 KiB. Check the device"
            ),
            Self::NotResponding => write!(
                f,
                "STATUS reads 0xffffffff: the device does not answer (surprise removal, or its \
                 memory decoding is off). Check lspci and dmesg"
            ),
            Self::BusMaster(e) => write!(
                f,
                "cannot set Bus Master Enable in the command register: {e}. Without it the \
                 device cannot DMA; check that vfio-pci allows config writes"
            ),
            Self::ResetTimeout { waited } => write!(
                f,
                "CTRL.RST did not self-clear within {waited:?}: the device is wedged. Check \
                 dmesg; try a function reset (VFIO_DEVICE_RESET) or re-plug"
            ),
            Self::LinkDown { status, waited } => write!(
                f,
                "link still down {waited:?} after CTRL.SLU (STATUS {status:#010x}). Check that \
                 the other end is connected and up (QEMU: -netdev of the NIC, the peer's \
                 `ip link set <if> up`)"
            ),
            Self::NoMacAddress => write!(
                f,
                "RAH0.AV is clear: no MAC address loaded from the EEPROM. Check the device's NVM"
            ),
            Self::RingMap(e) => write!(
                f,
                "cannot map the descriptor rings for the device: {e}. Check RLIMIT_MEMLOCK and \
                 the vfio_iommu_type1 dma_entry_limit"
            ),
        }
    }
}

impl std::error::Error for ProbeError {}

/// Why the remove path could not confirm the device stopped.
#[derive(Debug)]
pub enum StopError {
    /// RDH/TDH still moved after the bound.
    NotQuiescent {
        waited: Duration,
        rdh: u32,
        tdh: u32,
    },
}

impl fmt::Display for StopError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotQuiescent { waited, rdh, tdh } => write!(
                f,
                "DMA engines still moving {waited:?} after RCTL.EN/TCTL.EN were cleared (RDH \
                 {rdh}, TDH {tdh}). Check the device; clear Bus Master Enable before freeing \
                 anything it may still write"
            ),
        }
    }
}

impl std::error::Error for StopError {}

/// How the device came up.
pub struct ProbeInfo {
    pub bar0_len: usize,
    pub link_wait: Duration,
}

/// A probed 82574: its VFIO device fd and its registers.
pub struct Nic {
    pub dev: VfioDevice,
    regs: MmioRegion,
    pub mac: Mac,
}

impl Nic {
    /// Probes `bdf`: opens it through the VFIO backend, maps BAR0, enables
    /// bus mastering, resets the MAC, masks every interrupt (this driver
    /// polls) and brings the link up.
    pub fn probe(bdf: &str) -> Result<(Nic, ProbeInfo), ProbeError> {
        let dev = VfioDevice::open(bdf).map_err(|source| ProbeError::Open {
            bdf: bdf.to_owned(),
            source,
        })?;
        let vendor = dev.config_read_u16(0).map_err(ProbeError::ConfigSpace)?;
        let device = dev.config_read_u16(2).map_err(ProbeError::ConfigSpace)?;
        if (vendor, device) != (VENDOR_INTEL, DEVICE_82574L) {
            return Err(ProbeError::NotE1000e { vendor, device });
        }
        let regs = dev
            .map_region(BAR0_REGION_INDEX)
            .map_err(ProbeError::MapBar0)?;
        if regs.len() < 0x2_0000 {
            return Err(ProbeError::Bar0TooSmall { size: regs.len() });
        }
        let bar0_len = regs.len();
        let nic = Nic {
            dev,
            regs,
            mac: Mac([0; 6]),
        };
        if nic.read(STATUS) == u32::MAX {
            return Err(ProbeError::NotResponding);
        }
        nic.dev
            .set_bus_master(true)
            .map_err(ProbeError::BusMaster)?;

        // Reset with interrupts masked (as Linux's e1000e does), then wait
        // for CTRL.RST to self-clear.
        nic.write(IMC, u32::MAX);
        nic.write(CTRL, nic.read(CTRL) | CTRL_RST);
        let started = Instant::now();
        while nic.read(CTRL) & CTRL_RST != 0 {
            if started.elapsed() > Duration::from_millis(100) {
                return Err(ProbeError::ResetTimeout {
                    waited: started.elapsed(),
                });
            }
            sleep(Duration::from_millis(1));
        }
        sleep(Duration::from_millis(10));
        nic.write(IMC, u32::MAX);
        let _ = nic.read(ICR);
        // Both engines off until their rings are programmed.
        nic.write(RCTL, 0);
        nic.write(TCTL, 0);
        // Clear the (read-to-clear) packet counters.
        let _ = (nic.read(TPR), nic.read(TPT));

        nic.write(CTRL, nic.read(CTRL) | CTRL_SLU);
        let started = Instant::now();
        loop {
            let status = nic.read(STATUS);
            if status & STATUS_LU != 0 {
                break;
            }
            if started.elapsed() > Duration::from_secs(5) {
                return Err(ProbeError::LinkDown {
                    status,
                    waited: started.elapsed(),
                });
            }
            sleep(Duration::from_millis(5));
        }
        let link_wait = started.elapsed();

        let (ral, rah) = (nic.read(RAL0), nic.read(RAH0));
        if rah & (1 << 31) == 0 {
            return Err(ProbeError::NoMacAddress);
        }
        let mut mac = [0; 6];
        mac[..4].copy_from_slice(&ral.to_le_bytes());
        mac[4..].copy_from_slice(&rah.to_le_bytes()[..2]);
        Ok((
            Nic {
                mac: Mac(mac),
                ..nic
            },
            ProbeInfo {
                bar0_len,
                link_wait,
            },
        ))
    }

    /// Reads a 32-bit register.
    pub fn read(&self, reg: usize) -> u32 {
        self.regs.read32(reg)
    }

    /// Writes a 32-bit register. Ordered after every earlier memory write of
    /// this thread, so descriptors written before a tail bump reach memory
    /// first.
    pub fn write(&self, reg: usize, value: u32) {
        self.regs.write32(reg, value)
    }

    /// Enables the receiver: promiscuous (unicast and multicast),
    /// broadcast, CRC stripped, 2048-byte buffers.
    pub fn enable_rx(&self) {
        self.write(RCTL, RCTL_EN | RCTL_UPE | RCTL_MPE | RCTL_BAM | RCTL_SECRC);
    }

    /// Enables the transmitter.
    pub fn enable_tx(&self) {
        self.write(TIPG, TIPG_DEFAULT);
        self.write(TCTL, TCTL_EN | TCTL_PSP | TCTL_CT | TCTL_COLD);
    }

    /// The first step of remove: turn both DMA engines off, then wait (at
    /// most `bound`) until the heads stop moving, so the device no longer
    /// touches any buffer.
    pub fn stop_dma(&self, bound: Duration) -> Result<Duration, StopError> {
        self.write(RCTL, self.read(RCTL) & !RCTL_EN);
        self.write(TCTL, self.read(TCTL) & !TCTL_EN);
        let started = Instant::now();
        let mut last = (self.read(RDH), self.read(TDH), self.read(RDH1));
        loop {
            sleep(Duration::from_millis(2));
            let now = (self.read(RDH), self.read(TDH), self.read(RDH1));
            if now == last {
                return Ok(started.elapsed());
            }
            if started.elapsed() > bound {
                return Err(StopError::NotQuiescent {
                    waited: started.elapsed(),
                    rdh: now.0,
                    tdh: now.1,
                });
            }
            last = now;
        }
    }

    /// Receive-side scaling over both receive queues: extended descriptors
    /// (RFCTL.EXTEN), the packet checksum off (RXCSUM.PCSD, its field
    /// carries the hash), a fixed key, a redirection table alternating
    /// queue 0 and 1, and hashing of IPv4/IPv6 addresses (and TCP ports).
    /// Call before the receiver is enabled.
    pub fn enable_rss(&self) {
        // The key Microsoft's RSS specification uses as its example.
        const KEY: [u8; 40] = [
            0x6d, 0x5a, 0x56, 0xda, 0x25, 0x5b, 0x0e, 0xc2, 0x41, 0x67, 0x25, 0x3d, 0x43, 0xa3,
            0x8f, 0xb0, 0xd0, 0xca, 0x2b, 0xcb, 0xae, 0x7b, 0x30, 0xb4, 0x77, 0xcb, 0x2d, 0xa3,
            0x80, 0x30, 0xf2, 0x0c, 0x6a, 0x42, 0xb7, 0x3b, 0xbe, 0xac, 0x01, 0xfa,
        ];
        for (i, word) in KEY.chunks(4).enumerate() {
            let w = u32::from_le_bytes([word[0], word[1], word[2], word[3]]);
            self.write(RSSRK + 4 * i, w);
        }
        // Entries 0, 2, 4, ... queue 0; 1, 3, 5, ... queue 1.
        for i in 0..32 {
            self.write(RETA + 4 * i, 0x8000_8000);
        }
        self.write(RXCSUM, RXCSUM_PCSD);
        self.write(RFCTL, self.read(RFCTL) | RFCTL_EXTEN);
        self.write(
            MRQC,
            MRQC_RSS | MRQC_TCP_IPV4 | MRQC_IPV4 | MRQC_TCP_IPV6 | MRQC_IPV6,
        );
    }

    /// Packets the device received / transmitted since the last read (its
    /// read-to-clear counters).
    pub fn take_packet_counters(&self) -> (u32, u32) {
        (self.read(TPR), self.read(TPT))
    }
}

/// The registers of one descriptor ring.
struct RingRegs {
    bal: usize,
    bah: usize,
    len: usize,
    head: usize,
    tail: usize,
}

const RX_RING: RingRegs = RingRegs {
    bal: RDBAL,
    bah: RDBAH,
    len: RDLEN,
    head: RDH,
    tail: RDT,
};

const RX_RING1: RingRegs = RingRegs {
    bal: RDBAL1,
    bah: RDBAH1,
    len: RDLEN1,
    head: RDH1,
    tail: RDT1,
};

const TX_RING: RingRegs = RingRegs {
    bal: TDBAL,
    bah: TDBAH,
    len: TDLEN,
    head: TDH,
    tail: TDT,
};

/// Points the device at a ring (its IOVA), empty: head = tail = 0.
fn program_ring(nic: &Nic, ring: &CoherentPage, regs: &RingRegs) {
    let iova = ring.iova().0;
    nic.write(regs.bal, iova as u32);
    nic.write(regs.bah, (iova >> 32) as u32);
    nic.write(regs.len, (RING_LEN * DESC_LEN) as u32);
    nic.write(regs.head, 0);
    nic.write(regs.tail, 0);
}

/// Receive-side counters.
#[derive(Clone, Copy, Default, Debug)]
pub struct RxStats {
    pub frames: u64,
    pub bytes: u64,
    /// Descriptors with an error bit, no EOP, or an impossible length.
    pub bad_descriptors: u64,
    /// Refills that found the pool unable to give a page.
    pub alloc_failures: u64,
    /// Buffers posted to the device.
    pub posted: u64,
    /// Frames the device classified for RSS (extended descriptors only):
    /// a hash type other than none.
    pub rss_hashed: u64,
}

/// The receive queue: a descriptor ring, one pool page per armed slot.
///
/// Slots `ntc..ntu` (mod `RING_LEN`) are armed: their descriptor points at
/// the page held in the slot and belongs to the device; `RDT == ntu`. At
/// most `RING_LEN - 1` are armed, so head == tail always means "empty".
pub struct RxQueue {
    regs: &'static RingRegs,
    /// Extended descriptors (RSS) instead of legacy ones.
    extended: bool,
    ring: CoherentPage,
    slots: Vec<Option<Page>>,
    ntc: usize,
    ntu: usize,
    pub stats: RxStats,
    pub last_alloc_error: Option<AllocError>,
    /// Device addresses of every buffer ever posted: how many distinct
    /// pages served `stats.posted` buffers.
    posted_pages: HashSet<u64>,
}

impl RxQueue {
    /// Receive queue `index` (0 or 1) of `nic`, its ring programmed empty;
    /// `extended`: the device writes extended descriptors back (RSS on).
    pub fn new(nic: &Nic, index: usize, extended: bool) -> Result<Self, ProbeError> {
        let regs = if index == 0 { &RX_RING } else { &RX_RING1 };
        let ring = CoherentPage::new(nic.dev.dma()).map_err(ProbeError::RingMap)?;
        program_ring(nic, &ring, regs);
        Ok(Self {
            regs,
            extended,
            ring,
            slots: (0..RING_LEN).map(|_| None).collect(),
            ntc: 0,
            ntu: 0,
            stats: RxStats::default(),
            last_alloc_error: None,
            posted_pages: HashSet::new(),
        })
    }

    pub fn ring_mut(&mut self) -> &mut CoherentPage {
        &mut self.ring
    }

    fn armed(&self) -> usize {
        (self.ntu + RING_LEN - self.ntc) % RING_LEN
    }

    /// Arms every free slot with a page from the pool's fast path (its
    /// local cache, refilled 64 at a time from the pages consumers gave
    /// back), then moves the tail once.
    pub fn refill(&mut self, pool: &mut PagePool, nic: &Nic) {
        let mut posted = false;
        while self.armed() < RING_LEN - 1 {
            let page = match pool.alloc() {
                Ok(page) => page,
                Err(e) => {
                    self.stats.alloc_failures += 1;
                    self.last_alloc_error = Some(e);
                    break;
                }
            };
            let at = self.ntu * DESC_LEN;
            self.ring.write_u64(at, page.dma_addr().0);
            self.ring.write_u64(at + 8, 0); // length, status, errors: clear
            self.posted_pages.insert(page.dma_addr().0);
            self.slots[self.ntu] = Some(page);
            self.ntu = (self.ntu + 1) % RING_LEN;
            self.stats.posted += 1;
            posted = true;
        }
        if posted {
            nic.write(self.regs.tail, self.ntu as u32);
        }
    }

    /// NAPI-style poll: [`clean`](Self::clean) at most `budget` frames,
    /// then [`refill`](Self::refill).
    pub fn poll(
        &mut self,
        budget: usize,
        pool: &mut PagePool,
        nic: &Nic,
        deliver: impl FnMut(Page, usize) -> Option<Page>,
    ) -> usize {
        let done = self.clean(budget, pool, deliver);
        self.refill(pool, nic);
        done
    }

    /// Takes at most `budget` completed frames off the ring and hands each
    /// to `deliver`, which returns the page if it could not take it (it is
    /// then recycled on the fast path).
    pub fn clean(
        &mut self,
        budget: usize,
        pool: &mut PagePool,
        mut deliver: impl FnMut(Page, usize) -> Option<Page>,
    ) -> usize {
        let mut done = 0;
        while done < budget && self.ntc != self.ntu {
            let at = self.ntc * DESC_LEN;
            let status = self.ring.read_u8(at + self.status_offset());
            if status & RXD_STAT_DD == 0 {
                break;
            }
            // The device wrote the buffer and then the descriptor: read the
            // rest of the descriptor, and the buffer, only after DD.
            fence(Ordering::Acquire);
            let word = self.ring.read_u64(at + 8);
            let (len, errors) = if self.extended {
                // status_error (32 bits), then length (16 bits).
                let status_error = word as u32;
                let rss_type = self.ring.read_u64(at) & 0xf;
                self.stats.rss_hashed += u64::from(rss_type != 0);
                (
                    ((word >> 32) & 0xffff) as usize,
                    u8::from(status_error & RXDEXT_ERR_FRAME != 0),
                )
            } else {
                ((word & 0xffff) as usize, (word >> 40) as u8)
            };
            let mut page = self.slots[self.ntc].take().expect("armed slot has a page");
            self.ntc = (self.ntc + 1) % RING_LEN;
            done += 1;
            if errors != 0 || status & RXD_STAT_EOP == 0 || !(14..=RX_BUF_LEN).contains(&len) {
                self.stats.bad_descriptors += 1;
                pool.recycle_direct(page);
                continue;
            }
            // Hand the received bytes to the CPU (a no-op on VFIO, whose DMA
            // is coherent, but the step every driver owes its DMA API).
            if page.sync_for_cpu(0..len).is_err() {
                self.stats.bad_descriptors += 1;
                pool.recycle_direct(page);
                continue;
            }
            self.stats.frames += 1;
            self.stats.bytes += len as u64;
            if let Some(page) = deliver(page, len) {
                pool.recycle_direct(page);
            }
        }
        done
    }

    /// Where the status byte (DD, EOP) sits in a written-back descriptor.
    fn status_offset(&self) -> usize {
        if self.extended {
            8
        } else {
            12
        }
    }

    /// Distinct pages (device addresses) among all buffers ever posted.
    pub fn distinct_posted(&self) -> usize {
        self.posted_pages.len()
    }

    /// After DMA is stopped: takes the pages of every still-armed slot
    /// back from the device.
    pub fn take_armed(&mut self) -> Vec<Page> {
        let mut pages = Vec::with_capacity(self.armed());
        while self.ntc != self.ntu {
            pages.extend(self.slots[self.ntc].take());
            self.ntc = (self.ntc + 1) % RING_LEN;
        }
        pages
    }

    /// The unplug experiment (never part of a real driver): writes
    /// descriptors pointing at `iovas` (device addresses of pages whose
    /// mappings unbind removed), resets head and tail and enables the
    /// receiver again, as a device that missed the remove would behave.
    /// Returns how many descriptors were armed.
    pub fn rearm_stale(&mut self, nic: &Nic, iovas: &[DmaAddr]) -> usize {
        let n = iovas.len().min(RING_LEN - 1);
        for (i, iova) in iovas[..n].iter().enumerate() {
            self.ring.write_u64(i * DESC_LEN, iova.0);
            self.ring.write_u64(i * DESC_LEN + 8, 0);
        }
        program_ring(nic, &self.ring, self.regs);
        nic.write(self.regs.tail, n as u32);
        nic.enable_rx();
        n
    }

    /// Descriptors `0..n` the device has written back (DD set).
    pub fn completed_of(&self, n: usize) -> usize {
        (0..n)
            .filter(|i| self.ring.read_u8(i * DESC_LEN + self.status_offset()) & RXD_STAT_DD != 0)
            .count()
    }

    /// Buffer address of descriptor `i`.
    pub fn desc_addr(&self, i: usize) -> u64 {
        self.ring.read_u64(i * DESC_LEN)
    }
}

/// Transmit-side counters.
#[derive(Clone, Copy, Default, Debug)]
pub struct TxStats {
    pub posted: u64,
    pub frames: u64,
    pub bytes: u64,
    /// Posted frames taken back unsent at remove.
    pub reclaimed: u64,
}

/// The transmit queue: slots `ntc..ntu` hold pages the device may still
/// read; `TDT == ntu` after each kick.
pub struct TxQueue {
    ring: CoherentPage,
    slots: Vec<Option<(Page, usize)>>,
    ntc: usize,
    ntu: usize,
    pub stats: TxStats,
}

impl TxQueue {
    pub fn new(nic: &Nic) -> Result<Self, ProbeError> {
        let ring = CoherentPage::new(nic.dev.dma()).map_err(ProbeError::RingMap)?;
        program_ring(nic, &ring, &TX_RING);
        Ok(Self {
            ring,
            slots: (0..RING_LEN).map(|_| None).collect(),
            ntc: 0,
            ntu: 0,
            stats: TxStats::default(),
        })
    }

    pub fn ring_mut(&mut self) -> &mut CoherentPage {
        &mut self.ring
    }

    pub fn free(&self) -> usize {
        RING_LEN - 1 - (self.ntu + RING_LEN - self.ntc) % RING_LEN
    }

    /// Queues one frame of `len` bytes held in `page` (already synced for
    /// the device); the device sees it at the next [`kick`](Self::kick).
    pub fn post(&mut self, page: Page, len: usize) -> Result<(), Page> {
        if self.free() == 0 {
            return Err(page);
        }
        let at = self.ntu * DESC_LEN;
        let cmd = TXD_CMD_EOP | TXD_CMD_IFCS | TXD_CMD_RS;
        self.ring.write_u64(at, page.dma_addr().0);
        self.ring
            .write_u64(at + 8, len as u64 | (u64::from(cmd) << 24));
        self.slots[self.ntu] = Some((page, len));
        self.ntu = (self.ntu + 1) % RING_LEN;
        self.stats.posted += 1;
        Ok(())
    }

    /// Tells the device about every posted frame.
    pub fn kick(&self, nic: &Nic) {
        nic.write(TDT, self.ntu as u32);
    }

    /// Recycles the pages of completed frames (DD written back, since every
    /// descriptor asks for it with RS) straight into the pool's cache.
    pub fn clean(&mut self, pool: &mut PagePool) -> usize {
        let mut done = 0;
        while self.ntc != self.ntu {
            let status = self.ring.read_u8(self.ntc * DESC_LEN + 12);
            if status & TXD_STAT_DD == 0 {
                break;
            }
            fence(Ordering::Acquire);
            let (page, len) = self.slots[self.ntc].take().expect("posted slot");
            self.stats.frames += 1;
            self.stats.bytes += len as u64;
            pool.recycle_direct(page);
            self.ntc = (self.ntc + 1) % RING_LEN;
            done += 1;
        }
        done
    }

    /// After DMA is stopped: takes back frames the device never sent.
    pub fn take_pending(&mut self) -> Vec<Page> {
        let mut pages = Vec::new();
        while self.ntc != self.ntu {
            if let Some((page, _)) = self.slots[self.ntc].take() {
                pages.push(page);
                self.stats.reclaimed += 1;
            }
            self.ntc = (self.ntc + 1) % RING_LEN;
        }
        pages
    }
}
