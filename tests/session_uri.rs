//! Store URIs: display/parse round trips and arbitrary text never panics.

use erlmcp_rollout::session::uri::{Endpoint, StoreUri};
use proptest::prelude::*;

fn host() -> impl Strategy<Value = String> {
    prop_oneof!["[A-Za-z0-9._-]{1,20}", "[0-9a-f:]{1,12}".prop_map(|s| format!("[{s}]")),]
}

fn uri() -> impl Strategy<Value = StoreUri> {
    prop_oneof![
        Just(StoreUri::Memory),
        "[^\\x00]{1,40}".prop_map(|p| StoreUri::Disk(p.into())),
        (
            prop::collection::vec(
                (host(), 1u16..=65535).prop_map(|(host, port)| Endpoint { host, port }),
                1..5
            ),
            prop::option::of("[^\\x00]{1,30}"),
        )
            .prop_map(|(endpoints, prefix)| StoreUri::Etcd { endpoints, prefix }),
    ]
}

proptest! {
    #[test]
    fn display_parses_back(u in uri()) {
        let text = u.to_string();
        prop_assert_eq!(StoreUri::parse(&text).unwrap(), u, "{}", text);
    }

    #[test]
    fn any_text_parses_or_errors_with_a_column_inside_it(s in ".{0,60}") {
        match StoreUri::parse(&s) {
            Ok(u) => prop_assert_eq!(StoreUri::parse(&u.to_string()).unwrap(), u),
            Err(e) => {
                prop_assert!(e.column >= 1 && e.column <= s.chars().count() + 1, "{}", e);
                prop_assert_eq!(e.input, s);
            }
        }
    }

    #[test]
    fn etcd_like_text_never_panics(s in "etcd:[\\[\\]:,/a-z0-9.]{0,30}") {
        let _ = StoreUri::parse(&s);
    }
}
