//! The SHA-256 of an API key: the only form of a key that anything keeps
//! (stores, limits, logs by its 12-digit id). A plain value below every
//! module that handles keys.

use std::fmt;

use sha2::{Digest, Sha256};

/// The SHA-256 of an API key.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyHash(pub [u8; 32]);

impl KeyHash {
    pub fn of(key: &str) -> KeyHash {
        KeyHash(Sha256::digest(key.as_bytes()).into())
    }

    /// Parse 64 hex digits (nothing else: no sign, no spaces).
    pub fn from_hex(digits: &str) -> Option<KeyHash> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(digits, &mut out).ok()?;
        Some(KeyHash(out))
    }

    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The key's public id: the first 12 hex digits of its hash.
    pub fn id(&self) -> String {
        hex::encode(&self.0[..6])
    }
}

/// A hasher for maps keyed by [`KeyHash`] on the request path (the lease
/// book): the key's SHA-256 is as random as any hash, so its first 8 bytes
/// are used as they are rather than hashed again with SipHash.
#[derive(Default, Clone, Copy)]
pub struct KeyHasher(u64);

impl std::hash::Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        if let Some(first) = bytes.first_chunk::<8>() {
            self.0 ^= u64::from_le_bytes(*first);
        } else {
            for b in bytes {
                self.0 = self.0.rotate_left(8) ^ u64::from(*b);
            }
        }
    }
}

/// `HashMap<KeyHash, V, KeyHashes>`.
pub type KeyHashes = std::hash::BuildHasherDefault<KeyHasher>;

/// Never print a key hash in full by accident: Debug shows the id only.
impl fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyHash({}…)", self.id())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_hex_and_id() {
        let h = KeyHash::of("test");
        assert_eq!(
            h.hex(),
            "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
        );
        assert_eq!(h.id(), "9f86d081884c");
        assert_eq!(KeyHash::from_hex(&h.hex()), Some(h));
        assert_eq!(KeyHash::from_hex("9f86"), None);
        assert_eq!(KeyHash::from_hex(&"g".repeat(64)), None);
        // u8::from_str_radix took "+f" as 15: a sign is not a hex digit.
        assert_eq!(KeyHash::from_hex(&"+f".repeat(32)), None);
        assert_eq!(KeyHash::from_hex(&format!("+{}", &h.hex()[1..])), None);
        assert!(!format!("{h:?}").contains(&h.hex()));
    }
}
