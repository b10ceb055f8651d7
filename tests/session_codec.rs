//! The session record encoding: round trips, the documented layout, and a decoder that
//! returns `Corrupt` (never panics) on arbitrary bytes.

use erlmcp_rollout::session::{
    codec, InvalidInput, Session, SessionId, StoreError, Timeout, MAX_ID_LEN, MAX_METADATA_LEN,
};
use proptest::prelude::*;

fn session_strategy() -> impl Strategy<Value = Session> {
    (
        proptest::collection::vec(any::<u8>(), 1..=64),
        any::<i64>(),
        any::<i64>(),
        prop_oneof![Just(None), (1u64..).prop_map(Some)],
        proptest::collection::vec(any::<u8>(), 0..256),
        any::<u64>(),
        any::<bool>(),
    )
        .prop_map(
            |(id, created_at, last_accessed, timeout, metadata, version, tombstone)| Session {
                id: SessionId::new(id).unwrap(),
                created_at,
                last_accessed,
                timeout: timeout.map_or(Timeout::Infinity, |t| Timeout::ms(t).unwrap()),
                metadata: metadata.into(),
                meta_format: erlmcp_rollout::session::MetaFormat::Opaque,
                version,
                tombstone,
            },
        )
}

fn is_corrupt(r: Result<Session, StoreError>) -> bool {
    matches!(r, Err(StoreError::Corrupt { .. }))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2048, ..ProptestConfig::default() })]

    #[test]
    fn round_trips(s in session_strategy()) {
        let bytes = codec::encode(&s).unwrap();
        prop_assert_eq!(bytes.len(), codec::HEADER_LEN + s.id.as_bytes().len() + s.metadata.len());
        prop_assert_eq!(codec::decode(&bytes).unwrap(), s);
    }

    #[test]
    fn decoder_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        if let Err(e) = codec::decode(&bytes) {
            prop_assert!(matches!(e, StoreError::Corrupt { .. }), "{e:?}");
        }
    }

    /// Arbitrary bytes in a valid record's header, or a cut record: decodes to a valid
    /// session or is `Corrupt`, never panics.
    #[test]
    fn damaged_records_are_corrupt_or_valid(s in session_strategy(), at in 0usize..64, byte in any::<u8>(), cut in any::<bool>()) {
        let mut bytes = codec::encode(&s).unwrap();
        let at = at % bytes.len();
        if cut {
            bytes.truncate(at);
            prop_assert!(is_corrupt(codec::decode(&bytes)));
        } else {
            bytes[at] = byte;
            match codec::decode(&bytes) {
                Ok(d) => prop_assert_eq!(codec::encode(&d).unwrap(), bytes),
                Err(e) => prop_assert!(matches!(e, StoreError::Corrupt { .. }), "{e:?}"),
            }
        }
    }
}

#[test]
fn layout_is_as_documented() {
    let s = Session {
        id: SessionId::new("ab").unwrap(),
        created_at: 1,
        last_accessed: -2,
        timeout: Timeout::ms(0x0102).unwrap(),
        metadata: vec![9].into(),
        meta_format: erlmcp_rollout::session::MetaFormat::Opaque,
        version: 7,
        tombstone: true,
    };
    let mut expected = vec![1u8, 0b01];
    expected.extend_from_slice(&7u64.to_be_bytes());
    expected.extend_from_slice(&1i64.to_be_bytes());
    expected.extend_from_slice(&(-2i64).to_be_bytes());
    expected.extend_from_slice(&0x0102u64.to_be_bytes());
    expected.extend_from_slice(&2u32.to_be_bytes());
    expected.extend_from_slice(&1u32.to_be_bytes());
    expected.extend_from_slice(b"ab");
    expected.push(9);
    assert_eq!(codec::encode(&s).unwrap(), expected);
    let inf = Session {
        timeout: Timeout::Infinity,
        tombstone: false,
        ..s
    };
    assert_eq!(codec::encode(&inf).unwrap()[1], 0b10);
    assert_eq!(codec::encode(&inf).unwrap()[26..34], [0; 8]);
}

#[test]
fn oversized_metadata_is_not_encoded() {
    let mut s = Session::new(SessionId::new("big").unwrap(), 0, Timeout::Infinity, vec![]);
    s.metadata = vec![0u8; MAX_METADATA_LEN + 1].into();
    assert!(matches!(codec::encode(&s), Err(InvalidInput::MetadataTooLarge { .. })));
}

#[test]
fn each_malformation_is_named() {
    let s = Session::new(SessionId::new("k").unwrap(), 0, Timeout::ms(5).unwrap(), vec![1, 2]);
    let good = codec::encode(&s).unwrap();
    let corrupt_with = |f: &dyn Fn(&mut Vec<u8>), needle: &str| {
        let mut b = good.clone();
        f(&mut b);
        match codec::decode(&b) {
            Err(StoreError::Corrupt { key: None, reason }) => assert!(reason.contains(needle), "{reason}"),
            other => panic!("expected Corrupt mentioning {needle:?}, got {other:?}"),
        }
    };
    corrupt_with(&|b| b.truncate(10), "shorter than its header");
    corrupt_with(&|b| b[0] = 2, "unknown record format 2");
    corrupt_with(&|b| b[1] = 0x80, "unknown flag bits");
    corrupt_with(&|b| b[1] = 0b10, "infinite timeout with a non-zero");
    corrupt_with(&|b| b[26..34].fill(0), "finite timeout of 0");
    corrupt_with(&|b| b[34..38].fill(0), "id length 0");
    corrupt_with(
        &|b| b[34..38].copy_from_slice(&(MAX_ID_LEN as u32 + 1).to_be_bytes()),
        "id length 1025",
    );
    corrupt_with(&|b| b[38..42].fill(0xff), "metadata length");
    corrupt_with(&|b| b.push(0), "header says");
    corrupt_with(&|b| b.truncate(b.len() - 1), "header says");
    let e = codec::decode(&good[..10]).unwrap_err();
    assert!(e.to_string().starts_with("corrupt session record: "), "{e}");
}

#[test]
fn keyed_decoding_names_the_key() {
    let s = Session::new(SessionId::new("k1").unwrap(), 0, Timeout::Infinity, vec![]);
    let bytes = codec::encode(&s).unwrap();
    let e = codec::decode_keyed(&SessionId::new("k1").unwrap(), &bytes[..5]).unwrap_err();
    assert!(e.to_string().starts_with("corrupt session record \"k1\": "), "{e}");
    let e = codec::decode_keyed(&SessionId::new("k2").unwrap(), &bytes).unwrap_err();
    assert_eq!(
        e.to_string(),
        "corrupt session record \"k2\": the record holds id \"k1\""
    );
}

#[test]
fn metadata_format_is_stored_and_old_records_read_as_opaque() {
    use erlmcp_rollout::session::MetaFormat;
    let mut s = Session::new(SessionId::new("m").unwrap(), 0, Timeout::Infinity, vec![131, 106]);
    s.meta_format = MetaFormat::Etf;
    let bytes = codec::encode(&s).unwrap();
    assert_eq!(bytes[1] & 0b100, 0b100);
    assert_eq!(codec::decode(&bytes).unwrap().meta_format, MetaFormat::Etf);
    // A record written before the flag existed: the same bytes without bit 2.
    let mut old = bytes.clone();
    old[1] &= !0b100;
    let read = codec::decode(&old).unwrap();
    assert_eq!(read.meta_format, MetaFormat::Opaque);
    assert_eq!(read.metadata.as_ref(), &[131, 106]);
}
