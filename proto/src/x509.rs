//! The two facts a pinning client needs from an X.509 certificate, read straight from the DER
//! (RFC 5280 §4.1) without a full X.509 parser: the SubjectPublicKeyInfo (what an SPKI pin
//! hashes, as in RFC 7469 §2.4) and the validity period (checked in pinned mode, where no
//! chain is built). Peer input: every length is checked, nothing panics.

use sha2::{Digest, Sha256};

/// A DER element: tag and contents, plus the whole encoding (header included).
struct Tlv<'a> {
    tag: u8,
    contents: &'a [u8],
    whole: &'a [u8],
}

/// Reads one DER element from the front of `buf`; returns it and the rest.
fn tlv(buf: &[u8]) -> Option<(Tlv<'_>, &[u8])> {
    let tag = *buf.first()?;
    let first = *buf.get(1)?;
    let (len, hdr) = if first < 0x80 {
        (first as usize, 2usize)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 {
            return None;
        }
        let mut len = 0usize;
        for i in 0..n {
            len = (len << 8) | *buf.get(2 + i)? as usize;
        }
        (len, 2 + n)
    };
    let end = hdr.checked_add(len)?;
    let whole = buf.get(..end)?;
    Some((
        Tlv {
            tag,
            contents: whole.get(hdr..)?,
            whole,
        },
        buf.get(end..)?,
    ))
}

const SEQUENCE: u8 = 0x30;
const UTC_TIME: u8 = 0x17;
const GENERALIZED_TIME: u8 = 0x18;
const VERSION_TAG: u8 = 0xa0;

/// The TBSCertificate fields up to and including the SPKI: (validity, spki).
fn tbs_fields(cert_der: &[u8]) -> Option<(Tlv<'_>, Tlv<'_>)> {
    let (cert, _) = tlv(cert_der)?;
    if cert.tag != SEQUENCE {
        return None;
    }
    let (tbs, _) = tlv(cert.contents)?;
    if tbs.tag != SEQUENCE {
        return None;
    }
    let mut rest = tbs.contents;
    let (first, r) = tlv(rest)?;
    rest = if first.tag == VERSION_TAG { r } else { rest };
    let (_serial, r) = tlv(rest)?;
    let (_sig_alg, r) = tlv(r)?;
    let (_issuer, r) = tlv(r)?;
    let (validity, r) = tlv(r)?;
    let (_subject, r) = tlv(r)?;
    let (spki, _) = tlv(r)?;
    if validity.tag != SEQUENCE || spki.tag != SEQUENCE {
        return None;
    }
    Some((validity, spki))
}

/// The DER SubjectPublicKeyInfo of a certificate (header included), or `None` when the
/// certificate does not parse.
pub fn spki(cert_der: &[u8]) -> Option<&[u8]> {
    tbs_fields(cert_der).map(|(_, spki)| spki.whole)
}

/// SHA-256 of the certificate's SubjectPublicKeyInfo: the SPKI pin (RFC 7469 §2.4). It stays
/// the same when a certificate is re-issued for the same key.
pub fn spki_pin(cert_der: &[u8]) -> Option<[u8; 32]> {
    spki(cert_der).map(|s| Sha256::digest(s).into())
}

/// Validity period of a certificate as Unix seconds: (notBefore, notAfter).
pub fn validity(cert_der: &[u8]) -> Option<(i64, i64)> {
    let (validity, _) = tbs_fields(cert_der)?;
    let (nb, rest) = tlv(validity.contents)?;
    let (na, _) = tlv(rest)?;
    Some((time(&nb)?, time(&na)?))
}

/// UTCTime (YYMMDDHHMMSSZ, years 1950-2049) or GeneralizedTime (YYYYMMDDHHMMSSZ), RFC 5280
/// §4.1.2.5.
fn time(t: &Tlv<'_>) -> Option<i64> {
    let s = t.contents;
    let digits = |b: &[u8]| -> Option<i64> {
        if b.is_empty() || !b.iter().all(u8::is_ascii_digit) {
            return None;
        }
        Some(b.iter().fold(0i64, |a, d| a * 10 + i64::from(d - b'0')))
    };
    let (year, rest) = match t.tag {
        UTC_TIME if s.len() == 13 => {
            let yy = digits(s.get(..2)?)?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, s.get(2..)?)
        }
        GENERALIZED_TIME if s.len() == 15 => (digits(s.get(..4)?)?, s.get(4..)?),
        _ => return None,
    };
    if rest.get(10) != Some(&b'Z') {
        return None;
    }
    let month = digits(rest.get(0..2)?)?;
    let day = digits(rest.get(2..4)?)?;
    let hour = digits(rest.get(4..6)?)?;
    let min = digits(rest.get(6..8)?)?;
    let sec = digits(rest.get(8..10)?)?;
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || min > 59 || sec > 60 {
        return None;
    }
    Some(days_from_civil(year, month, day) * 86_400 + hour * 3600 + min * 60 + sec)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `2026-12-02 05:11:00 UTC` for Unix seconds, for error messages.
pub fn format_unix(secs: i64) -> String {
    crate::clock::format_utc(secs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn reads_spki_and_validity_of_a_real_certificate() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["rdv.example.com".into()]).unwrap();
        params.not_before = rcgen::date_time_ymd(2024, 2, 29);
        params.not_after = rcgen::date_time_ymd(2051, 1, 1);
        let cert = params.self_signed(&key).unwrap();
        assert_eq!(
            spki(cert.der()),
            Some(rcgen::PublicKeyData::subject_public_key_info(&key).as_slice())
        );
        let (nb, na) = validity(cert.der()).unwrap();
        assert_eq!(format_unix(nb), "2024-02-29 00:00:00 UTC");
        // 2051: GeneralizedTime (RFC 5280 §4.1.2.5).
        assert_eq!(format_unix(na), "2051-01-01 00:00:00 UTC");
        // Same key, new certificate: same SPKI pin.
        let again = rcgen::CertificateParams::new(vec!["other.example.com".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        assert_eq!(spki_pin(cert.der()), spki_pin(again.der()));
        assert_ne!(cert.der().as_ref(), again.der().as_ref());
    }

    #[test]
    fn time_formats() {
        let utc = Tlv {
            tag: UTC_TIME,
            contents: b"260102030405Z",
            whole: b"",
        };
        assert_eq!(
            time(&utc).map(format_unix).as_deref(),
            Some("2026-01-02 03:04:05 UTC")
        );
        let gen = Tlv {
            tag: GENERALIZED_TIME,
            contents: b"40960229235959Z",
            whole: b"",
        };
        assert_eq!(
            time(&gen).map(format_unix).as_deref(),
            Some("4096-02-29 23:59:59 UTC")
        );
        let old = Tlv {
            tag: UTC_TIME,
            contents: b"700101000000Z",
            whole: b"",
        };
        assert_eq!(time(&old), Some(0));
        let bad = Tlv {
            tag: UTC_TIME,
            contents: b"2601020304+0Z",
            whole: b"",
        };
        assert_eq!(time(&bad), None);
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = spki(&b);
            let _ = validity(&b);
        }

        #[test]
        fn format_round_trips(secs in -10_000_000_000i64..100_000_000_000) {
            let s = format_unix(secs);
            let t = Tlv { tag: GENERALIZED_TIME, contents: &[], whole: &[] };
            let digits: String = s.chars().filter(char::is_ascii_digit).collect();
            if secs >= 0 && digits.len() == 14 {
                let g = format!("{digits}Z");
                let t = Tlv { contents: g.as_bytes(), ..t };
                prop_assert_eq!(time(&t), Some(secs));
            }
        }
    }
}
