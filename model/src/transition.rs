//! What one sale event does to its order's row, decided from how MySQL holds the order: the
//! writer's rules, pure so that every state and event pair is tested without a database.
//!
//! An order id stands for one purchase (a buyer, a request id, a quantity) for good. An event
//! that names an order MySQL holds for another purchase is not a redelivery but an order id
//! issued twice (a Redis that forgot its epoch): a conflict, never applied, never dropped
//! silently.

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

/// What an order id stands for: who bought how many units with which request. Every event of
/// one order carries the same buyer and quantity; `reserved` also carries the request id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Purchase {
    pub user_id: String,
    pub request_id: String,
    pub quantity: u32,
}

impl Purchase {
    /// The purchase a `reserved` event creates (`request_id` is empty for other events, which
    /// create no row).
    pub fn of(event: &SaleEvent) -> Purchase {
        Purchase {
            user_id: event.user_id().to_owned(),
            request_id: event.request_id().unwrap_or_default().to_owned(),
            quantity: event.quantity(),
        }
    }

    /// How `event` differs from this purchase, field by field (None: it is this purchase).
    fn differences(&self, event: &SaleEvent) -> Option<String> {
        let mut differences = Vec::new();
        if event.user_id() != self.user_id {
            differences.push(format!(
                "user_id {} (MySQL has {})",
                event.user_id(),
                self.user_id
            ));
        }
        if let Some(request_id) = event.request_id() {
            if request_id != self.request_id {
                differences.push(format!(
                    "request_id {request_id} (MySQL has {})",
                    self.request_id
                ));
            }
        }
        if event.quantity() != self.quantity {
            differences.push(format!(
                "quantity {} (MySQL has {})",
                event.quantity(),
                self.quantity
            ));
        }
        (!differences.is_empty()).then(|| differences.join(", "))
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
    /// The event names an order MySQL holds for another purchase: an order id issued twice.
    /// Never applied; a dead letter with this reason (which says what differs), counted and
    /// logged as an error.
    Conflict(String),
}

/// Decides `event` against the order as MySQL holds it (`current`: its state and purchase,
/// None: no row) and its goods' stock in MySQL as the batch has left it so far (`stock`, None:
/// no sale row). An event for another purchase than the row's is a conflict, whatever the
/// states. Reservations are applied once; an order moves only out of `reserved`, to the state
/// its event names; an event whose state the order already has is a redelivery.
pub fn transition(
    event: &SaleEvent,
    current: Option<(OrderState, &Purchase)>,
    stock: Option<i64>,
) -> Step {
    let (order_id, goods_id) = (event.order_id(), event.goods_id());
    if let Some(differences) = current.and_then(|(_, purchase)| purchase.differences(event)) {
        return Step::Conflict(format!(
            "order {order_id} is another purchase in MySQL: {} event with {differences}",
            event.kind()
        ));
    }
    let Some(stock) = stock else {
        return Step::Refuse(format!("no sale for goods {goods_id} in MySQL"));
    };
    let quantity = i64::from(event.quantity());
    let effect = event.effect();
    match (event.order_state(), current.map(|(state, _)| state)) {
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

    /// The purchase every [`event`] belongs to: u1 bought Q units with request r1.
    fn bought() -> Purchase {
        Purchase {
            user_id: "u1".into(),
            request_id: "r1".into(),
            quantity: Q as u32,
        }
    }

    /// How MySQL holds order g.1.7: in `state`, for the purchase the events name.
    fn held(state: Option<OrderState>, purchase: &Purchase) -> Option<(OrderState, &Purchase)> {
        state.map(|s| (s, purchase))
    }

    /// An event of type `kind` for order g.1.7 by another buyer, request or quantity (a
    /// `reserved` event takes `request`; the others carry no request id).
    fn other(kind: &str, user: &str, request: &str, quantity: u32) -> SaleEvent {
        let mut event = crate::events::sample(kind, quantity, ReleaseReason::Cancelled);
        match &mut event {
            SaleEvent::Reserved {
                user_id,
                request_id,
                ..
            } => {
                *user_id = user.into();
                *request_id = request.into();
            }
            SaleEvent::Confirmed { user_id, .. }
            | SaleEvent::Released { user_id, .. }
            | SaleEvent::Lapsed { user_id, .. } => *user_id = user.into(),
        }
        event
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
        let purchase = bought();
        for (current, kind, expected) in cases {
            let step = transition(&event(kind), held(current, &purchase), Some(1_000));
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
        let purchase = bought();
        let reserved = held(Some(OrderState::Reserved), &purchase);
        assert_eq!(
            transition(&event("reserved"), reserved, Some(0)),
            Step::Duplicate
        );
        // Ending a reservation needs no stock.
        for kind in ["confirmed", "released", "lapsed"] {
            assert!(matches!(
                transition(&event(kind), reserved, Some(0)),
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
        let purchase = bought();
        for current in states {
            for kind in ["reserved", "confirmed", "released", "lapsed"] {
                assert_eq!(
                    transition(&event(kind), held(current, &purchase), None),
                    refuse("no sale for goods g in MySQL"),
                    "{kind} on {current:?}"
                );
            }
        }
    }

    /// An event for another purchase than the one MySQL holds under its order id is a
    /// conflict, in every state and whatever the stock (not a duplicate, not applied), and
    /// its reason names the order and every field that differs. The same purchase is what it
    /// always was.
    #[test]
    fn another_purchase_is_a_conflict_never_a_duplicate() {
        let q = Q as u32;
        let conflict = |kind: &str, differences: &str| {
            Step::Conflict(format!(
                "order g.1.7 is another purchase in MySQL: {kind} event with {differences}"
            ))
        };
        let cases: [(SaleEvent, Step); 10] = [
            (
                other("reserved", "u2", "r1", q),
                conflict("reserved", "user_id u2 (MySQL has u1)"),
            ),
            (
                other("reserved", "u1", "r2", q),
                conflict("reserved", "request_id r2 (MySQL has r1)"),
            ),
            (
                other("reserved", "u1", "r1", 1),
                conflict("reserved", "quantity 1 (MySQL has 3)"),
            ),
            (
                other("reserved", "u2", "r2", 1),
                conflict(
                    "reserved",
                    "user_id u2 (MySQL has u1), request_id r2 (MySQL has r1), \
                     quantity 1 (MySQL has 3)",
                ),
            ),
            (
                other("confirmed", "u2", "", q),
                conflict("confirmed", "user_id u2 (MySQL has u1)"),
            ),
            (
                other("confirmed", "u1", "", 1),
                conflict("confirmed", "quantity 1 (MySQL has 3)"),
            ),
            (
                other("released", "u2", "", q),
                conflict("released", "user_id u2 (MySQL has u1)"),
            ),
            (
                other("released", "u1", "", 2),
                conflict("released", "quantity 2 (MySQL has 3)"),
            ),
            (
                other("lapsed", "u2", "", q),
                conflict("lapsed", "user_id u2 (MySQL has u1)"),
            ),
            (
                other("lapsed", "u1", "", 1),
                conflict("lapsed", "quantity 1 (MySQL has 3)"),
            ),
        ];
        let purchase = bought();
        let states = [
            OrderState::Reserved,
            OrderState::Confirmed,
            OrderState::Released,
        ];
        for (event, expected) in &cases {
            for state in states {
                for stock in [Some(1_000), Some(0), None] {
                    let step = transition(event, Some((state, &purchase)), stock);
                    assert_eq!(&step, expected, "{event:?} on {state}, stock {stock:?}");
                }
            }
        }
        // Without a row there is nothing to conflict with: a new reservation is inserted.
        assert!(matches!(
            transition(&cases[0].0, None, Some(1_000)),
            Step::Insert { .. }
        ));
        // The row's own purchase: a confirm (no request id) moves it on, a redelivered
        // reservation is a duplicate.
        let reserved = Some((OrderState::Reserved, &purchase));
        assert!(matches!(
            transition(&other("confirmed", "u1", "", q), reserved, Some(0)),
            Step::Update { .. }
        ));
        assert_eq!(
            transition(&other("reserved", "u1", "r1", q), reserved, Some(0)),
            Step::Duplicate
        );
    }
}
