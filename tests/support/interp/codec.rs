//! Bytes to a run and back: [`decode`] reads fuzzer input and seed files,
//! [`encode`] writes seed files and regression inputs.
//!
//! Invariants: every byte string decodes to something runnable; op codes
//! are only ever appended (the modulus grows), so committed seeds and
//! regressions decode as they did when they were written; `encode` is the
//! inverse of `decode` up to the modulo reductions.

use pagepool::{DmaDirection, FRAG_ALIGN, PAGE_SIZE};

use super::ops::{Callback, Config, How, Op, PoolCfg, UnbindHow};
use super::{MAX_OPS, POOLS};

struct Cursor<'a> {
    data: &'a [u8],
    pos: usize,
}

impl Cursor<'_> {
    fn byte(&mut self) -> u8 {
        let b = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        b
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.byte(), self.byte()])
    }
    fn done(&self) -> bool {
        self.pos >= self.data.len()
    }
}

fn direction_from(b: u8) -> DmaDirection {
    match b % 3 {
        0 => DmaDirection::FromDevice,
        1 => DmaDirection::Bidirectional,
        _ => DmaDirection::ToDevice,
    }
}

fn direction_code(d: DmaDirection) -> u8 {
    match d {
        DmaDirection::FromDevice => 0,
        DmaDirection::Bidirectional => 1,
        DmaDirection::ToDevice => 2,
    }
}

fn how_from(b: u8) -> How {
    match b % 4 {
        0 => How::Here,
        1 => How::Spawned,
        2 => How::Worker,
        _ => How::Bulk,
    }
}

fn how_code(h: How) -> u8 {
    match h {
        How::Here => 0,
        How::Spawned => 1,
        How::Worker => 2,
        How::Bulk => 3,
    }
}

/// Builds a valid pool configuration from any four bytes.
pub fn pool_cfg_from(b: [u8; 4]) -> PoolCfg {
    let order = u32::from(b[0] & 1);
    let page_len = PAGE_SIZE << order;
    let direction = direction_from((b[0] >> 1) & 3);
    let cache_size = 1 + usize::from(b[1] & 7);
    let refill_batch = 1 + usize::from(b[1] >> 3) % cache_size;
    let ring_size = 1 + usize::from(b[2] & 7);
    let sync = (b[0] & 0x80 != 0).then(|| {
        let max_len = 1 + (usize::from(b[3]) * 61) % page_len;
        let offset = (usize::from(b[2] >> 3) * FRAG_ALIGN) % (page_len - max_len + 1);
        (offset, max_len)
    });
    PoolCfg {
        order,
        cache_size,
        refill_batch,
        ring_size,
        direction,
        sync,
    }
}

/// Decodes fuzzer input: byte 0 chooses the mode (bit 0: real threads),
/// then 4 bytes per pool slot ([`pool_cfg_from`]), then ops (one tag byte
/// and its fields each) until the input or [`MAX_OPS`] runs out. Every
/// input decodes to something runnable.
///
/// Ops, by `tag % 20` (fields one byte each unless marked u16, little
/// endian): 0 `Alloc` t; 1 `AllocFrag` t size:u16; 2 `RecycleDirect` t
/// item; 3 `Drop` t item how; 4 `Send` t item to; 5 `PutBulk` t n;
/// 6 `FillRing` t extra how; 7 `Sync` t item start:u16 len:u16 tag (bit 0:
/// to_device); 8 `SyncOutOfRange` t item past:u16; 9 `Check` t item;
/// 10 `SetDirtyLen` t item len:u16; 11 `IntoBytes` t item; 12 `CloneBytes`
/// t item; 13 `DropPool` t; 14 `NewPool` t; 15 `Unbind` how; 16 `FailMaps`
/// n; 17 `FailPageAllocs` n; 18 `ArmPanic` at; 19 `ArmDrop` t item at.
/// `at % 7` names the [`Callback`]: 0 map, 1 unmap_batch, 2
/// sync_for_device, 3 sync_for_cpu, 4 on_unbind, 5 alloc_pages,
/// 6 free_pages.
// `tests/state_machine.rs` generates its ops instead of decoding them.
#[allow(dead_code)]
pub fn decode(data: &[u8]) -> (Config, bool, Vec<Op>) {
    let mut c = Cursor { data, pos: 0 };
    let threaded = c.byte() & 1 == 1;
    let pools = [0; POOLS].map(|_| pool_cfg_from([c.byte(), c.byte(), c.byte(), c.byte()]));
    let mut ops = Vec::new();
    while !c.done() && ops.len() < MAX_OPS {
        let tag = c.byte();
        // New op codes are appended (the modulus grows), so inputs written
        // for fewer ops decode as before.
        let op = match tag % 20 {
            0 => Op::Alloc { t: c.byte() },
            1 => Op::AllocFrag {
                t: c.byte(),
                size: c.u16(),
            },
            2 => Op::RecycleDirect {
                t: c.byte(),
                item: c.byte(),
            },
            3 => Op::Drop {
                t: c.byte(),
                item: c.byte(),
                how: how_from(c.byte()),
            },
            4 => Op::Send {
                t: c.byte(),
                item: c.byte(),
                to: c.byte(),
            },
            5 => Op::PutBulk {
                t: c.byte(),
                n: c.byte(),
            },
            6 => Op::FillRing {
                t: c.byte(),
                extra: c.byte(),
                how: how_from(c.byte()),
            },
            7 => {
                let (t, item) = (c.byte(), c.byte());
                let (start, len) = (c.u16(), c.u16());
                let tag = c.byte();
                Op::Sync {
                    t,
                    item,
                    start,
                    len,
                    to_device: tag & 1 == 1,
                    tag,
                }
            }
            8 => Op::SyncOutOfRange {
                t: c.byte(),
                item: c.byte(),
                past: c.u16(),
            },
            9 => Op::Check {
                t: c.byte(),
                item: c.byte(),
            },
            10 => Op::SetDirtyLen {
                t: c.byte(),
                item: c.byte(),
                len: c.u16(),
            },
            11 => Op::IntoBytes {
                t: c.byte(),
                item: c.byte(),
            },
            12 => Op::CloneBytes {
                t: c.byte(),
                item: c.byte(),
            },
            13 => Op::DropPool { t: c.byte() },
            14 => Op::NewPool { t: c.byte() },
            15 => Op::Unbind {
                how: match c.byte() % 3 {
                    0 => UnbindHow::Call,
                    1 => UnbindHow::OtherThread,
                    _ => UnbindHow::DropDevice,
                },
            },
            16 => Op::FailMaps { n: c.byte() },
            17 => Op::FailPageAllocs { n: c.byte() },
            18 => Op::ArmPanic {
                at: Callback::from_byte(c.byte()),
            },
            _ => Op::ArmDrop {
                t: c.byte(),
                item: c.byte(),
                at: Callback::from_byte(c.byte()),
            },
        };
        ops.push(op);
    }
    (Config { pools }, threaded, ops)
}

/// The inverse of [`decode`] (up to the modulo reductions): writes seed
/// files and regression inputs.
// Only `tests/fuzz_replay.rs` writes inputs; the other includers read them.
#[allow(dead_code)]
pub fn encode(config: &Config, threaded: bool, ops: &[Op]) -> Vec<u8> {
    let mut out = vec![u8::from(threaded)];
    for p in &config.pools {
        let (offset, max_len) = p.sync.unwrap_or((0, 1));
        // max_len = 1 + (b3 * 61) % page_len: find a b3 that gives it back,
        // else the nearest the encoding can say.
        let page_len = p.page_len();
        let b3 = (0..=255u8)
            .find(|&b| 1 + (usize::from(b) * 61) % page_len == max_len)
            .unwrap_or(0);
        let max_len = 1 + (usize::from(b3) * 61) % page_len;
        let b2hi = (0..32u8)
            .find(|&b| (usize::from(b) * FRAG_ALIGN) % (page_len - max_len + 1) == offset)
            .unwrap_or(0);
        let b0 = (p.order as u8 & 1)
            | (direction_code(p.direction) << 1)
            | if p.sync.is_some() { 0x80 } else { 0 };
        let b1 = ((p.cache_size - 1) as u8 & 7) | (((p.refill_batch - 1) as u8) << 3);
        let b2 = ((p.ring_size - 1) as u8 & 7) | (b2hi << 3);
        out.extend([b0, b1, b2, b3]);
    }
    for op in ops {
        match *op {
            Op::Alloc { t } => out.extend([0, t]),
            Op::AllocFrag { t, size } => {
                out.extend([1, t]);
                out.extend(size.to_le_bytes());
            }
            Op::RecycleDirect { t, item } => out.extend([2, t, item]),
            Op::Drop { t, item, how } => out.extend([3, t, item, how_code(how)]),
            Op::Send { t, item, to } => out.extend([4, t, item, to]),
            Op::PutBulk { t, n } => out.extend([5, t, n]),
            Op::FillRing { t, extra, how } => out.extend([6, t, extra, how_code(how)]),
            Op::Sync {
                t,
                item,
                start,
                len,
                tag,
                to_device,
            } => {
                out.extend([7, t, item]);
                out.extend(start.to_le_bytes());
                out.extend(len.to_le_bytes());
                out.push((tag & !1) | u8::from(to_device));
            }
            Op::SyncOutOfRange { t, item, past } => {
                out.extend([8, t, item]);
                out.extend(past.to_le_bytes());
            }
            Op::Check { t, item } => out.extend([9, t, item]),
            Op::SetDirtyLen { t, item, len } => {
                out.extend([10, t, item]);
                out.extend(len.to_le_bytes());
            }
            Op::IntoBytes { t, item } => out.extend([11, t, item]),
            Op::CloneBytes { t, item } => out.extend([12, t, item]),
            Op::DropPool { t } => out.extend([13, t]),
            Op::NewPool { t } => out.extend([14, t]),
            Op::Unbind { how } => out.extend([
                15,
                match how {
                    UnbindHow::Call => 0,
                    UnbindHow::OtherThread => 1,
                    UnbindHow::DropDevice => 2,
                },
            ]),
            Op::FailMaps { n } => out.extend([16, n]),
            Op::FailPageAllocs { n } => out.extend([17, n]),
            Op::ArmPanic { at } => out.extend([18, at.code()]),
            Op::ArmDrop { t, item, at } => out.extend([19, t, item, at.code()]),
        }
    }
    out
}
