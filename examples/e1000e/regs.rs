//! The 82574 (QEMU's `e1000e`) registers and descriptor fields this driver
//! uses: byte offsets into BAR0 and bit masks. Names follow the datasheet
//! and Linux's `drivers/net/ethernet/intel/e1000e`.

/// Device Control.
pub const CTRL: usize = 0x0000;
/// Set Link Up.
pub const CTRL_SLU: u32 = 1 << 6;
/// Device reset (self-clearing).
pub const CTRL_RST: u32 = 1 << 26;

/// Device Status.
pub const STATUS: usize = 0x0008;
/// Link up.
pub const STATUS_LU: u32 = 1 << 1;

/// Interrupt Cause Read (read to clear).
pub const ICR: usize = 0x00C0;
/// Interrupt Mask Clear: a 1 bit masks that cause.
pub const IMC: usize = 0x00D8;

/// Receive Control.
pub const RCTL: usize = 0x0100;
/// Receiver enable.
pub const RCTL_EN: u32 = 1 << 1;
/// Unicast promiscuous.
pub const RCTL_UPE: u32 = 1 << 3;
/// Multicast promiscuous.
pub const RCTL_MPE: u32 = 1 << 4;
/// Accept broadcast.
pub const RCTL_BAM: u32 = 1 << 15;
/// Strip the Ethernet CRC: the length written back is the frame's.
pub const RCTL_SECRC: u32 = 1 << 26;
// BSIZE (bits 16-17) = 0 with BSEX = 0: 2048-byte receive buffers.

/// Transmit Control.
pub const TCTL: usize = 0x0400;
/// Transmitter enable.
pub const TCTL_EN: u32 = 1 << 1;
/// Pad short packets to 64 bytes.
pub const TCTL_PSP: u32 = 1 << 3;
/// Collision threshold (bits 4-11), the datasheet's recommended 15.
pub const TCTL_CT: u32 = 0x0F << 4;
/// Collision distance (bits 12-21), 63 for full duplex.
pub const TCTL_COLD: u32 = 0x3F << 12;
/// Transmit inter-packet gap.
pub const TIPG: usize = 0x0410;
/// The TIPG value Linux's e1000e programs for copper links.
pub const TIPG_DEFAULT: u32 = 8 | (8 << 10) | (6 << 20);

/// Receive descriptor ring: base low/high, length in bytes, head, tail.
pub const RDBAL: usize = 0x2800;
pub const RDBAH: usize = 0x2804;
pub const RDLEN: usize = 0x2808;
pub const RDH: usize = 0x2810;
pub const RDT: usize = 0x2818;

/// Receive descriptor ring of queue 1 (the 82574's second queue).
pub const RDBAL1: usize = 0x2900;
pub const RDBAH1: usize = 0x2904;
pub const RDLEN1: usize = 0x2908;
pub const RDH1: usize = 0x2910;
pub const RDT1: usize = 0x2918;

/// Receive Checksum Control; Packet Checksum Disable, which RSS needs (the
/// descriptor's checksum field then carries the RSS hash).
pub const RXCSUM: usize = 0x5000;
pub const RXCSUM_PCSD: u32 = 1 << 13;
/// Receive Filter Control; Extended Status Enable: extended receive
/// descriptors, which RSS needs.
pub const RFCTL: usize = 0x5008;
pub const RFCTL_EXTEN: u32 = 1 << 15;
/// Multiple Receive Queues Command: bits 0-1 = 01 enable RSS; the hash
/// fields: IPv4 with TCP, IPv4, IPv6 with TCP, IPv6.
pub const MRQC: usize = 0x5818;
pub const MRQC_RSS: u32 = 1;
pub const MRQC_TCP_IPV4: u32 = 1 << 16;
pub const MRQC_IPV4: u32 = 1 << 17;
pub const MRQC_TCP_IPV6: u32 = 1 << 18;
pub const MRQC_IPV6: u32 = 1 << 20;
/// Redirection table: 128 one-byte entries (32 registers); bit 7 of the
/// entry picked by the hash's low 7 bits is the queue.
pub const RETA: usize = 0x5C00;
/// RSS random key: 40 bytes (10 registers).
pub const RSSRK: usize = 0x5C80;

/// Extended RX descriptor write-back: status/errors word at byte 8 (DD and
/// EOP as in the legacy one, frame errors in bits 24-31), length at byte
/// 12, RSS type (bits 0-3) at byte 0, RSS hash at byte 4.
pub const RXDEXT_ERR_FRAME: u32 = 0x9700_0000;

/// Transmit descriptor ring: base low/high, length in bytes, head, tail.
pub const TDBAL: usize = 0x3800;
pub const TDBAH: usize = 0x3804;
pub const TDLEN: usize = 0x3808;
pub const TDH: usize = 0x3810;
pub const TDT: usize = 0x3818;

/// Statistics (read to clear): total packets received, total packets
/// transmitted.
pub const TPR: usize = 0x40D0;
pub const TPT: usize = 0x40D4;

/// Receive Address 0, low and high: the MAC address the EEPROM loaded.
pub const RAL0: usize = 0x5400;
pub const RAH0: usize = 0x5404;

/// Size of one legacy descriptor, receive or transmit.
pub const DESC_LEN: usize = 16;

/// Legacy RX descriptor status: descriptor done, end of packet.
pub const RXD_STAT_DD: u8 = 1 << 0;
pub const RXD_STAT_EOP: u8 = 1 << 1;

/// Legacy TX descriptor command: end of packet, insert FCS, report status.
pub const TXD_CMD_EOP: u8 = 1 << 0;
pub const TXD_CMD_IFCS: u8 = 1 << 1;
pub const TXD_CMD_RS: u8 = 1 << 3;
/// Legacy TX descriptor status: descriptor done.
pub const TXD_STAT_DD: u8 = 1 << 0;

/// The receive buffer size programmed in RCTL (BSIZE 0).
pub const RX_BUF_LEN: usize = 2048;
