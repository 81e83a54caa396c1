//! Device interrupts delivered to an eventfd: the device request (the
//! kernel wants the device back) and the error interrupt (AER).
//!
//! When the kernel takes a vfio-pci device away (hot-unplug, `remove` or a
//! driver unbind in sysfs), vfio-pci does not tear it from under the user:
//! it signals the device request interrupt (`VFIO_PCI_REQ_IRQ_INDEX`) and
//! waits, logging "Relaying device request to user" every 10 s, until every
//! fd of the device is closed. [`VfioDevice::request_notifier`] arms that
//! interrupt with an eventfd of this module's [`DeviceNotifier`], which a
//! driver thread polls ([`DeviceNotifier::wait`]) or puts in its own poll
//! set ([`AsFd`]). Without it the kernel logs "No device request channel
//! registered, blocked until released by user" and waits anyway.
//!
//! Invariants: a [`DeviceNotifier`] owns its eventfd (non-blocking,
//! close-on-exec) and nothing else; in particular it does not hold the
//! device fd, so waiting on it never keeps the device open, and the device
//! can be closed while another thread waits. The kernel holds its own
//! reference to the eventfd while the trigger is armed and drops it when
//! the device fd is closed (or [`VfioDevice::disarm_irq`] runs), so
//! dropping the notifier first leaks nothing. Reading the eventfd makes no
//! VFIO call: the container's [`VfioStats`](super::VfioStats) do not move.

use core::time::Duration;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::time::Instant;

use super::device::VfioDevice;
use super::error::VfioError;
use super::ioctl::{errno, ioctl_ptr};
use super::sys;

/// VFIO interrupt index of the PCI error interrupt
/// (`VFIO_PCI_ERR_IRQ_INDEX`): signalled on an AER error the kernel
/// reports for the device. Present on PCI Express devices only.
pub const ERR_IRQ_INDEX: u32 = 3;
/// VFIO interrupt index of the device request (`VFIO_PCI_REQ_IRQ_INDEX`):
/// signalled when the kernel wants the device back.
pub const REQ_IRQ_INDEX: u32 = 4;

/// What `VFIO_DEVICE_GET_IRQ_INFO` says about one interrupt index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IrqInfo {
    /// The interrupt index.
    pub index: u32,
    /// `VFIO_IRQ_INFO_*` bits.
    pub flags: u32,
    /// How many interrupts of this kind the device has (0: none).
    pub count: u32,
}

impl IrqInfo {
    /// Whether the interrupt can signal an eventfd (`VFIO_IRQ_INFO_EVENTFD`).
    pub fn eventfd(&self) -> bool {
        self.flags & sys::IRQ_INFO_EVENTFD != 0
    }
}

/// An eventfd armed as the trigger of one device interrupt (the device
/// request or the error interrupt): poll it, or [`wait`](Self::wait) on it.
///
/// It does not keep the device open (see the module invariants): a thread
/// may wait on it while another closes the device, which is exactly what a
/// driver answering a device request does.
#[derive(Debug)]
pub struct DeviceNotifier {
    eventfd: OwnedFd,
    index: u32,
}

impl DeviceNotifier {
    /// A fresh non-blocking, close-on-exec eventfd, not armed yet.
    fn new(index: u32) -> Result<Self, VfioError> {
        // SAFETY: eventfd(2) takes no pointer; a new fd or -1 comes back.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(VfioError::Os {
                op: "eventfd",
                errno: errno(),
            });
        }
        Ok(Self {
            // SAFETY: `fd` was just returned by eventfd(2), owned by nobody else.
            eventfd: unsafe { OwnedFd::from_raw_fd(fd) },
            index,
        })
    }

    /// The interrupt index this notifier is armed for ([`REQ_IRQ_INDEX`]
    /// or [`ERR_IRQ_INDEX`]).
    pub fn index(&self) -> u32 {
        self.index
    }

    /// Takes the signals that arrived, without blocking: `Some(n)` with
    /// the number of signals since the last take, `None` if there was
    /// none.
    pub fn try_take(&self) -> Result<Option<u64>, VfioError> {
        let mut value = 0u64;
        // SAFETY: reads 8 bytes into `value`, which is 8 bytes and lives
        // across the call; the eventfd is open.
        let n = unsafe {
            libc::read(
                self.eventfd.as_raw_fd(),
                (&mut value as *mut u64).cast(),
                core::mem::size_of::<u64>(),
            )
        };
        if n == 8 {
            return Ok(Some(value));
        }
        match errno() {
            libc::EAGAIN | libc::EINTR if n < 0 => Ok(None),
            errno => Err(VfioError::Os {
                op: "read(eventfd)",
                errno: if n < 0 { errno } else { libc::EIO },
            }),
        }
    }

    /// Waits until the interrupt is signalled, or `timeout` passes (`None`:
    /// no limit). Returns what [`try_take`](Self::try_take) took: `Some(n)`
    /// signals, or `None` on timeout. Signals are counted, never lost: one
    /// that came before the call is returned at once.
    pub fn wait(&self, timeout: Option<Duration>) -> Result<Option<u64>, VfioError> {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            if let Some(n) = self.try_take()? {
                return Ok(Some(n));
            }
            let ms: libc::c_int = match deadline {
                None => -1,
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Ok(None);
                    }
                    // Round up, so a short wait is not a busy loop.
                    left.as_micros()
                        .div_ceil(1000)
                        .try_into()
                        .unwrap_or(libc::c_int::MAX)
                }
            };
            let mut pfd = libc::pollfd {
                fd: self.eventfd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid `pollfd`, living across the call.
            let n = unsafe { libc::poll(&mut pfd, 1, ms) };
            if n < 0 && errno() != libc::EINTR {
                return Err(VfioError::Os {
                    op: "poll(eventfd)",
                    errno: errno(),
                });
            }
        }
    }

    /// Signals the eventfd from user space, as the kernel would: for tests,
    /// or to wake a thread waiting on it when the driver stops for another
    /// reason.
    pub fn notify(&self) -> Result<(), VfioError> {
        let one = 1u64;
        // SAFETY: writes the 8 bytes of `one`, which lives across the call.
        let n = unsafe {
            libc::write(
                self.eventfd.as_raw_fd(),
                (&one as *const u64).cast(),
                core::mem::size_of::<u64>(),
            )
        };
        if n == 8 {
            Ok(())
        } else {
            Err(VfioError::Os {
                op: "write(eventfd)",
                errno: if n < 0 { errno() } else { libc::EIO },
            })
        }
    }
}

impl AsFd for DeviceNotifier {
    /// The eventfd, readable when the interrupt was signalled (for `poll`,
    /// `epoll` or an async reactor). Read it with
    /// [`try_take`](DeviceNotifier::try_take).
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.eventfd.as_fd()
    }
}

impl VfioDevice {
    /// `VFIO_DEVICE_GET_IRQ_INFO` for interrupt `index`. An index the
    /// device does not have fails with [`VfioError::NoSuchIrq`].
    pub fn irq_info(&self, index: u32) -> Result<IrqInfo, VfioError> {
        let mut info = sys::IrqInfo {
            argsz: sys::argsz::<sys::IrqInfo>(),
            index,
            ..Default::default()
        };
        // SAFETY: `info` is a writable `vfio_irq_info` with `argsz` set.
        unsafe {
            ioctl_ptr(
                self.dma().counters(),
                self.fd(),
                sys::DEVICE_GET_IRQ_INFO,
                &mut info,
            )
        }
        .map_err(irq_error("VFIO_DEVICE_GET_IRQ_INFO", index))?;
        Ok(IrqInfo {
            index,
            flags: info.flags,
            count: info.count,
        })
    }

    /// Arms the device request interrupt ([`REQ_IRQ_INDEX`]) with a new
    /// eventfd: the kernel signals it when it wants the device back
    /// (hot-unplug, `remove` or unbind in sysfs), and then waits until
    /// every fd of the device is closed ([`VfioDevice`], its
    /// [`MmioRegion`](super::MmioRegion)s, duplicates). Answer it by
    /// stopping the device's DMA, unbinding its pools
    /// ([`Device::unbind`](crate::Device::unbind)), freeing what the driver
    /// mapped itself, and dropping every handle on the device. Arming it
    /// again replaces the previous eventfd. A device without the request
    /// interrupt fails with [`VfioError::NoSuchIrq`].
    pub fn request_notifier(&self) -> Result<DeviceNotifier, VfioError> {
        self.arm_irq(REQ_IRQ_INDEX)
    }

    /// Arms the PCI error interrupt ([`ERR_IRQ_INDEX`]) with a new
    /// eventfd, where the device has one (`Ok(None)` if not: vfio-pci
    /// offers it on PCI Express devices only). The kernel signals it on an
    /// AER error it reports for the device.
    pub fn error_notifier(&self) -> Result<Option<DeviceNotifier>, VfioError> {
        match self.irq_info(ERR_IRQ_INDEX) {
            Ok(info) if info.count > 0 && info.eventfd() => self.arm_irq(ERR_IRQ_INDEX).map(Some),
            Ok(_) | Err(VfioError::NoSuchIrq { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Clears the eventfd trigger of interrupt `index` (`DATA_NONE`,
    /// count 0). Not needed before closing the device: the kernel clears
    /// the request and error triggers itself when the device fd closes.
    pub fn disarm_irq(&self, index: u32) -> Result<(), VfioError> {
        let mut set = sys::IrqSet {
            argsz: sys::argsz::<sys::IrqSet>(),
            flags: sys::IRQ_SET_DATA_NONE | sys::IRQ_SET_ACTION_TRIGGER,
            index,
            start: 0,
            count: 0,
        };
        // SAFETY: `set` is a complete `vfio_irq_set` with no data, `argsz`
        // its size; the kernel only reads it.
        unsafe {
            ioctl_ptr(
                self.dma().counters(),
                self.fd(),
                sys::DEVICE_SET_IRQS,
                &mut set,
            )
        }
        .map(drop)
        .map_err(irq_error("VFIO_DEVICE_SET_IRQS", index))
    }

    fn arm_irq(&self, index: u32) -> Result<DeviceNotifier, VfioError> {
        let info = self.irq_info(index)?;
        if info.count == 0 || !info.eventfd() {
            return Err(VfioError::NoSuchIrq { index });
        }
        let notifier = DeviceNotifier::new(index)?;
        let mut set = sys::IrqSetEventfd {
            argsz: sys::argsz::<sys::IrqSetEventfd>(),
            flags: sys::IRQ_SET_DATA_EVENTFD | sys::IRQ_SET_ACTION_TRIGGER,
            index,
            start: 0,
            count: 1,
            fd: notifier.eventfd.as_raw_fd(),
        };
        // SAFETY: `set` is a `vfio_irq_set` followed by its one eventfd,
        // `argsz` covering both; the kernel only reads it, and takes its
        // own reference to the eventfd.
        unsafe {
            ioctl_ptr(
                self.dma().counters(),
                self.fd(),
                sys::DEVICE_SET_IRQS,
                &mut set,
            )
        }
        .map_err(irq_error("VFIO_DEVICE_SET_IRQS", index))?;
        // The notifier's fd is dropped (closed) on every error path above.
        Ok(notifier)
    }
}

/// The error of an IRQ ioctl on `index`: `EINVAL` means the device has no
/// such interrupt; anything else is the operating system's.
fn irq_error(op: &'static str, index: u32) -> impl FnOnce(i32) -> VfioError {
    move |errno| match errno {
        libc::EINVAL => VfioError::NoSuchIrq { index },
        errno => VfioError::Os { op, errno },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_times_out_without_a_signal() {
        let n = DeviceNotifier::new(REQ_IRQ_INDEX).unwrap();
        assert_eq!(n.index(), REQ_IRQ_INDEX);
        let t = Instant::now();
        assert_eq!(n.wait(Some(Duration::from_millis(30))).unwrap(), None);
        assert!(t.elapsed() >= Duration::from_millis(30));
        assert_eq!(n.try_take().unwrap(), None);
    }

    #[test]
    fn signals_are_counted_and_taken_once() {
        let n = DeviceNotifier::new(REQ_IRQ_INDEX).unwrap();
        n.notify().unwrap();
        n.notify().unwrap();
        assert_eq!(n.wait(Some(Duration::ZERO)).unwrap(), Some(2));
        assert_eq!(n.try_take().unwrap(), None);
    }

    #[test]
    fn wait_wakes_when_another_thread_signals() {
        let n = std::sync::Arc::new(DeviceNotifier::new(ERR_IRQ_INDEX).unwrap());
        let waiter = {
            let n = std::sync::Arc::clone(&n);
            std::thread::spawn(move || n.wait(None))
        };
        std::thread::sleep(Duration::from_millis(20));
        n.notify().unwrap();
        assert_eq!(waiter.join().unwrap().unwrap(), Some(1));
    }

    #[test]
    fn the_eventfd_is_closed_on_drop_and_pollable() {
        let n = DeviceNotifier::new(REQ_IRQ_INDEX).unwrap();
        let raw = n.as_fd().as_raw_fd();
        // SAFETY: F_GETFD reads no memory.
        let flags = unsafe { libc::fcntl(raw, libc::F_GETFD) };
        assert_eq!(flags & libc::FD_CLOEXEC, libc::FD_CLOEXEC);
        // SAFETY: as above.
        let status = unsafe { libc::fcntl(raw, libc::F_GETFL) };
        assert_eq!(status & libc::O_NONBLOCK, libc::O_NONBLOCK);
        n.notify().unwrap();
        let mut pfd = libc::pollfd {
            fd: n.as_fd().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the call.
        assert_eq!(unsafe { libc::poll(&mut pfd, 1, 0) }, 1);
        drop(n);
        // The number is free again (unless another test thread took it in
        // between, which would show as a different kind of file).
        let link = std::fs::read_link(format!("/proc/self/fd/{raw}"));
        assert!(
            link.as_ref()
                .map_or(true, |l| !l.to_string_lossy().contains("eventfd")),
            "fd {raw} still an eventfd after the drop: {link:?}"
        );
    }

    #[test]
    fn irq_info_flags() {
        let info = IrqInfo {
            index: REQ_IRQ_INDEX,
            flags: sys::IRQ_INFO_EVENTFD,
            count: 1,
        };
        assert!(info.eventfd());
        assert!(!IrqInfo { flags: 0, ..info }.eventfd());
    }
}
