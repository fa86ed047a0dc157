//! What one sale event does to its order's row, decided from how MySQL holds the order: the
//! writer's rules, pure so that every state and event pair is tested without a database.

use crate::events::{Effect, SaleEvent};
use crate::order::{OrderState, ReleaseReason};

/// The row values an order takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Row {
    pub state: OrderState,
    pub release_reason: Option<ReleaseReason>,
    pub stock_returned: Option<bool>,
}

impl Row {
    /// The row the event leaves its order in.
    pub fn after(event: &SaleEvent) -> Row {
        let release = event.release();
        Row {
            state: event.order_state(),
            release_reason: release.map(|(reason, _)| reason),
            stock_returned: release.map(|(_, returned)| returned),
        }
    }
}

/// What to write for one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// MySQL has this event's outcome already (a redelivery): nothing is written.
    Duplicate,
    /// A new order: insert its row (reserved) and move the sale's counters by `effect`.
    Insert { effect: Effect },
    /// The order moves on: write `row` and move the sale's counters by `effect`.
    Update { row: Row, effect: Effect },
    /// The event cannot be applied; it becomes a dead letter with this reason.
    Refuse(String),
}

/// Decides `event` against the order's state in MySQL (`current`, None: no row) and its
/// goods' stock in MySQL as the batch has left it so far (`stock`, None: no sale row).
/// Reservations are applied once; an order moves only out of `reserved`, to the state its
/// event names; an event whose state the order already has is a redelivery.
pub fn transition(event: &SaleEvent, current: Option<OrderState>, stock: Option<i64>) -> Step {
    let (order_id, goods_id) = (event.order_id(), event.goods_id());
    let Some(stock) = stock else {
        return Step::Refuse(format!("no sale for goods {goods_id} in MySQL"));
    };
    let quantity = i64::from(event.quantity());
    let effect = event.effect();
    match (event.order_state(), current) {
        (OrderState::Reserved, Some(_)) => Step::Duplicate,
        (OrderState::Reserved, None) if stock < quantity => Step::Refuse(format!(
            "goods {goods_id}: MySQL stock {stock} is below {quantity}; reconcile"
        )),
        (OrderState::Reserved, None) => Step::Insert { effect },
        (_, None) => Step::Refuse(format!("order {order_id} is not in MySQL")),
        (_, Some(OrderState::Reserved)) => Step::Update {
            row: Row::after(event),
            effect,
        },
        (next, Some(now)) if next == now => Step::Duplicate,
        (_, Some(now)) => Step::Refuse(format!(
            "order {order_id} is {now}; it cannot take this event"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const Q: i64 = 3;

    /// An event of type `kind` for order g.1.7 of goods g, Q units, reason cancelled.
    fn event(kind: &str) -> SaleEvent {
        crate::events::sample(kind, Q as u32, ReleaseReason::Cancelled)
    }

    fn moves(available: i64, reserved: i64, sold: i64, lapsed: i64) -> Effect {
        Effect {
            available,
            reserved,
            sold,
            lapsed,
        }
    }

    fn update(state: OrderState, release: Option<(ReleaseReason, bool)>, effect: Effect) -> Step {
        Step::Update {
            row: Row {
                state,
                release_reason: release.map(|r| r.0),
                stock_returned: release.map(|r| r.1),
            },
            effect,
        }
    }

    fn refuse(reason: &str) -> Step {
        Step::Refuse(reason.to_owned())
    }

    /// Every state an order can be in (None: MySQL has no row) against every event, with
    /// plenty of stock: the exact step.
    #[test]
    fn every_state_and_event() {
        use OrderState::{Confirmed, Released, Reserved};
        let cancelled = Some((ReleaseReason::Cancelled, true));
        let lapsed = Some((ReleaseReason::Cancelled, false));
        let not_in_mysql = "order g.1.7 is not in MySQL";
        let cases: [(Option<OrderState>, &str, Step); 16] = [
            (
                None,
                "reserved",
                Step::Insert {
                    effect: moves(-Q, Q, 0, 0),
                },
            ),
            (None, "confirmed", refuse(not_in_mysql)),
            (None, "released", refuse(not_in_mysql)),
            (None, "lapsed", refuse(not_in_mysql)),
            (Some(Reserved), "reserved", Step::Duplicate),
            (
                Some(Reserved),
                "confirmed",
                update(Confirmed, None, moves(0, -Q, Q, 0)),
            ),
            (
                Some(Reserved),
                "released",
                update(Released, cancelled, moves(Q, -Q, 0, 0)),
            ),
            (
                Some(Reserved),
                "lapsed",
                update(Released, lapsed, moves(0, -Q, 0, Q)),
            ),
            (Some(Confirmed), "reserved", Step::Duplicate),
            (Some(Confirmed), "confirmed", Step::Duplicate),
            (
                Some(Confirmed),
                "released",
                refuse("order g.1.7 is confirmed; it cannot take this event"),
            ),
            (
                Some(Confirmed),
                "lapsed",
                refuse("order g.1.7 is confirmed; it cannot take this event"),
            ),
            (Some(Released), "reserved", Step::Duplicate),
            (
                Some(Released),
                "confirmed",
                refuse("order g.1.7 is released; it cannot take this event"),
            ),
            (Some(Released), "released", Step::Duplicate),
            (Some(Released), "lapsed", Step::Duplicate),
        ];
        for (current, kind, expected) in cases {
            let step = transition(&event(kind), current, Some(1_000));
            assert_eq!(step, expected, "{kind} on {current:?}");
        }
    }

    /// Stock MySQL does not have stops a new reservation (drift), and nothing else.
    #[test]
    fn stock_bounds_only_new_reservations() {
        assert_eq!(
            transition(&event("reserved"), None, Some(Q - 1)),
            refuse("goods g: MySQL stock 2 is below 3; reconcile")
        );
        assert_eq!(
            transition(&event("reserved"), None, Some(Q)),
            Step::Insert {
                effect: moves(-Q, Q, 0, 0)
            }
        );
        // A redelivered reservation is a duplicate whatever the stock.
        assert_eq!(
            transition(&event("reserved"), Some(OrderState::Reserved), Some(0)),
            Step::Duplicate
        );
        // Ending a reservation needs no stock.
        for kind in ["confirmed", "released", "lapsed"] {
            assert!(matches!(
                transition(&event(kind), Some(OrderState::Reserved), Some(0)),
                Step::Update { .. }
            ));
        }
    }

    /// A goods MySQL has no sale for refuses every event, whatever its order.
    #[test]
    fn no_sale_refuses_everything() {
        let states = [
            None,
            Some(OrderState::Reserved),
            Some(OrderState::Confirmed),
            Some(OrderState::Released),
        ];
        for current in states {
            for kind in ["reserved", "confirmed", "released", "lapsed"] {
                assert_eq!(
                    transition(&event(kind), current, None),
                    refuse("no sale for goods g in MySQL"),
                    "{kind} on {current:?}"
                );
            }
        }
    }
}
