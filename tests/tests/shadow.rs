//! Shadow mode end to end: real Envoy running the wasm filter, the real syncer, a private
//! redis-server and a stub shop that records what reached it. A goods in shadow mode is
//! decided and counted in full, but every request for it reaches the shop, marked with what
//! the gate would have answered and never with an order id; in the same filter a goods that
//! is not in shadow mode is enforced as ever.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::future::join_all;
use seckill_e2e::shop::SeenRequest;
use seckill_e2e::stack::{send, BuyResult, Stack, StackOptions};
use serde_json::json;

/// Units of each goods on sale.
const UNITS: u64 = 20;
/// Buyers at each goods: three for every unit.
const BUYERS: u64 = 3 * UNITS;

/// 3 × UNITS distinct buyers of one unit each of `goods`, all in flight at once.
async fn crowd(stack: &Arc<Stack>, goods: &'static str) -> Vec<BuyResult> {
    let buyers = (0..BUYERS).map(|i| {
        let stack = Arc::clone(stack);
        async move {
            let user = format!("{goods}-buyer-{i}");
            stack.buy(goods, &user, 1, &format!("{goods}-{i}")).await
        }
    });
    join_all(buyers)
        .await
        .into_iter()
        .map(|r| r.expect("an answer"))
        .collect()
}

/// How many requests the shop saw for `path`, by their `x-seckill-shadow` value ("" when
/// unmarked).
fn marks(seen: &[SeenRequest], path: &str) -> BTreeMap<String, u64> {
    let mut marks = BTreeMap::new();
    for request in seen.iter().filter(|r| r.path == path) {
        let mark = request
            .header(seckill_api::SHADOW_HEADER)
            .unwrap_or_default();
        *marks.entry(mark.to_owned()).or_insert(0) += 1;
    }
    marks
}

fn counts(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_shadow_goods_reaches_the_shop_whole_and_marked_while_another_is_enforced() {
    let mut options = StackOptions::new("shadow");
    // Two workers: the sold-out marks and buckets they share decide for both.
    options.workers = 2;
    options.plugin_config["goods"] = json!({"dry": {"shadow": true}, "ghost": {"shadow": true}});
    // A crowd arrives before any answer confirmed its goods: open the unconfirmed bucket.
    options.plugin_config["rate_limit"]["unconfirmed"] =
        json!({"per_second": 1_000_000.0, "burst": 1_000_000});
    let stack = Stack::start(options).await.expect("the stack starts");
    stack.open_sale("dry", UNITS, 1).await.unwrap();
    stack.open_sale("live", UNITS, 1).await.unwrap();
    let stack = Arc::new(stack);

    let (dry, live) = tokio::join!(crowd(&stack, "dry"), crowd(&stack, "live"));

    // Every buyer of the shadow goods got the shop's own answer, unmarked.
    for r in &dry {
        assert_eq!((r.status, r.outcome.as_str()), (200, ""), "{r:?}");
        assert_eq!(r.order_id, None, "{r:?}");
        assert_eq!(r.body, json!({"ok": true}), "{r:?}");
    }
    // The enforced goods: winners got through, losers were answered by the gate.
    let mut live_outcomes: BTreeMap<String, u64> = BTreeMap::new();
    for r in &live {
        *live_outcomes.entry(r.outcome.clone()).or_insert(0) += 1;
    }
    let expected = counts(&[("won", UNITS), ("sold_out", BUYERS - UNITS)]);
    assert_eq!(live_outcomes, expected);

    // The shadow goods' bad requests and wrong methods are a dry run too (a forged mark and
    // order id are replaced by the gate's own mark); a path that only resembles the sale
    // route has no goods id, so the filter's own mode (enforced) answers it. A goods in
    // shadow mode that nobody sells is marked unknown_goods, the second time from the
    // worker's memory.
    let url = stack.envoy.url();
    let http = &stack.http;
    let dry_url = format!("{url}/seckill/dry/buy");
    let shadowed = (200, "");
    let refused = (400, "bad_request");
    let requests = [
        (
            http.post(&dry_url)
                .header("x-request-id", "forger")
                .header(seckill_api::SHADOW_HEADER, "won")
                .header(seckill_api::ORDER_ID_HEADER, "forged"),
            shadowed,
        ),
        (
            http.post(format!("{dry_url}?qty=0"))
                .header("x-user-id", "zero"),
            shadowed,
        ),
        (http.get(&dry_url).header("x-user-id", "getter"), shadowed),
        (
            http.post(format!("{dry_url}/")).header("x-user-id", "near"),
            refused,
        ),
        (
            http.post(format!("{url}/seckill/live/buy?qty=0"))
                .header("x-user-id", "zero"),
            refused,
        ),
    ];
    for (request, expected) in requests {
        let r = send(request).await.unwrap();
        assert_eq!((r.status, r.outcome.as_str()), expected, "{r:?}");
    }
    for i in 0..2 {
        let r = stack
            .buy("ghost", "ghost-buyer", 1, &format!("ghost-{i}"))
            .await;
        let r = r.unwrap();
        assert_eq!((r.status, r.outcome.as_str()), (200, ""), "{r:?}");
    }

    let seen = stack.shop.seen();
    let dry_marks = counts(&[
        ("won", UNITS),
        ("sold_out", BUYERS - UNITS),
        ("bad_request", 2),
        ("method_not_allowed", 1),
    ]);
    assert_eq!(
        marks(&seen, "/seckill/dry/buy"),
        dry_marks,
        "every request, marked"
    );
    let ghost_marks = counts(&[("unknown_goods", 2)]);
    assert_eq!(marks(&seen, "/seckill/ghost/buy"), ghost_marks);
    // Shadow requests carry the mark and no other gate header: nothing the shop could take
    // for a request that passed the gate.
    for request in seen.iter().filter(|r| r.path != "/seckill/live/buy") {
        assert_eq!(request.gate_headers.len(), 1, "{request:?}");
    }
    // Only the enforced goods' winners reached the shop for it, each with an order id, and
    // nothing else did.
    let live_seen: Vec<&SeenRequest> = seen
        .iter()
        .filter(|r| r.path == "/seckill/live/buy")
        .collect();
    assert_eq!(live_seen.len() as u64, UNITS);
    for request in &live_seen {
        assert!(
            request.header(seckill_api::ORDER_ID_HEADER).is_some(),
            "{request:?}"
        );
        assert_eq!(
            request.header(seckill_api::SHADOW_HEADER),
            None,
            "{request:?}"
        );
    }
    assert_eq!(seen.len() as u64, BUYERS + 3 + 2 + UNITS);

    // The dry run's wins are real reservations in the gate's Redis (a simulation of the
    // sale's stock: the shop never confirms them, so they lapse at their deadline).
    let dry_live = stack.live("dry").await.unwrap();
    assert_eq!(
        (
            dry_live["available"].as_u64(),
            dry_live["reserved"].as_u64()
        ),
        (Some(0), Some(UNITS)),
        "{dry_live}"
    );

    // Envoy's stats: the dry run in its own family, the enforced answers in theirs.
    let envoy = &stack.envoy;
    for (outcome, shadow, enforced) in [
        ("won", UNITS, UNITS),
        ("sold_out", BUYERS - UNITS, BUYERS - UNITS),
        ("bad_request", 2, 2),
        ("method_not_allowed", 1, 0),
        ("unknown_goods", 2, 0),
        ("rate_limited", 0, 0),
        ("unavailable", 0, 0),
    ] {
        assert_eq!(
            envoy.shadow_stat(outcome).await.unwrap(),
            shadow,
            "shadow {outcome}"
        );
        assert_eq!(
            envoy.outcome_stat(outcome).await.unwrap(),
            enforced,
            "outcome {outcome}"
        );
    }
    let total = |family: &'static str| async move {
        seckill_e2e::syncer::sum_metric(&envoy.prometheus().await.unwrap(), family)
    };
    assert_eq!(total("seckill_shadow").await, BUYERS + 3 + 2);
    assert_eq!(total("seckill_outcome").await, BUYERS + 2);
}
