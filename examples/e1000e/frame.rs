//! Frame contents: building the frames this driver transmits, and checking
//! the frames it receives from the guest kernel's NIC.

use std::fmt;

/// An Ethernet MAC address.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Mac(pub [u8; 6]);

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl std::str::FromStr for Mac {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.trim().split(':').collect();
        if parts.len() != 6 {
            return Err(format!("bad MAC address {s:?}"));
        }
        let mut mac = [0; 6];
        for (byte, part) in mac.iter_mut().zip(parts) {
            *byte = u8::from_str_radix(part, 16).map_err(|_| format!("bad MAC address {s:?}"))?;
        }
        Ok(Mac(mac))
    }
}

pub const BROADCAST: Mac = Mac([0xff; 6]);
/// IEEE 802 "local experimental" EtherType: nobody's protocol, so the
/// receiving kernel counts the frames and drops them quietly.
pub const TX_ETHERTYPE: u16 = 0x88B5;
/// What every transmitted frame carries after its Ethernet header.
pub const TX_MAGIC: &[u8; 16] = b"PAGEPOOL-E1000E\0";
pub const ETH_HLEN: usize = 14;
pub const ETH_MIN: usize = 60;
pub const ETH_MAX: usize = 1514;
const ETHERTYPE_IPV6: u16 = 0x86DD;
const IPV6_HLEN: usize = 40;
const NEXT_HOP_BY_HOP: u8 = 0;
const NEXT_ICMPV6: u8 = 58;
const ICMPV6_ECHO_REQUEST: u8 = 128;

/// Length of transmitted frame `seq`: every size from 60 to 1514 bytes
/// comes up.
pub fn tx_len(seq: u64) -> usize {
    ETH_MIN + (seq as usize * 149) % (ETH_MAX - ETH_MIN + 1)
}

/// Writes transmitted frame `seq` into `buf`: broadcast, from `src`, the
/// experimental EtherType, the magic, the sequence number, then bytes that
/// count on from it. Returns its length.
pub fn build_tx(buf: &mut [u8], src: Mac, seq: u64) -> usize {
    let len = tx_len(seq);
    let frame = &mut buf[..len];
    frame[0..6].copy_from_slice(&BROADCAST.0);
    frame[6..12].copy_from_slice(&src.0);
    frame[12..14].copy_from_slice(&TX_ETHERTYPE.to_be_bytes());
    frame[14..30].copy_from_slice(TX_MAGIC);
    frame[30..38].copy_from_slice(&seq.to_le_bytes());
    for (i, b) in frame[38..].iter_mut().enumerate() {
        *b = (seq as u8).wrapping_add(i as u8);
    }
    len
}

/// What the receive side expects from the peer (the guest kernel's NIC).
#[derive(Clone, Copy)]
pub struct Expect {
    /// The peer's MAC: every frame must come from it.
    pub peer: Option<Mac>,
    /// The byte `ping -p` fills echo requests with, if known.
    pub echo_pattern: Option<u8>,
}

/// What a received frame turned out to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RxKind {
    /// ICMPv6 echo request (ping to ff02::1): checksum and payload checked.
    EchoRequest,
    /// Other ICMPv6 (MLD reports, neighbour/router solicitations): checksum
    /// checked.
    OtherIcmpv6,
    /// IPv6, another upper layer: header and length checked.
    OtherIpv6,
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// The Internet checksum of the ICMPv6 message `msg` with its IPv6
/// pseudo-header; 0 when the message's checksum field is right.
fn icmpv6_checksum(src: &[u8], dst: &[u8], msg: &[u8]) -> u16 {
    let mut sum: u64 = 0;
    let mut add = |bytes: &[u8]| {
        for pair in bytes.chunks(2) {
            let word = if pair.len() == 2 {
                u16::from_be_bytes([pair[0], pair[1]])
            } else {
                u16::from_be_bytes([pair[0], 0])
            };
            sum += u64::from(word);
        }
    };
    add(src);
    add(dst);
    add(&(msg.len() as u32).to_be_bytes());
    add(&[0, 0, 0, NEXT_ICMPV6]);
    add(msg);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Checks a received frame: an IPv6 multicast frame (dst 33:33:..) from the
/// peer, whose lengths agree and whose ICMPv6 checksum (over every byte of
/// the message) is right; echo requests must carry the ping pattern.
pub fn check_rx(frame: &[u8], expect: &Expect) -> Result<RxKind, String> {
    if frame.len() < ETH_HLEN + IPV6_HLEN {
        return Err(format!("{} bytes: too short for IPv6", frame.len()));
    }
    if frame[0..2] != [0x33, 0x33] {
        return Err(format!(
            "dst {} is not an IPv6 multicast MAC",
            Mac(frame[0..6].try_into().unwrap())
        ));
    }
    let src = Mac(frame[6..12].try_into().unwrap());
    if let Some(peer) = expect.peer {
        if src != peer {
            return Err(format!("src {src}, expected the peer {peer}"));
        }
    }
    let ethertype = be16(frame, 12);
    if ethertype != ETHERTYPE_IPV6 {
        return Err(format!("ethertype {ethertype:#06x}, expected IPv6"));
    }
    let ip = &frame[ETH_HLEN..];
    if ip[0] >> 4 != 6 {
        return Err(format!("IP version {}", ip[0] >> 4));
    }
    let payload_len = usize::from(be16(ip, 4));
    if ETH_HLEN + IPV6_HLEN + payload_len != frame.len() {
        return Err(format!(
            "frame of {} bytes, IPv6 payload length {payload_len}",
            frame.len()
        ));
    }
    if ip[24] != 0xff {
        return Err("IPv6 destination is not multicast".into());
    }
    // RFC 2464: the MAC of an IPv6 multicast is 33:33 and the address's
    // last four bytes.
    if frame[2..6] != ip[36..40] {
        return Err(format!(
            "dst {} does not match the IPv6 multicast destination",
            Mac(frame[0..6].try_into().unwrap())
        ));
    }
    let (src_ip, dst_ip) = (&ip[8..24], &ip[24..40]);
    let mut next = ip[6];
    let mut upper = &ip[IPV6_HLEN..];
    if next == NEXT_HOP_BY_HOP {
        // MLD reports carry a router-alert option first.
        if upper.len() < 8 {
            return Err("truncated hop-by-hop header".into());
        }
        let ext_len = (usize::from(upper[1]) + 1) * 8;
        if upper.len() < ext_len {
            return Err("truncated hop-by-hop header".into());
        }
        next = upper[0];
        upper = &upper[ext_len..];
    }
    if next != NEXT_ICMPV6 {
        return Ok(RxKind::OtherIpv6);
    }
    if upper.len() < 4 {
        return Err("truncated ICMPv6 message".into());
    }
    let sum = icmpv6_checksum(src_ip, dst_ip, upper);
    if sum != 0 {
        return Err(format!(
            "ICMPv6 type {} checksum wrong (residue {sum:#06x})",
            upper[0]
        ));
    }
    if upper[0] != ICMPV6_ECHO_REQUEST {
        return Ok(RxKind::OtherIcmpv6);
    }
    // Echo request: type, code, checksum, id, sequence (8 bytes), a 4-byte
    // timestamp, then the pattern.
    if let Some(pattern) = expect.echo_pattern {
        if let Some(at) = upper.iter().skip(12).position(|&b| b != pattern) {
            return Err(format!(
                "echo request payload byte {} is {:#04x}, expected {pattern:#04x}",
                12 + at,
                upper[12 + at]
            ));
        }
    }
    Ok(RxKind::EchoRequest)
}

/// FNV-1a, to notice any later change to a held frame.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An ICMPv6 echo request to ff02::1 as `ping -6 -p a5 -s 56` sends it.
    fn echo_frame(peer: Mac) -> Vec<u8> {
        let mut icmp = vec![ICMPV6_ECHO_REQUEST, 0, 0, 0, 0x12, 0x34, 0, 7];
        icmp.extend([1, 2, 3, 4]); // timestamp
        icmp.extend([0xa5; 52]);
        let src = [
            0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0x50, 0x54, 0, 0xff, 0xfe, 0x12, 0x34, 0x56,
        ];
        let mut dst = [0u8; 16];
        dst[0] = 0xff;
        dst[1] = 0x02;
        dst[15] = 1;
        let sum = icmpv6_checksum(&src, &dst, &icmp);
        icmp[2..4].copy_from_slice(&sum.to_be_bytes());
        let mut frame = vec![0x33, 0x33, 0, 0, 0, 1];
        frame.extend(peer.0);
        frame.extend(0x86DDu16.to_be_bytes());
        frame.extend([0x60, 0, 0, 0]);
        frame.extend((icmp.len() as u16).to_be_bytes());
        frame.extend([NEXT_ICMPV6, 1]);
        frame.extend(src);
        frame.extend(dst);
        frame.extend(icmp);
        frame
    }

    #[test]
    fn a_good_echo_request_passes_and_a_flipped_byte_never_does() {
        let peer = Mac([0x52, 0x54, 0, 0x12, 0x34, 0x56]);
        let expect = Expect {
            peer: Some(peer),
            echo_pattern: Some(0xa5),
        };
        let frame = echo_frame(peer);
        assert_eq!(check_rx(&frame, &expect), Ok(RxKind::EchoRequest));
        // Every byte but the traffic class and flow label (no check covers
        // them) and the hop limit.
        for i in (0..frame.len()).filter(|i| !(15..18).contains(i) && *i != 21) {
            let mut bad = frame.clone();
            bad[i] ^= 0x10;
            assert_ne!(
                check_rx(&bad, &expect),
                Ok(RxKind::EchoRequest),
                "byte {i} flipped"
            );
        }
        let other = Expect {
            peer: Some(Mac([2, 0, 0, 0, 0, 1])),
            echo_pattern: None,
        };
        assert!(check_rx(&frame, &other).is_err(), "wrong source");
    }

    #[test]
    fn tx_frames_are_built_as_described() {
        let mut buf = [0u8; ETH_MAX];
        let src = Mac([0x52, 0x54, 0, 0x12, 0x34, 0x57]);
        let len = build_tx(&mut buf, src, 3);
        assert_eq!(len, tx_len(3));
        assert_eq!(buf[0..6], BROADCAST.0);
        assert_eq!(buf[6..12], src.0);
        assert_eq!(buf[12..14], TX_ETHERTYPE.to_be_bytes());
        assert_eq!(&buf[14..30], TX_MAGIC);
        assert_eq!(buf[30..38], 3u64.to_le_bytes());
        assert_eq!("52:54:00:12:34:57".parse::<Mac>().unwrap().0, src.0);
    }

    #[test]
    fn tx_frames_cover_every_size() {
        let sizes: std::collections::HashSet<usize> = (0..1455).map(tx_len).collect();
        assert_eq!(sizes.len(), ETH_MAX - ETH_MIN + 1);
    }
}
