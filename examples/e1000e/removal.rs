//! Removal driven by the kernel: the device request, and what the driver
//! measures around it.
//!
//! - [`RequestWatch`]: a thread waiting on the VFIO device request
//!   ([`VfioDevice::request_notifier`]); when it fires, it notes the time and
//!   raises a flag the poll loop checks. It holds no handle on the device,
//!   so the device can be closed while it waits.
//! - [`CountedDma`]: the [`DmaOps`] the pools use, counting every call, so
//!   "no device call after unbind returned" is checked even after the
//!   container was closed.
//! - [`RemovalKind`]: how the kernel takes the device (sysfs `remove`,
//!   unbind from vfio-pci, PCIe hot-unplug), and how to see that it has
//!   finished.

use std::path::Path;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, sleep, JoinHandle};
use std::time::{Duration, Instant};

use pagepool::vfio::{DeviceNotifier, VfioDevice, VfioDma, VfioError};
use pagepool::{DmaAddr, DmaDirection, DmaError, DmaMapping, DmaOps, UnmapBatchError, UnmapError};

/// How the kernel takes the device back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RemovalKind {
    /// `echo 1 > /sys/bus/pci/devices/<bdf>/remove`: the device goes.
    Remove,
    /// Unbound from vfio-pci in sysfs: the device stays, driverless.
    Unbind,
    /// PCIe hot-unplug (attention button, pciehp): the device goes.
    Unplug,
}

impl std::str::FromStr for RemovalKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "remove" => Ok(Self::Remove),
            "unbind" => Ok(Self::Unbind),
            "unplug" => Ok(Self::Unplug),
            _ => Err(format!("removal kind {s}: remove, unbind or unplug")),
        }
    }
}

impl RemovalKind {
    /// Whether the kernel has finished: the device gone from sysfs, or
    /// (unbind) without a driver.
    pub fn done(self, bdf: &str) -> bool {
        let dev = format!("/sys/bus/pci/devices/{bdf}");
        match self {
            Self::Remove | Self::Unplug => !Path::new(&dev).exists(),
            Self::Unbind => !Path::new(&format!("{dev}/driver")).exists(),
        }
    }

    /// Polls [`done`](Self::done) every millisecond, at most `bound`: the
    /// time it took, from `since`, or `None`.
    pub fn wait_done(self, bdf: &str, since: Instant, bound: Duration) -> Option<Duration> {
        loop {
            if self.done(bdf) {
                return Some(since.elapsed());
            }
            if since.elapsed() > bound {
                return None;
            }
            sleep(Duration::from_millis(1));
        }
    }
}

/// The device request, watched by a thread of its own.
pub struct RequestWatch {
    fired: Arc<AtomicBool>,
    at: Arc<Mutex<Option<(Instant, u64)>>>,
    notifier: Arc<DeviceNotifier>,
    thread: Option<JoinHandle<Result<(), VfioError>>>,
    stop: Arc<AtomicBool>,
}

impl RequestWatch {
    /// Arms the device request on `dev` and starts the watching thread.
    pub fn start(dev: &VfioDevice) -> Result<Self, VfioError> {
        let notifier = Arc::new(dev.request_notifier()?);
        let fired = Arc::new(AtomicBool::new(false));
        let at = Arc::new(Mutex::new(None));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (notifier, fired, at, stop) = (
                Arc::clone(&notifier),
                Arc::clone(&fired),
                Arc::clone(&at),
                Arc::clone(&stop),
            );
            thread::Builder::new()
                .name("device-request".into())
                .spawn(move || {
                    while !stop.load(Ordering::Acquire) {
                        if let Some(n) = notifier.wait(None)? {
                            if stop.load(Ordering::Acquire) {
                                break;
                            }
                            *at.lock().unwrap() = Some((Instant::now(), n));
                            fired.store(true, Ordering::Release);
                            println!(
                                "e1000e: removal: device request received (eventfd fired, {n} \
                                 signal(s))"
                            );
                            break;
                        }
                    }
                    Ok(())
                })
                .expect("spawn the device-request thread")
        };
        Ok(Self {
            fired,
            at,
            notifier,
            thread: Some(thread),
            stop,
        })
    }

    /// Whether the kernel asked for the device.
    pub fn fired(&self) -> bool {
        self.fired.load(Ordering::Acquire)
    }

    /// When the eventfd fired, and how many signals it carried.
    pub fn fired_at(&self) -> Option<(Instant, u64)> {
        *self.at.lock().unwrap()
    }

    /// Signals the kernel sent after the first (it repeats every 10 s while
    /// the device stays open).
    pub fn later_signals(&self) -> u64 {
        self.notifier.try_take().ok().flatten().unwrap_or(0)
    }

    /// Stops the thread (waking it if the request never came).
    pub fn stop(mut self) -> Result<(), VfioError> {
        self.stop.store(true, Ordering::Release);
        if !self.fired() {
            self.notifier.notify()?;
        }
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(result)) => result,
            Some(Err(_)) => Err(VfioError::Os {
                op: "device-request thread panicked",
                errno: 0,
            }),
            None => Ok(()),
        }
    }
}

/// [`VfioDma`] with every [`DmaOps`] call counted.
pub struct CountedDma {
    inner: VfioDma,
    calls: Arc<AtomicU64>,
}

impl CountedDma {
    pub fn new(inner: VfioDma) -> (Self, Arc<AtomicU64>) {
        let calls = Arc::new(AtomicU64::new(0));
        (
            Self {
                inner,
                calls: Arc::clone(&calls),
            },
            calls,
        )
    }

    fn count(&self) {
        self.calls.fetch_add(1, Ordering::SeqCst);
    }
}

impl DmaOps for CountedDma {
    unsafe fn map(
        &self,
        cpu: NonNull<u8>,
        len: usize,
        direction: DmaDirection,
    ) -> Result<DmaAddr, DmaError> {
        self.count();
        // SAFETY: forwarded with the caller's own contract.
        unsafe { self.inner.map(cpu, len, direction) }
    }

    unsafe fn unmap(&self, mapping: DmaMapping) -> Result<(), UnmapError> {
        self.count();
        // SAFETY: forwarded with the caller's own contract.
        unsafe { self.inner.unmap(mapping) }
    }

    unsafe fn unmap_batch(&self, mappings: &[DmaMapping]) -> Result<(), UnmapBatchError> {
        self.count();
        // SAFETY: forwarded with the caller's own contract.
        unsafe { self.inner.unmap_batch(mappings) }
    }

    unsafe fn sync_for_device(&self, mapping: DmaMapping, offset: usize, len: usize) {
        self.count();
        // SAFETY: forwarded with the caller's own contract.
        unsafe { self.inner.sync_for_device(mapping, offset, len) }
    }

    unsafe fn sync_for_cpu(&self, mapping: DmaMapping, offset: usize, len: usize) {
        self.count();
        // SAFETY: forwarded with the caller's own contract.
        unsafe { self.inner.sync_for_cpu(mapping, offset, len) }
    }

    fn needs_sync(&self) -> bool {
        self.inner.needs_sync()
    }

    fn min_page_size(&self) -> Option<usize> {
        self.inner.min_page_size()
    }

    fn on_unbind(&self) {
        self.count();
        self.inner.on_unbind()
    }
}
