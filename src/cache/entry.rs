//! A cache entry: a stored answer and its timeline, and its encoding for
//! the shared (Redis) tier, which must read every form it ever wrote.

use bytes::Bytes;
use http::HeaderValue;

use crate::answer::Answer;

/// A stored answer and its timeline (unix milliseconds).
#[derive(Debug, Clone)]
pub struct Entry {
    pub answer: Answer,
    pub stored_at: u64,
    pub fresh_until: u64,
    pub stale_until: u64,
}

impl Entry {
    pub fn is_fresh(&self, now: u64) -> bool {
        now < self.fresh_until
    }

    /// Whole seconds since it was stored (the `Age` header).
    pub fn age_secs(&self, now: u64) -> u64 {
        now.saturating_sub(self.stored_at) / 1000
    }

    /// The Redis form since `Content-Encoding` is kept: magic, status, three
    /// timestamps, content type, content encoding, body.
    const MAGIC: &'static [u8; 4] = b"TG2\n";
    /// The form before it (no content encoding), still read: such an entry
    /// was stored without one.
    const MAGIC_V1: &'static [u8; 4] = b"TG1\n";

    pub fn encode(&self) -> Vec<u8> {
        fn bytes(v: &Option<HeaderValue>) -> &[u8] {
            v.as_ref().map_or(&b""[..], HeaderValue::as_bytes)
        }
        let (ct, ce) = (
            bytes(&self.answer.content_type),
            bytes(&self.answer.content_encoding),
        );
        let mut out = Vec::with_capacity(38 + ct.len() + ce.len() + self.answer.body.len());
        out.extend_from_slice(Self::MAGIC);
        out.extend_from_slice(&self.answer.status.to_be_bytes());
        out.extend_from_slice(&self.stored_at.to_be_bytes());
        out.extend_from_slice(&self.fresh_until.to_be_bytes());
        out.extend_from_slice(&self.stale_until.to_be_bytes());
        for value in [ct, ce] {
            // A response header is at most 1 MiB (Pingora's limit).
            out.extend_from_slice(&(value.len() as u32).to_be_bytes());
            out.extend_from_slice(value);
        }
        out.extend_from_slice(&self.answer.body);
        out
    }

    /// `None` for anything that is not a well-formed entry.
    pub fn decode(bytes: &[u8]) -> Option<Entry> {
        let (rest, v1) = match bytes.strip_prefix(Self::MAGIC) {
            Some(rest) => (rest, false),
            None => (bytes.strip_prefix(Self::MAGIC_V1)?, true),
        };
        let (status, rest) = rest.split_first_chunk::<2>()?;
        let (stored_at, rest) = rest.split_first_chunk::<8>()?;
        let (fresh_until, rest) = rest.split_first_chunk::<8>()?;
        let (stale_until, rest) = rest.split_first_chunk::<8>()?;
        let (content_type, content_encoding, body) = if v1 {
            let (len, rest) = rest.split_first_chunk::<2>()?;
            let (ct, body) = header_field(u16::from_be_bytes(*len).into(), rest)?;
            (ct, None, body)
        } else {
            let (len, rest) = rest.split_first_chunk::<4>()?;
            let (ct, rest) = header_field(u32::from_be_bytes(*len), rest)?;
            let (len, rest) = rest.split_first_chunk::<4>()?;
            let (ce, body) = header_field(u32::from_be_bytes(*len), rest)?;
            (ct, ce, body)
        };
        let status = u16::from_be_bytes(*status);
        if !(100..600).contains(&status) {
            return None;
        }
        Some(Entry {
            answer: Answer {
                status,
                content_type,
                cache_control: None,
                content_encoding,
                sets_cookie: false,
                body: Bytes::copy_from_slice(body),
            },
            stored_at: u64::from_be_bytes(*stored_at),
            fresh_until: u64::from_be_bytes(*fresh_until),
            stale_until: u64::from_be_bytes(*stale_until),
        })
    }
}

/// A header value of `len` bytes at the start of `bytes` (empty: absent),
/// and what follows it.
fn header_field(len: u32, bytes: &[u8]) -> Option<(Option<HeaderValue>, &[u8])> {
    let len = usize::try_from(len).ok()?;
    if bytes.len() < len {
        return None;
    }
    let (value, rest) = bytes.split_at(len);
    let value = match value {
        [] => None,
        v => Some(HeaderValue::from_bytes(v).ok()?),
    };
    Some((value, rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(body: &str) -> Answer {
        Answer {
            status: 200,
            content_type: Some(HeaderValue::from_static("application/json")),
            cache_control: None,
            content_encoding: None,
            sets_cookie: false,
            body: Bytes::from(body.to_string()),
        }
    }

    #[test]
    fn entries_round_trip_and_garbage_is_rejected() {
        let e = Entry {
            answer: answer("{\"status\": true}"),
            stored_at: 1,
            fresh_until: 2,
            stale_until: 3,
        };
        let d = Entry::decode(&e.encode()).unwrap();
        assert_eq!(
            (d.answer.status, d.answer.body.clone()),
            (200, e.answer.body.clone())
        );
        assert_eq!(d.answer.content_type, e.answer.content_type);
        assert_eq!(d.answer.content_encoding, None);
        assert_eq!((d.stored_at, d.fresh_until, d.stale_until), (1, 2, 3));
        assert!(Entry::decode(b"garbage").is_none());
        assert!(Entry::decode(&e.encode()[..20]).is_none());
        assert!(Entry::decode(&e.encode()[..40]).is_none());

        let mut gz = e.clone();
        gz.answer.content_encoding = Some(HeaderValue::from_static("gzip"));
        gz.answer.body = Bytes::from_static(b"\x1f\x8b\x08\x00binary");
        let d = Entry::decode(&gz.encode()).unwrap();
        assert_eq!(d.answer.content_encoding, gz.answer.content_encoding);
        assert_eq!(d.answer.content_type, gz.answer.content_type);
        assert_eq!(d.answer.body, gz.answer.body);
    }

    #[test]
    fn entries_in_the_first_format_still_decode() {
        // TG1: magic, status, three timestamps, u16 content-type length, body.
        let mut v1 = b"TG1\n".to_vec();
        v1.extend_from_slice(&200u16.to_be_bytes());
        for t in [1u64, 2, 3] {
            v1.extend_from_slice(&t.to_be_bytes());
        }
        v1.extend_from_slice(&16u16.to_be_bytes());
        v1.extend_from_slice(b"application/json{\"status\": true}");
        let d = Entry::decode(&v1).unwrap();
        assert_eq!(d.answer.status, 200);
        assert_eq!(d.answer.content_type.unwrap(), "application/json");
        assert_eq!(d.answer.content_encoding, None);
        assert_eq!(&d.answer.body[..], b"{\"status\": true}");
        assert_eq!((d.stored_at, d.fresh_until, d.stale_until), (1, 2, 3));
    }
}
