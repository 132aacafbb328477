//! The names of turnstile's counters in Redis.

use sha2::{Digest, Sha256};

use crate::store::Subject;

/// The first 8 bytes of `bytes`, in hex.
pub(super) fn hex16(bytes: &[u8]) -> String {
    hex::encode(&bytes[..8.min(bytes.len())])
}

/// `prefix{tag}:subject:counter`, the key of `subject`'s counter in
/// `group` (`tag` groups the keys of one account), made with one
/// allocation: a decision makes one key per limit.
pub(super) fn counter_key(
    prefix: &str,
    group: &Subject,
    subject: &Subject,
    counter: u64,
) -> String {
    let account = |a: &str| -> [u8; 32] { Sha256::digest(a.as_bytes()).into() };
    let of_group;
    let tag: &[u8] = match group {
        Subject::Key(d) => d,
        Subject::Account(a) => {
            of_group = account(a);
            &of_group
        }
    };
    let whole;
    let (letter, subject): (char, &[u8]) = match subject {
        Subject::Key(d) => ('k', d),
        Subject::Account(a) => {
            whole = account(a);
            ('a', &whole)
        }
    };
    let mut key = String::with_capacity(prefix.len() + 2 * subject.len() + 40);
    key.push_str(prefix);
    key.push('{');
    push_hex(&mut key, &tag[..8.min(tag.len())]);
    key.push_str("}:");
    key.push(letter);
    push_hex(&mut key, subject);
    key.push(':');
    push_hex(&mut key, &counter.to_be_bytes());
    key
}

/// Lower-case hex of `bytes`, appended.
fn push_hex(out: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 15)]));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The spelling counters had before it was written by hand: keys
    /// already in Redis keep being found.
    fn as_before(prefix: &str, group: &Subject, subject: &Subject, counter: u64) -> String {
        let tag = match group {
            Subject::Key(d) => hex16(d),
            Subject::Account(a) => hex16(&Sha256::digest(a.as_bytes())),
        };
        let subject = match subject {
            Subject::Key(d) => format!("k{}", hex::encode(d)),
            Subject::Account(a) => format!("a{}", hex::encode(Sha256::digest(a.as_bytes()))),
        };
        format!("{prefix}{{{tag}}}:{subject}:{counter:016x}")
    }

    #[test]
    fn counter_keys_are_spelled_as_before() {
        let key = Subject::Key(*b"\x00\x01\xfe\xff0123456789ab");
        let account = Subject::Account("acme corp".into());
        for (group, subject) in [(&key, &key), (&account, &account), (&account, &key)] {
            for counter in [0, 1, 0xdead_beef, u64::MAX] {
                assert_eq!(
                    counter_key("turnstile:", group, subject, counter),
                    as_before("turnstile:", group, subject, counter)
                );
            }
        }
    }
}
