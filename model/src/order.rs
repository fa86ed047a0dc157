//! The states an order goes through and why one is released. Their strings are stored in
//! MySQL (`orders.state`, `orders.release_reason`), in Redis (the settled hash) and in sale
//! events, and appear in API answers: each is written once here.

use serde::{Deserialize, Serialize};

/// An enum of unit variants with one stable string each (serde uses the same strings).
macro_rules! string_enum {
    ($(#[$meta:meta])* pub enum $name:ident { $($(#[$vmeta:meta])* $variant:ident => $text:literal,)+ }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        pub enum $name {
            $($(#[$vmeta])* #[serde(rename = $text)] $variant,)+
        }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant,)+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }

            pub fn parse(text: &str) -> Option<$name> {
                $name::ALL.iter().copied().find(|v| v.as_str() == text)
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

string_enum! {
    /// Where an order stands. An order is born reserved and ends exactly once, confirmed or
    /// released; MySQL stores the same three strings.
    pub enum OrderState {
        /// Units are held for the buyer until payment or the end of a window.
        Reserved => "reserved",
        /// Paid: the units are sold.
        Confirmed => "confirmed",
        /// Ended unpaid, for a [`ReleaseReason`]; its units went back on sale or lapsed.
        Released => "released",
    }
}

string_enum! {
    /// Why a reservation was released.
    pub enum ReleaseReason {
        /// The buyer (or the shop) cancelled the order.
        Cancelled => "cancelled",
        /// The payment window passed.
        Expired => "expired",
        /// The shop API failed the winner's request (5xx or no response).
        UpstreamFailed => "upstream_failed",
        /// The gate never claimed the reservation within the claim window: it never reached
        /// the shop (the gate gave up waiting for the deduct answer, or the buyer left).
        Unclaimed => "unclaimed",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_round_trip_and_match_serde() {
        for state in OrderState::ALL {
            assert_eq!(OrderState::parse(state.as_str()), Some(*state));
            let json = serde_json::to_string(state).unwrap();
            assert_eq!(json, format!("\"{state}\""));
        }
        for reason in ReleaseReason::ALL {
            assert_eq!(ReleaseReason::parse(reason.as_str()), Some(*reason));
            let json = serde_json::to_string(reason).unwrap();
            assert_eq!(
                serde_json::from_str::<ReleaseReason>(&json).unwrap(),
                *reason
            );
        }
        // The strings MySQL rows and API answers carried before the enums existed.
        let states: Vec<&str> = OrderState::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(states, ["reserved", "confirmed", "released"]);
        let reasons: Vec<&str> = ReleaseReason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(
            reasons,
            ["cancelled", "expired", "upstream_failed", "unclaimed"]
        );
        assert_eq!(ReleaseReason::parse("bored"), None);
        assert_eq!(OrderState::parse("paid"), None);
    }
}
