//! Context values as the Erlang terms they came from, and the [`Context`]
//! trait evaluation reads them through.

use std::collections::BTreeMap;
use std::fmt;

/// One context value, borrowed, as the Erlang term the caller passed.
///
/// Rollout buckets hash this term exactly as `erlang:phash2/2` would, so a
/// binary `<<"42">>`, the atom `'42'` and the integer `42` land in different
/// buckets, as they do in Erlang. A JSON or CLI string is a binary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Value<'a> {
    /// An Erlang binary: any bytes, not necessarily UTF-8.
    Binary(&'a [u8]),
    /// An Erlang atom, by its name.
    Atom(&'a str),
    /// An integer that fits in an `i64`.
    Int(i64),
    /// An integer of any size: sign and magnitude as little-endian bytes
    /// (the layout of the external term format's `SMALL_BIG_EXT`). Leading
    /// (most significant) zero bytes are allowed; a value that fits in an
    /// `i64` hashes exactly like [`Value::Int`].
    BigInt {
        /// `true` for a negative number.
        negative: bool,
        /// Absolute value, least significant byte first.
        magnitude: &'a [u8],
    },
    /// A term of any other type (float, tuple, list, map, pid, ...), which
    /// evaluation cannot hash itself: it is never equal to a configured
    /// value, and its rollout bucket comes from [`ForeignTerm`].
    Foreign(&'a dyn ForeignTerm),
}

/// A context value of a type the evaluator does not read (the reference
/// accepts any Erlang term and hashes it with `erlang:phash2/2`).
///
/// The NIF implements it over the Erlang term: [`ForeignTerm::phash2_27`]
/// from the VM (`enif_hash`), [`ForeignTerm::hash`] from answers computed by
/// `erlang:phash2/2` in the caller. A hash it does not know yet makes the
/// context incomplete ([`Context::complete`]): the evaluation is then not
/// counted and is asked again with the answer.
pub trait ForeignTerm: fmt::Debug {
    /// `make_hash2` of the term (`erlang:phash2(T, 4294967296)`), or of
    /// `{Salt, T}` with `salt`; `None` when not known.
    fn hash(&self, salt: Option<&[u8]>) -> Option<u32>;
    /// `erlang:phash2(T)` (the low 27 bits of `make_hash2`).
    fn phash2_27(&self) -> u32;
}

/// Foreign values are equal only to themselves (by address).
impl PartialEq for dyn ForeignTerm + '_ {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::addr_eq(self as *const Self, other as *const Self)
    }
}

impl Eq for dyn ForeignTerm + '_ {}

impl Value<'_> {
    /// The bytes a string comparison sees: a binary's bytes or an atom's
    /// name; `None` for integers.
    pub fn text(&self) -> Option<&[u8]> {
        match self {
            Value::Binary(b) => Some(b),
            Value::Atom(a) => Some(a.as_bytes()),
            Value::Int(_) | Value::BigInt { .. } | Value::Foreign(_) => None,
        }
    }
}

impl fmt::Display for Value<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Binary(b) => match std::str::from_utf8(b) {
                Ok(s) => write!(f, "<<{s:?}>>"),
                Err(_) => write!(f, "<<{} bytes>>", b.len()),
            },
            Value::Atom(a) => write!(f, "'{a}'"),
            Value::Int(i) => write!(f, "{i}"),
            Value::BigInt { negative, magnitude } => {
                write!(f, "{}{}", if *negative { "-" } else { "" }, big_to_decimal(magnitude))
            }
            Value::Foreign(t) => write!(f, "{t:?}"),
        }
    }
}

/// Decimal text of a little-endian magnitude (for messages only).
fn big_to_decimal(magnitude: &[u8]) -> String {
    let mut digits: Vec<u8> = vec![0];
    for &byte in magnitude.iter().rev() {
        let mut carry = u32::from(byte);
        for d in digits.iter_mut() {
            let v = u32::from(*d) * 256 + carry;
            *d = (v % 10) as u8;
            carry = v / 10;
        }
        while carry > 0 {
            digits.push((carry % 10) as u8);
            carry /= 10;
        }
    }
    while digits.len() > 1 && digits.last() == Some(&0) {
        digits.pop();
    }
    digits.iter().rev().map(|d| char::from(b'0' + d)).collect()
}

/// Where evaluation reads context values from.
///
/// Implement it over whatever holds the request's attributes (an Erlang map
/// in the NIF, a `HashMap` in a Rust service); evaluation asks only for the
/// keys a flag needs, and never allocates. Erlang's atom and binary keys are
/// both looked up by name.
pub trait Context {
    /// The value under `key`, if present.
    fn get(&self, key: &str) -> Option<Value<'_>>;

    /// The answer to the custom condition `name` when no Rust predicate is
    /// registered under it (the NIF passes results of Erlang funs this way).
    /// `None` (the default) makes the condition fail as unregistered.
    fn custom(&self, name: &str) -> Option<bool> {
        let _ = name;
        None
    }

    /// `false` when evaluation needed a [`ForeignTerm::hash`] it did not
    /// have: its result is a placeholder, not counted, and the caller asks
    /// again with the answers. Contexts without foreign values keep the
    /// default.
    #[inline(always)]
    fn complete(&self) -> bool {
        true
    }
}

/// A context that has no attributes (`is_enabled/1`).
impl Context for () {
    fn get(&self, _key: &str) -> Option<Value<'_>> {
        None
    }
}

/// An owned context value, for [`MapContext`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OwnedValue {
    /// A binary.
    Binary(Vec<u8>),
    /// An atom.
    Atom(String),
    /// An integer that fits in an `i64`.
    Int(i64),
    /// A big integer: sign and little-endian magnitude.
    BigInt {
        /// `true` for a negative number.
        negative: bool,
        /// Absolute value, least significant byte first.
        magnitude: Vec<u8>,
    },
}

impl OwnedValue {
    /// Borrow as a [`Value`].
    pub fn as_value(&self) -> Value<'_> {
        match self {
            OwnedValue::Binary(b) => Value::Binary(b),
            OwnedValue::Atom(a) => Value::Atom(a),
            OwnedValue::Int(i) => Value::Int(*i),
            OwnedValue::BigInt { negative, magnitude } => Value::BigInt {
                negative: *negative,
                magnitude,
            },
        }
    }

    /// Parse a decimal integer of any size (`-?[0-9]+`).
    ///
    /// # Examples
    /// ```
    /// use erlmcp_rollout::flags::OwnedValue;
    /// assert_eq!(OwnedValue::parse_integer("-42"), Some(OwnedValue::Int(-42)));
    /// assert!(matches!(
    ///     OwnedValue::parse_integer("18446744073709551616"),
    ///     Some(OwnedValue::BigInt { negative: false, .. })
    /// ));
    /// assert_eq!(OwnedValue::parse_integer("4x"), None);
    /// ```
    pub fn parse_integer(text: &str) -> Option<OwnedValue> {
        let (negative, digits) = match text.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, text),
        };
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        if let Ok(i) = text.parse::<i64>() {
            return Some(OwnedValue::Int(i));
        }
        // Multiply-add into a little-endian byte magnitude.
        let mut magnitude: Vec<u8> = Vec::new();
        for d in digits.bytes() {
            let mut carry = u32::from(d - b'0');
            for byte in magnitude.iter_mut() {
                let v = u32::from(*byte) * 10 + carry;
                *byte = (v & 0xff) as u8;
                carry = v >> 8;
            }
            while carry > 0 {
                magnitude.push((carry & 0xff) as u8);
                carry >>= 8;
            }
        }
        Some(OwnedValue::BigInt { negative, magnitude })
    }
}

impl fmt::Display for OwnedValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.as_value().fmt(f)
    }
}

/// A simple owned context: key name -> value.
///
/// # Examples
/// ```
/// use erlmcp_rollout::flags::{Context, MapContext, Value};
/// let ctx = MapContext::new().binary("session_id", "s-1").atom("session_type", "streaming").int("tier", 3);
/// assert_eq!(ctx.get("tier"), Some(Value::Int(3)));
/// assert_eq!(ctx.get("missing"), None);
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapContext {
    values: BTreeMap<String, OwnedValue>,
}

impl MapContext {
    /// An empty context.
    pub fn new() -> Self {
        Self::default()
    }

    /// Set `key` to any value.
    pub fn with(mut self, key: impl Into<String>, value: OwnedValue) -> Self {
        self.insert(key, value);
        self
    }

    /// Set `key` to a binary.
    pub fn binary(self, key: impl Into<String>, value: impl AsRef<[u8]>) -> Self {
        self.with(key, OwnedValue::Binary(value.as_ref().to_vec()))
    }

    /// Set `key` to an atom.
    pub fn atom(self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.with(key, OwnedValue::Atom(value.into()))
    }

    /// Set `key` to an integer.
    pub fn int(self, key: impl Into<String>, value: i64) -> Self {
        self.with(key, OwnedValue::Int(value))
    }

    /// Set `key` in place.
    pub fn insert(&mut self, key: impl Into<String>, value: OwnedValue) {
        self.values.insert(key.into(), value);
    }

    /// The entries, in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &OwnedValue)> {
        self.values.iter().map(|(k, v)| (k.as_str(), v))
    }
}

impl Context for MapContext {
    fn get(&self, key: &str) -> Option<Value<'_>> {
        self.values.get(key).map(OwnedValue::as_value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn big_integers_round_trip_through_decimal() {
        for text in [
            "9223372036854775808",
            "-9223372036854775809",
            "340282366920938463463374607431768211456",
        ] {
            let v = OwnedValue::parse_integer(text).unwrap();
            assert!(matches!(v, OwnedValue::BigInt { .. }), "{text}");
            assert_eq!(v.to_string(), text);
        }
        assert_eq!(
            OwnedValue::parse_integer("-9223372036854775808"),
            Some(OwnedValue::Int(i64::MIN))
        );
        assert_eq!(OwnedValue::parse_integer("-"), None);
        assert_eq!(OwnedValue::parse_integer(""), None);
        assert_eq!(OwnedValue::parse_integer("+1"), None);
    }
}
