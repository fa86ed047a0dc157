//! The sale-event decoder: the bytes of a Kafka message the relay published (an outbox entry
//! the scripts wrote) as the writer reads them (`SaleEvent::from_json`), then the writer's rules
//! for it (`transition`). Anything refused here becomes a dead letter, its reason in a log line
//! and a Kafka header.
//!
//! Checked: nothing panics; a refusal's reason is bounded and printable whatever the message's
//! size; a decoded event has valid ids and quantity, re-encodes to bytes that decode equal, and
//! moves units without creating or losing any; the writer treats it as a redelivery when MySQL
//! holds its outcome, as a conflict when MySQL holds the order for another buyer, and creates an
//! order only from a reservation.

#![no_main]

use libfuzzer_sys::fuzz_target;
use seckill_api::{validate_id, ID_LEN_MAX, QUANTITY_MAX};
use seckill_fuzz::assert_log_safe;
use seckill_model::events::SaleEvent;
use seckill_model::order::OrderState;
use seckill_model::transition::{transition, Purchase, Row, Step};

fuzz_target!(|data: &[u8]| {
    let event = match SaleEvent::from_json(data) {
        Ok(event) => event,
        Err(refused) => {
            assert_log_safe(&refused.to_string());
            return;
        }
    };
    let mut ids = vec![event.order_id(), event.goods_id(), event.user_id()];
    ids.extend(event.request_id());
    for id in ids {
        assert_eq!(validate_id(id, ID_LEN_MAX), Ok(()), "{id:?}");
    }
    assert!((1..=QUANTITY_MAX).contains(&event.quantity()));
    assert_eq!(event.request_id().is_some(), event.kind() == "reserved");

    let encoded = event.to_json();
    assert_eq!(SaleEvent::from_json(&encoded).as_ref(), Ok(&event));

    // Units move between counters; none appear or vanish.
    let effect = event.effect();
    assert_eq!(
        effect.available + effect.reserved + effect.sold + effect.lapsed,
        0,
        "{event:?}"
    );

    // The writer's rules.
    let quantity = i64::from(event.quantity());
    let purchase = Purchase::of(&event);
    let redelivered = transition(&event, Some((event.order_state(), &purchase)), Some(0));
    assert_eq!(redelivered, Step::Duplicate, "{event:?}");
    let another = Purchase {
        user_id: format!("{}-other", event.user_id()),
        ..purchase.clone()
    };
    let conflict = transition(
        &event,
        Some((OrderState::Reserved, &another)),
        Some(quantity),
    );
    assert!(matches!(conflict, Step::Conflict(_)), "{conflict:?}");
    match transition(&event, None, Some(quantity)) {
        Step::Insert { effect: inserted } => {
            assert_eq!(event.order_state(), OrderState::Reserved);
            assert_eq!(inserted, effect);
        }
        Step::Refuse(reason) => {
            assert_ne!(event.order_state(), OrderState::Reserved);
            assert_log_safe(&reason);
        }
        other => panic!("a first event for no row: {other:?}"),
    }
    if event.order_state() != OrderState::Reserved {
        let step = transition(&event, Some((OrderState::Reserved, &purchase)), Some(0));
        assert_eq!(
            step,
            Step::Update {
                row: Row::after(&event),
                effect
            }
        );
    }
    assert!(matches!(transition(&event, None, None), Step::Refuse(_)));
});
