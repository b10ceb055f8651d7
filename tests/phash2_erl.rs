//! `flags::phash2` against the real thing: generates a few thousand terms,
//! hashes them with `erlang:phash2/2` in one `erl -noshell` run and with the
//! Rust implementation, and compares the full 32-bit hash and the bucket in
//! `0..100`. Fails (never skips) when `erl` is not installed.

#[path = "support/erl.rs"]
mod erl;

use std::fmt::Write as _;

use erlmcp_rollout::flags::phash2::{hash, hash_salted, phash2, phash2_salted};
use erlmcp_rollout::flags::Value;
use proptest::prelude::*;

/// An owned term to hash.
#[derive(Clone, Debug)]
enum Term {
    Bin(Vec<u8>),
    Atom(String),
    Int(i64),
    Big { negative: bool, magnitude: Vec<u8> },
}

impl Term {
    fn value(&self) -> Value<'_> {
        match self {
            Term::Bin(b) => Value::Binary(b),
            Term::Atom(a) => Value::Atom(a),
            Term::Int(i) => Value::Int(*i),
            Term::Big { negative, magnitude } => Value::BigInt {
                negative: *negative,
                magnitude,
            },
        }
    }

    /// `type,payload` for the Erlang side.
    fn encode(&self, out: &mut String) {
        match self {
            Term::Bin(b) => {
                out.push_str("b,");
                push_hex(out, b);
            }
            Term::Atom(a) => {
                out.push_str("a,");
                push_hex(out, a.as_bytes());
            }
            Term::Int(i) => {
                let _ = write!(out, "i,{i}");
            }
            Term::Big { negative, magnitude } => {
                out.push_str(if *negative { "n," } else { "p," });
                push_hex(out, magnitude);
            }
        }
    }
}

/// One test vector: `Term` or `{Salt, Term}`.
#[derive(Clone, Debug)]
struct Case {
    salt: Option<Vec<u8>>,
    term: Term,
}

impl Case {
    fn plain(term: Term) -> Self {
        Case { salt: None, term }
    }

    fn rust_hash(&self) -> u32 {
        match &self.salt {
            Some(salt) => hash_salted(salt, &self.term.value()),
            None => hash(&self.term.value()),
        }
    }

    fn rust_bucket(&self) -> u32 {
        match &self.salt {
            Some(salt) => phash2_salted(salt, &self.term.value(), 100),
            None => phash2(&self.term.value(), 100),
        }
    }

    fn describe(&self) -> String {
        let term = match &self.term {
            Term::Bin(b) => format!("<<{} bytes: {}>>", b.len(), short_hex(b)),
            Term::Atom(a) => format!("'{a}' ({} chars)", a.chars().count()),
            Term::Int(i) => format!("Int({i})"),
            Term::Big { .. } => format!("BigInt({})", self.term.value()),
        };
        match &self.salt {
            Some(s) => format!("{{<<{} bytes: {}>>, {term}}}", s.len(), short_hex(s)),
            None => term,
        }
    }
}

fn push_hex(out: &mut String, bytes: &[u8]) {
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
}

fn short_hex(bytes: &[u8]) -> String {
    let mut s = String::new();
    push_hex(&mut s, bytes.get(..32).unwrap_or(bytes));
    if bytes.len() > 32 {
        s.push_str("...");
    }
    s
}

/// SplitMix64: a tiny seeded PRNG.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }

    /// A random char from a mix of ranges: ASCII, latin-1 (the folded
    /// range), other 2-byte, 3-byte and 4-byte UTF-8.
    fn char(&mut self) -> char {
        let (lo, hi): (u32, u32) = match self.below(6) {
            0 | 1 => (0x20, 0x7e),
            2 => (0x80, 0xff),
            3 => (0x100, 0x7ff),
            4 => (0x800, 0xd7ff),
            _ => (0x1_0000, 0x1_ffff),
        };
        let c = lo + self.below(u64::from(hi - lo + 1)) as u32;
        char::from_u32(c).unwrap_or('x')
    }

    fn atom(&mut self, chars: usize) -> String {
        (0..chars).map(|_| self.char()).collect()
    }
}

/// Little-endian magnitude of `|x|`, with `pad` extra zero bytes on top.
fn magnitude_of(x: i64, pad: usize) -> Vec<u8> {
    let mut m = x.unsigned_abs().to_le_bytes().to_vec();
    while m.last() == Some(&0) {
        m.pop();
    }
    m.resize(m.len() + pad, 0);
    m
}

fn cases() -> Vec<Case> {
    let mut rng = Rng(0x5eed_f00d_9a5b_0002);
    let mut cases = Vec::new();

    // Binaries: every length 0..=4096, several per short length, a few long.
    for len in 0..=4096usize {
        let copies = if len < 64 { 8 } else { 1 };
        for _ in 0..copies {
            cases.push(Case::plain(Term::Bin(rng.bytes(len))));
        }
    }
    for len in [8191, 8192, 12_345, 65_536, 100_003] {
        cases.push(Case::plain(Term::Bin(rng.bytes(len))));
    }
    for text in ["session-123", "", "a", "user-42", "\u{e9}t\u{e9}"] {
        cases.push(Case::plain(Term::Bin(text.as_bytes().to_vec())));
    }
    cases.push(Case::plain(Term::Bin(vec![0xff; 37])));
    cases.push(Case::plain(Term::Bin(vec![0; 24])));

    // Atoms.
    let fixed = [
        "",
        "ok",
        "error",
        "true",
        "undefined",
        "a",
        "streaming",
        "Z",
        "\u{e9}",
        "\u{ff}",
        "\u{80}",
        "\u{c0}",
        "\u{df}\u{e0}",
        "caf\u{e9}",
        "\u{65e5}\u{672c}",
        "\u{100}",
        "\u{7ff}",
        "\u{800}",
        "\u{1f600}",
        "\u{e9}\u{65e5}\u{e9}x",
        "\u{c2}\u{c3}",
        "\u{a9}\u{bf}\u{c3}\u{82}",
    ];
    for a in fixed {
        cases.push(Case::plain(Term::Atom(a.to_string())));
    }
    for c in ['a', '\u{e9}', '\u{ff}', '\u{65e5}', '\u{1f600}'] {
        cases.push(Case::plain(Term::Atom(std::iter::repeat_n(c, 255).collect())));
    }
    for _ in 0..2000 {
        let chars = match rng.below(4) {
            0 => 255,
            1 => rng.below(256) as usize,
            _ => rng.below(24) as usize,
        };
        let atom = if rng.below(4) == 0 {
            // Pure ASCII and pure latin-1 atoms.
            let (lo, span) = if rng.below(2) == 0 { (0x20, 0x5f) } else { (0x80, 0x80) };
            (0..chars)
                .map(|_| char::from_u32(lo + rng.below(span) as u32).unwrap_or('x'))
                .collect()
        } else {
            rng.atom(chars)
        };
        cases.push(Case::plain(Term::Atom(atom)));
    }

    // Integers: boundaries as Int and as BigInt (with and without padding).
    let mut ints: Vec<i64> = vec![0, 1, -1, 2, -2, 42, -42, 255, 256, i64::MAX, i64::MIN, i64::MIN + 1];
    // 2^27 is the SINT32_HASH bound, 2^59 - 1 = MAX_SMALL on 64-bit.
    for bits in [27u32, 28, 31, 32, 33, 59, 60, 62] {
        let p = 1i64 << bits;
        for x in [p - 2, p - 1, p, p + 1] {
            ints.push(x);
            ints.push(-x);
        }
    }
    for _ in 0..600 {
        let x = rng.next() as i64;
        let shift = rng.below(64) as u32;
        ints.push(x >> shift);
    }
    for &x in &ints {
        cases.push(Case::plain(Term::Int(x)));
        let pad = rng.below(3) as usize * rng.below(5) as usize;
        cases.push(Case::plain(Term::Big {
            negative: x < 0,
            magnitude: magnitude_of(x, pad),
        }));
    }
    // 2^63, 2^64, 2^100, 2^1000 and neighbours, both signs.
    for bits in [63usize, 64, 100, 127, 128, 1000] {
        let mut m = vec![0u8; bits / 8 + 1];
        if let Some(top) = m.last_mut() {
            *top = 1 << (bits % 8);
        }
        let mut minus_one = m.clone();
        for b in minus_one.iter_mut() {
            let (v, borrow) = b.overflowing_sub(1);
            *b = v;
            if !borrow {
                break;
            }
        }
        for magnitude in [m, minus_one] {
            for negative in [false, true] {
                cases.push(Case::plain(Term::Big {
                    negative,
                    magnitude: magnitude.clone(),
                }));
            }
        }
    }
    // -2^63 as a bignum; negative zero and the empty magnitude are 0.
    cases.push(Case::plain(Term::Big {
        negative: true,
        magnitude: vec![0, 0, 0, 0, 0, 0, 0, 0x80],
    }));
    cases.push(Case::plain(Term::Big {
        negative: true,
        magnitude: vec![0; 5],
    }));
    cases.push(Case::plain(Term::Big {
        negative: false,
        magnitude: vec![],
    }));
    for _ in 0..1500 {
        let len = 1 + rng.below(40) as usize;
        let mut magnitude = rng.bytes(len);
        if rng.below(4) == 0 {
            magnitude.resize(len + 1 + rng.below(9) as usize, 0);
        }
        cases.push(Case::plain(Term::Big {
            negative: rng.below(2) == 0,
            magnitude,
        }));
    }

    // Salted pairs {Salt, Value}.
    for i in 0..3000 {
        let salt_len = match rng.below(4) {
            0 => 0,
            1 => rng.below(12) as usize,
            _ => rng.below(64) as usize,
        };
        let salt = rng.bytes(salt_len);
        let len = rng.below(80) as usize;
        let term = match i % 5 {
            0 | 1 => Term::Bin(rng.bytes(len)),
            2 => Term::Atom(rng.atom(len % 20)),
            3 => Term::Int((rng.next() as i64) >> (len % 64)),
            _ => Term::Big {
                negative: rng.below(2) == 0,
                magnitude: rng.bytes(len % 33),
            },
        };
        cases.push(Case { salt: Some(salt), term });
    }
    for (salt, term) in [
        (&b"mcp_sampling"[..], Term::Bin(b"session-123".to_vec())),
        (b"salt", Term::Bin(b"v".to_vec())),
        (b"", Term::Bin(vec![])),
        (b"flag", Term::Atom("ok".to_string())),
        (b"flag", Term::Atom(String::new())),
        (b"flag", Term::Atom("\u{e9}\u{65e5}".to_string())),
        (b"flag", Term::Int(0)),
        (b"flag", Term::Int(-1)),
        (b"flag", Term::Int(i64::MIN)),
    ] {
        cases.push(Case {
            salt: Some(salt.to_vec()),
            term,
        });
    }
    cases
}

/// Reads `In` (one `Salted,SaltHex,Type,Payload` per line), writes
/// `Hash32 Bucket100` per line to `Out`.
const ERL_SCRIPT: &str = r#"
[In, Out] = init:get_plain_arguments(),
Dec = fun (<<"b">>, P) -> binary:decode_hex(P);
          (<<"a">>, P) -> binary_to_atom(binary:decode_hex(P), utf8);
          (<<"i">>, P) -> binary_to_integer(P);
          (<<"p">>, P) -> binary:decode_unsigned(binary:decode_hex(P), little);
          (<<"n">>, P) -> -binary:decode_unsigned(binary:decode_hex(P), little)
      end,
Hash = fun (Line) ->
           [S, SaltHex, Ty, P] = binary:split(Line, <<",">>, [global]),
           T0 = Dec(Ty, P),
           T = case S of
                   <<"1">> -> {binary:decode_hex(SaltHex), T0};
                   <<"0">> -> T0
               end,
           [integer_to_binary(erlang:phash2(T, 4294967296)), $\s,
            integer_to_binary(erlang:phash2(T, 100)), $\n]
       end,
try
    {ok, Data} = file:read_file(In),
    Lines = binary:split(Data, <<"\n">>, [global, trim_all]),
    ok = file:write_file(Out, [Hash(L) || L <- Lines]),
    halt(0)
catch C:R:St ->
    io:format(standard_error, "~p:~p~n~p~n", [C, R, St]),
    halt(1)
end.
"#;

#[test]
fn phash2_matches_real_erl() {
    let cases = cases();
    let mut text = String::new();
    for case in &cases {
        match &case.salt {
            Some(salt) => {
                text.push_str("1,");
                push_hex(&mut text, salt);
                text.push(',');
            }
            None => text.push_str("0,,"),
        }
        case.term.encode(&mut text);
        text.push('\n');
    }
    let results = erl::erl_lines(ERL_SCRIPT, &text);
    let results: Vec<(u32, u32)> = results
        .iter()
        .map(|line| {
            let (h, b) = line.split_once(' ').expect("two fields");
            (h.parse().expect("hash"), b.parse().expect("bucket"))
        })
        .collect();
    assert_eq!(results.len(), cases.len(), "erl returned a different number of hashes");

    let mut mismatches = Vec::new();
    for (case, &(erl_hash, erl_bucket)) in cases.iter().zip(&results) {
        let (ours, bucket) = (case.rust_hash(), case.rust_bucket());
        if ours != erl_hash || bucket != erl_bucket {
            mismatches.push(format!(
                "{}: erl {erl_hash} (bucket {erl_bucket}), rust {ours} (bucket {bucket})",
                case.describe()
            ));
        }
    }
    let kinds = |f: fn(&Case) -> bool| cases.iter().filter(|c| f(c)).count();
    eprintln!(
        "compared {} terms with erl: {} binaries, {} atoms, {} integers, {} salted",
        cases.len(),
        kinds(|c| c.salt.is_none() && matches!(c.term, Term::Bin(_))),
        kinds(|c| c.salt.is_none() && matches!(c.term, Term::Atom(_))),
        kinds(|c| c.salt.is_none() && matches!(c.term, Term::Int(_) | Term::Big { .. })),
        kinds(|c| c.salt.is_some()),
    );
    assert!(
        mismatches.is_empty(),
        "{} of {} terms hash differently from erlang:phash2/2; first ones:\n{}",
        mismatches.len(),
        cases.len(),
        mismatches.iter().take(20).cloned().collect::<Vec<_>>().join("\n")
    );
}

proptest! {
    #[test]
    fn bucket_is_hash_modulo_range(bytes in proptest::collection::vec(any::<u8>(), 0..200), range in 1u32..) {
        let v = Value::Binary(&bytes);
        prop_assert_eq!(phash2(&v, 100), hash(&v) % 100);
        prop_assert_eq!(phash2(&v, range), hash(&v) % range);
        prop_assert_eq!(phash2_salted(&bytes, &v, range), hash_salted(&bytes, &v) % range);
    }

    #[test]
    fn int_hashes_like_its_bigint_form(x in any::<i64>(), pad in 0usize..12) {
        let magnitude = magnitude_of(x, pad);
        let big = Value::BigInt { negative: x < 0, magnitude: &magnitude };
        prop_assert_eq!(hash(&big), hash(&Value::Int(x)));
        prop_assert_eq!(hash_salted(b"s", &big), hash_salted(b"s", &Value::Int(x)));
    }

    #[test]
    fn leading_zero_bytes_do_not_change_the_hash(
        magnitude in proptest::collection::vec(any::<u8>(), 0..48),
        pad in 1usize..16,
        negative in any::<bool>(),
    ) {
        let mut padded = magnitude.clone();
        padded.resize(magnitude.len() + pad, 0);
        let a = Value::BigInt { negative, magnitude: &magnitude };
        let b = Value::BigInt { negative, magnitude: &padded };
        prop_assert_eq!(hash(&a), hash(&b));
        if magnitude.iter().all(|&m| m == 0) {
            prop_assert_eq!(hash(&a), hash(&Value::Int(0)));
        }
    }
}
